"""The draft model (engine/draft_model.py) on the real GGUFs: SmolLM2 drafting for itself
proposes what greedy decoding of the target produces, batched slots draft as they do alone,
a rejected draft is trimmed from its KV, and a model of another vocabulary is refused; and
models.yaml / file-name resolution of draft_model in the registry (fake engines)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmserve.config import Settings
from llmserve.engine.base import SamplingParams
from llmserve.errors import ModelLoadError
from tests.conftest import GEMMA, SMOL, require_model

N_CTX = 2048
K = 8
SETTINGS = Settings(n_ctx=N_CTX, n_threads=1, parallel=2)
CHAT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "{}<|im_end|>\n<|im_start|>assistant\n")
STORY = "Write a short story about a lighthouse keeper."
CAPITALS = "List the capitals of France, Spain and Italy."


@pytest.fixture(scope="module")
def target() -> Iterator[Any]:
    from llmserve.engine.llama import LlamaEngine

    engine = LlamaEngine.load(require_model(SMOL), SETTINGS)
    try:
        yield engine
    finally:
        engine.close()


def _draft(target: Any, path: Path | None = None, n_ctx: int = N_CTX) -> Any:
    from llmserve.engine.draft_model import load_draft_model

    draft = load_draft_model(path or require_model(SMOL), SETTINGS, target._model, SMOL,
                             n_ctx, SETTINGS.parallel)
    draft.p_min = 0.0  # NOTE: these tests compare whole greedy drafts; the cutoff has its own
    return draft


@pytest.fixture
def draft(target: Any) -> Iterator[Any]:
    draft = _draft(target)
    try:
        yield draft
    finally:
        draft.close()


def _prompt(target: Any, question: str) -> list[int]:
    return list(target.tokenize(CHAT.format(question), add_special=False, parse_special=True))


def _greedy(target: Any, prompt: list[int], n: int) -> list[int]:
    out = target.generate(prompt, SamplingParams(temperature=0))
    tokens = [tok for _, (tok, _piece) in zip(range(n), out, strict=False)]
    out.close()
    return tokens


@pytest.mark.real_model
def test_self_draft_is_the_targets_greedy_output(target: Any, draft: Any) -> None:
    prompt = _prompt(target, STORY)
    expected = _greedy(target, prompt, K)
    assert len(expected) == K  # no end of generation this early
    assert draft.propose([(0, prompt, K)]) == [expected]
    # its KV holds the prompt and every drafted token but the last (never evaluated)
    assert draft.held(0) == prompt + expected[:-1]


@pytest.mark.real_model
def test_slots_drafted_together_draft_as_alone(target: Any, draft: Any) -> None:
    story, capitals = _prompt(target, STORY), _prompt(target, CAPITALS)
    alone = [draft.propose([(0, story, K)])[0], draft.propose([(1, capitals, K)])[0]]
    draft.clear()
    decodes = draft.decodes
    together = draft.propose([(0, story, K), (1, capitals, K)])
    assert together == alone
    assert draft.decodes - decodes == K  # one prompt batch, then one decode per position
    assert draft.propose([(0, story, 0), (1, capitals, -1)]) == [[], []]


@pytest.mark.real_model
def test_a_rejected_draft_is_trimmed_from_the_draft_kv(target: Any, draft: Any) -> None:
    prompt = _prompt(target, STORY)
    first = draft.propose([(1, prompt, K)])[0]
    # the target kept 3 drafted tokens, then sampled another token than the draft's 4th
    other = next(t for t in (13, 28, 30) if t != first[3])
    tokens = [*prompt, *first[:3], other]
    evaluated = draft.evaluated
    again = draft.propose([(1, tokens, K)])[0]
    assert draft.held(1) == tokens + again[:-1]
    # only `other` and the new draft's tokens were evaluated: the kept prefix was not again
    assert draft.evaluated - evaluated == 1 + len(again) - 1
    fresh = _draft(target)
    try:
        assert fresh.propose([(1, tokens, K)]) == [again]
    finally:
        fresh.close()


@pytest.mark.real_model
def test_accepted_draft_goes_on_from_the_kv(target: Any, draft: Any) -> None:
    prompt = _prompt(target, STORY)
    expected = _greedy(target, prompt, 2 * K + 1)
    first = draft.propose([(0, prompt, K)])[0]
    assert first == expected[:K]
    # all accepted, plus the target's own next token: only that one is new
    tokens = [*prompt, *expected[: K + 1]]
    assert draft.propose([(0, tokens, K)]) == [expected[K + 1 :]]


@pytest.mark.real_model
def test_the_cutoff_keeps_a_prefix_of_the_greedy_draft(target: Any, draft: Any) -> None:
    from llmserve.engine.draft_model import DRAFT_P_MIN

    prompt = _prompt(target, CAPITALS)
    full = draft.propose([(0, prompt, K)])[0]
    draft.p_min = DRAFT_P_MIN
    cut = draft.propose([(0, prompt, K)])[0]
    assert cut == full[: len(cut)]


@pytest.mark.real_model
def test_no_room_in_the_draft_kv_gives_empty_drafts(target: Any) -> None:
    draft = _draft(target, n_ctx=256)
    try:
        prompt = _prompt(target, STORY)
        long = (prompt * 20)[: draft.n_ctx * 2 // 3]
        other = [*long[:-1], 28]
        # each fits alone (the other slot's KV is dropped to make room) ...
        assert len(draft.propose([(0, long, 2)])[0]) == 2
        assert len(draft.propose([(1, other, 2)])[0]) == 2
        assert draft.held(0) == []
        # ... not both at once: no drafts, no exception, and the draft KV is emptied
        assert draft.propose([(0, long, 2), (1, [*long[:-2], 30, 31], 2)]) == [[], []]
        assert draft.held(0) == draft.held(1) == []
        assert len(draft.propose([(0, long, 2)])[0]) == 2  # and it drafts again
        assert draft.propose([(0, prompt * 20, 4)]) == [[]]  # longer than its context
    finally:
        draft.close()


@pytest.mark.real_model
def test_gemma_drafts_for_itself_across_a_trim() -> None:
    """Gemma 3's sliding-window cache: a trimmed draft KV goes on as a fresh one would."""
    from llmserve.engine.draft_model import load_draft_model
    from llmserve.engine.llama import LlamaEngine

    path = require_model(GEMMA)
    target = LlamaEngine.load(path, SETTINGS)
    drafts = [load_draft_model(path, SETTINGS, target._model, GEMMA, N_CTX, 2) for _ in "ab"]
    try:
        prompt = list(target.tokenize(
            "<start_of_turn>user\nWrite a short story about a lighthouse keeper.<end_of_turn>\n"
            "<start_of_turn>model\n", add_special=True, parse_special=True))
        expected = _greedy(target, prompt, K)
        for d in drafts:
            d.p_min = 0.0
        first = drafts[0].propose([(0, prompt, K)])[0]
        assert first == expected
        tokens = [*prompt, *first[:3], next(t for t in (13, 28, 30) if t != first[3])]
        assert drafts[0].propose([(0, tokens, K)]) == drafts[1].propose([(0, tokens, K)])
    finally:
        for d in drafts:
            d.close()
        target.close()


@pytest.mark.real_model
def test_another_vocabulary_is_refused(target: Any) -> None:
    from llmserve.engine.draft_model import load_draft_model

    with pytest.raises(ModelLoadError) as exc:
        load_draft_model(require_model(GEMMA), SETTINGS, target._model, SMOL, N_CTX, 2)
    message = exc.value.message
    assert "vocab" in message and GEMMA in message and SMOL in message


# -- registry: draft_model names a file in the models dir --------------------------------------


def _manager(models_dir: Path, **settings_kw: Any) -> tuple[Any, list[Settings]]:
    from llmserve.catalog.registry import ModelManager
    from llmserve.engine.fake import FakeEngine
    from llmserve.scheduler import Scheduler

    loaded: list[Settings] = []

    def factory(path: Path, settings: Settings) -> FakeEngine:
        loaded.append(settings)
        return FakeEngine(path)

    settings = Settings(models_dir=models_dir, templates_dir=models_dir / "t", **settings_kw)
    return ModelManager(settings, factory, Scheduler()), loaded


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    d = tmp_path / "models"
    d.mkdir()
    for name in ("big.gguf", "small.gguf"):
        (d / name).write_bytes(b"GGUF fake" + bytes(991))
    (d / "models.yaml").write_text(
        "models:\n"
        "  small-draft:\n    path: small.gguf\n"
        "  big-model:\n    path: big.gguf\n    load: {draft_model: small-draft}\n"
    )
    return d


@pytest.mark.parametrize("name", ["small.gguf", "small", "small-draft"])
def test_draft_model_names_resolve_to_the_file(models_dir: Path, name: str) -> None:
    manager, loaded = _manager(models_dir, draft_model=name)
    manager.ensure("big.gguf")
    assert loaded[0].draft_model == str((models_dir / "small.gguf").resolve())
    assert manager.resident_settings()["big.gguf"][1].draft_model == name


def test_draft_model_from_models_yaml_load(models_dir: Path) -> None:
    manager, loaded = _manager(models_dir)
    manager.ensure("big.gguf")
    manager.ensure("small.gguf")
    assert loaded[0].draft_model == str((models_dir / "small.gguf").resolve())
    assert loaded[1].draft_model is None


@pytest.mark.parametrize("name", ["nothing-here", "../big.gguf"])
def test_an_unknown_draft_model_fails_naming_it(models_dir: Path, name: str) -> None:
    manager, loaded = _manager(models_dir, draft_model=name)
    with pytest.raises(ModelLoadError) as exc:
        manager.ensure("big.gguf")
    assert f"draft model {name!r}" in exc.value.message
    assert loaded == []
