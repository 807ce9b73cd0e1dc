"""Write small synthetic GGUF files (header + zero tensor data) for tests."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

_TYPES = {"u8": 0, "i32": 5, "u32": 4, "f32": 6, "bool": 7, "str": 8, "arr": 9, "u64": 10}


def _string(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<Q", len(raw)) + raw


def _value(v: Any) -> tuple[int, bytes]:
    if isinstance(v, bool):
        return _TYPES["bool"], struct.pack("<?", v)
    if isinstance(v, int):
        return _TYPES["u32"], struct.pack("<I", v)
    if isinstance(v, float):
        return _TYPES["f32"], struct.pack("<f", v)
    if isinstance(v, str):
        return _TYPES["str"], _string(v)
    if isinstance(v, list):
        item_type = _value(v[0])[0] if v else _TYPES["u32"]
        body = b"".join(_value(x)[1] for x in v)
        return _TYPES["arr"], struct.pack("<IQ", item_type, len(v)) + body
    raise TypeError(type(v))


def write_gguf(
    path: Path,
    metadata: dict[str, Any],
    tensors: list[tuple[str, tuple[int, ...], int]] = (),  # type: ignore[assignment]
    *,
    version: int = 3,
) -> Path:
    """A GGUF file with the given metadata and tensor infos (name, dims, ggml type)."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(metadata)))
    for key, value in metadata.items():
        vtype, body = _value(value)
        out += _string(key) + struct.pack("<I", vtype) + body
    for name, dims, ggml_type in tensors:
        out += _string(name) + struct.pack("<I", len(dims))
        out += b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ggml_type, 0)
    out += bytes(64)  # stand-in for tensor data
    path.write_bytes(bytes(out))
    return path


def tiny_llama(path: Path, *, template: str | None = "{{ messages }}", ftype: int = 15) -> Path:
    """A plausible llama-architecture header: 2 layers, a 6-token vocabulary."""
    meta: dict[str, Any] = {
        "general.architecture": "llama",
        "general.name": "Tiny Test",
        "general.file_type": ftype,
        "llama.context_length": 4096,
        "llama.block_count": 2,
        "llama.embedding_length": 64,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "a", "b", "c"],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }
    if template is not None:
        meta["tokenizer.chat_template"] = template
    tensors = [("token_embd.weight", (64, 6), 12), ("blk.0.attn_q.weight", (64, 64), 12),
               ("output_norm.weight", (64,), 0)]  # fmt: skip
    return write_gguf(path, meta, tensors)
