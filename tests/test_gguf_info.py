"""The pure-Python GGUF header reader, on synthetic files and cross-checked on the real GGUFs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmserve.catalog.gguf_info import (
    ArraySummary,
    GGUFError,
    parameters_label,
    quant_from_filename,
    read_gguf,
)
from tests.conftest import GEMMA, SMOL, require_model
from tests.ggufgen import tiny_llama, write_gguf


def test_synthetic_header(tmp_path: Path) -> None:
    info = read_gguf(tiny_llama(tmp_path / "t.gguf"))

    assert info.architecture == "llama"
    assert info.name == "Tiny Test"
    assert info.context_length == 4096
    assert info.quantization == "Q4_K_M"
    assert info.parameters == 64 * 6 + 64 * 64 + 64
    assert info.tensor_count == 3
    assert info.chat_template == "{{ messages }}"
    assert info.special_tokens == {"bos": (1, "<s>"), "eos": (2, "</s>")}
    # 2 layers x 2 kv heads x (16 + 16) head dims x 2 bytes
    assert info.kv_bytes_per_token() == 2 * 2 * 32 * 2


def test_long_arrays_are_summarised_and_tokens_still_found(tmp_path: Path) -> None:
    vocab = [f"tok{i}" for i in range(5000)]
    path = write_gguf(tmp_path / "v.gguf", {
        "general.architecture": "qwen2",
        "tokenizer.ggml.tokens": vocab,
        "tokenizer.ggml.scores": [0.5] * 5000,
        "tokenizer.ggml.eos_token_id": 4321,
    })  # fmt: skip

    info = read_gguf(path)

    assert info.metadata["tokenizer.ggml.tokens"] == ArraySummary("string", 5000)
    assert info.metadata["tokenizer.ggml.scores"] == ArraySummary("f32", 5000)
    assert info.special_tokens == {"eos": (4321, "tok4321")}
    assert info.quantization is None and info.parameters == 0


def test_quantization_falls_back_to_tensor_types(tmp_path: Path) -> None:
    path = write_gguf(
        tmp_path / "x.gguf", {"general.architecture": "llama"},
        [("a", (32, 32), 8), ("b", (32, 8), 8), ("c", (32, 4), 0)],
    )  # fmt: skip
    assert read_gguf(path).quantization == "Q8_0"


@pytest.mark.parametrize(
    ("ftype", "name"),
    [(15, "Q4_K_M"), (15 | 1024, "Q4_K_M"), (0, "F32"), (1024, "F32"), (38, "MXFP4_MOE")],
)
def test_file_type_names(tmp_path: Path, ftype: int, name: str) -> None:
    assert read_gguf(tiny_llama(tmp_path / "t.gguf", ftype=ftype)).quantization == name


def test_tensor_data_size_uses_ggml_block_sizes(tmp_path: Path) -> None:
    def required(ggml_type: int) -> int | None:
        path = write_gguf(tmp_path / f"{ggml_type}.gguf", {}, [("a", (32, 4), ggml_type)])
        return read_gguf(path).required_size

    q8_0, q8_1, unknown = required(8), required(9), required(99)
    assert q8_0 is not None and q8_1 is not None and unknown is None
    assert q8_1 - q8_0 == 4 * (36 - 34)  # 4 blocks; ggml's block_q8_1 is 36 bytes, not 40


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"GGUF fake", "not a GGUF file"),
        (b"NOPE" + bytes(40), "bad magic"),
        (b"GGUF" + (7).to_bytes(4, "little") + bytes(40), "unsupported GGUF version 7"),
    ],
)
def test_not_gguf(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(GGUFError, match=message):
        read_gguf(path)


def test_truncated_header(tmp_path: Path) -> None:
    whole = tiny_llama(tmp_path / "t.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:200])
    with pytest.raises(GGUFError, match="truncated"):
        read_gguf(cut)


def test_labels() -> None:
    assert parameters_label(134_515_008) == "134.5M"
    assert parameters_label(1_500_000_000) == "1.5B"
    assert parameters_label(3_000_000_000) == "3B"
    assert quant_from_filename("Llama-3.2-1B-Instruct-Q4_K_M.gguf") == "Q4_K_M"
    assert quant_from_filename("qwen2.5-0.5b-instruct-q4_k_m.gguf") == "Q4_K_M"
    assert quant_from_filename("SmolLM2-135M-Instruct.Q4_1.gguf") == "Q4_1"
    assert quant_from_filename("x-IQ4_XS.gguf") == "IQ4_XS"
    assert quant_from_filename("model.gguf") is None


_ENGINE_FACTS = """
import json, sys
from pathlib import Path
from llmserve.config import Settings
from llmserve.engine.llama import LlamaEngine
engine = LlamaEngine.load(Path(sys.argv[1]), Settings(n_ctx=256, n_threads=1))
info = engine.info
print(json.dumps({"metadata": info.metadata, "bos": [info.bos_token_id, info.bos_token],
                  "eos": info.eos_token, "template": info.chat_template,
                  "n_params": engine._model.n_params()}))
engine.close()
"""


@pytest.mark.real_model
@pytest.mark.parametrize("name", [SMOL, GEMMA])
def test_matches_llama_cpp_on_real_models(name: str) -> None:
    path = require_model(name)
    info = read_gguf(path)
    # NOTE: llama.cpp runs in a subprocess so this test process never imports llama_cpp.
    proc = subprocess.run(
        [sys.executable, "-c", _ENGINE_FACTS, str(path)], capture_output=True, text=True,
        timeout=120, check=True,
    )  # fmt: skip
    facts = json.loads(proc.stdout)
    meta = facts["metadata"]
    assert info.architecture == meta["general.architecture"]
    assert str(info.context_length) == meta[f"{info.architecture}.context_length"]
    assert info.chat_template == facts["template"]
    assert str(info.metadata["general.file_type"]) == meta["general.file_type"]
    assert list(info.special_tokens["bos"]) == facts["bos"]
    assert info.special_tokens["eos"][1] == facts["eos"]
    assert info.parameters == facts["n_params"]
    expected = {SMOL: ("llama", "Q4_1", 8192), GEMMA: ("gemma3", "Q4_K_M", 32768)}[name]
    assert (info.architecture, info.quantization, info.context_length) == expected
