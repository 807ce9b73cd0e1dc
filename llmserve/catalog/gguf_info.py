"""A small pure-Python GGUF header reader: metadata and tensor shapes, never the weights.

GGUF layout (little-endian): magic ``GGUF``, version u32, tensor count, key/value count, the
key/value pairs, then one info record per tensor (name, dims, type, offset). Counts and string
lengths are u64 from version 2 on (u32 in version 1). The file is memory-mapped and only the
header pages are touched; big arrays (the vocabulary, scores) are skipped, not decoded.
The type tables (value types, file types, ggml tensor types and block sizes) are gguf-py's.
"""

from __future__ import annotations

import mmap
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, LlamaFileType

# ggml_type -> (elements per block, bytes per block).
TYPE_SIZES: dict[int, tuple[int, int]] = {int(t): size for t, size in GGML_QUANT_SIZES.items()}
# NOTE: gguf-py sizes Q8_1 as 40 bytes; ggml's block_q8_1 is two halves + 32 int8 (36).
TYPE_SIZES[GGMLQuantizationType.Q8_1] = (32, 36)
_DEFAULT_ALIGNMENT = 32
_SCALARS: dict[int, str] = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_ITEM_NAMES: dict[int, str] = {
    GGUFValueType.STRING: "string", GGUFValueType.ARRAY: "array", GGUFValueType.FLOAT32: "f32",
    GGUFValueType.FLOAT64: "f64", GGUFValueType.BOOL: "bool",
}
_STRING, _ARRAY = GGUFValueType.STRING, GGUFValueType.ARRAY
_KEEP_ARRAY = 64  # arrays up to this many items are decoded; longer ones are summarised
_QUANT_IN_NAME = re.compile(r"(?i)(?<![a-z0-9])(i?q\d_(?:k_[sml]|k|\d|[a-z]+)|bf16|f16|f32)")


class GGUFError(Exception):
    """Not a GGUF file, or a truncated or corrupt header; the message is one line."""


@dataclass(frozen=True)
class ArraySummary:
    """A long metadata array, described instead of decoded."""

    item_type: str
    count: int

    def __str__(self) -> str:
        return f"[{self.count} x {self.item_type}]"


@dataclass(frozen=True)
class GGUFInfo:
    """What a GGUF header says about a model."""

    path: str
    file_size: int
    version: int
    tensor_count: int
    parameters: int
    metadata: dict[str, Any] = field(repr=False)
    quantization: str | None = None
    special_tokens: dict[str, tuple[int, str]] = field(default_factory=dict)
    # Bytes the file needs to hold every tensor's data (None: a tensor type we cannot size).
    required_size: int | None = None

    @property
    def truncated(self) -> bool:
        """The file ends before the tensor data its header describes (a cut download)."""
        return self.required_size is not None and self.file_size < self.required_size

    @property
    def architecture(self) -> str | None:
        """general.architecture, e.g. "llama", "gemma3"."""
        value = self.metadata.get("general.architecture")
        return value if isinstance(value, str) else None

    def arch_value(self, key: str) -> Any:
        """A per-architecture key such as "context_length" ("<arch>.context_length")."""
        return self.metadata.get(f"{self.architecture}.{key}") if self.architecture else None

    @property
    def context_length(self) -> int | None:
        """The training context length."""
        value = self.arch_value("context_length")
        return value if isinstance(value, int) else None

    @property
    def chat_template(self) -> str | None:
        """tokenizer.chat_template, if the file carries one."""
        value = self.metadata.get("tokenizer.chat_template")
        return value if isinstance(value, str) and value.strip() else None

    @property
    def name(self) -> str | None:
        """general.name."""
        value = self.metadata.get("general.name")
        return value if isinstance(value, str) else None

    def kv_bytes_per_token(self) -> int | None:
        """f16 KV-cache bytes one context token costs on every layer (an estimate)."""
        layout = self.kv_layout()
        return layout.full_bytes + layout.swa_bytes if layout else None

    def kv_layout(self) -> KVLayout | None:
        """KV-cache elements per token (K and V apart, as their types may differ), split into
        layers that cache every position and sliding-window layers (None: the header lacks
        the attention shape)."""
        layers = self.arch_value("block_count")
        embd = self.arch_value("embedding_length")
        heads = _max_int(self.arch_value("attention.head_count"))
        if not isinstance(layers, int) or layers <= 0 or not heads:
            return None
        kv_heads = _per_layer(self.arch_value("attention.head_count_kv"), layers, heads)
        head_dim = embd // heads if isinstance(embd, int) else None
        k_len = self.arch_value("attention.key_length") or head_dim
        v_len = self.arch_value("attention.value_length") or head_dim
        if not isinstance(k_len, int) or not isinstance(v_len, int):
            return None
        window = self.arch_value("attention.sliding_window")
        swa = _swa_layers(self, layers) if isinstance(window, int) and window > 0 else set()
        full = [n for i, n in enumerate(kv_heads) if i not in swa]
        windowed = [n for i, n in enumerate(kv_heads) if i in swa]
        return KVLayout(
            full_k=sum(full) * k_len, full_v=sum(full) * v_len,
            swa_k=sum(windowed) * k_len, swa_v=sum(windowed) * v_len,
            window=window if swa and isinstance(window, int) else 0,
        )


def kv_type_size(name: str) -> tuple[int, int]:
    """(elements per block, bytes per block) of a KV cache type by llama-server's name: f16
    (1, 2), q8_0 (32, 34), q4_0 (32, 18), ... KeyError for a name ggml does not have."""
    return TYPE_SIZES[GGMLQuantizationType[name.upper()]]


def kv_type_bytes(elements: int, name: str) -> int:
    """Bytes of `elements` values of KV cache type `name` (whole blocks: llama.cpp requires
    head sizes that are multiples of the block for quantized caches)."""
    block, size = kv_type_size(name)
    return -(-elements // block) * size


@dataclass(frozen=True)
class KVLayout:
    """KV-cache elements per context token, K and V apart: layers caching every position,
    and sliding-window layers, which llama.cpp's iSWA cache gives only the window's cells.
    Bytes follow from the cache types (f16: 2 per element, q8_0: 34 per 32, ...)."""

    full_k: int
    full_v: int
    swa_k: int = 0
    swa_v: int = 0
    window: int = 0  # tokens the sliding-window layers attend to (0: none)

    @property
    def full_bytes(self) -> int:
        """f16 bytes per token on the layers caching every position."""
        return 2 * (self.full_k + self.full_v)

    @property
    def swa_bytes(self) -> int:
        """f16 bytes per token on the sliding-window layers."""
        return 2 * (self.swa_k + self.swa_v)

    def bytes_for(self, n_ctx: int, *, swa_full: bool, n_seq: int = 1, n_ubatch: int = 512,
                  type_k: str = "f16", type_v: str = "f16") -> int:
        """The cache's bytes for n_ctx cells of K type_k and V type_v. A windowed layer holds
        n_swa * n_seq + n_ubatch cells (llama_kv_cache_iswa), unless swa_full keeps every
        position there too."""
        swa_cells = n_ctx
        if not swa_full and self.window:
            swa_cells = min(n_ctx, self.window * n_seq + n_ubatch)
        return (kv_type_bytes(self.full_k * n_ctx, type_k)
                + kv_type_bytes(self.full_v * n_ctx, type_v)
                + kv_type_bytes(self.swa_k * swa_cells, type_k)
                + kv_type_bytes(self.swa_v * swa_cells, type_v))


# NOTE: llama.cpp hard-codes these architectures' layer patterns (set_swa_pattern: every
# n-th layer is global); files may instead carry attention.sliding_window_pattern.
_SWA_PATTERNS = {"gemma2": 2, "gemma3": 6, "cohere2": 4, "gpt-oss": 2}


def _swa_layers(info: GGUFInfo, layers: int) -> set[int]:
    """Indices of the sliding-window layers; an unknown pattern counts none (conservative)."""
    pattern = info.arch_value("attention.sliding_window_pattern")
    if isinstance(pattern, list) and len(pattern) == layers:
        return {i for i, windowed in enumerate(pattern) if windowed}
    every = pattern if isinstance(pattern, int) else _SWA_PATTERNS.get(info.architecture or "")
    if not every or every < 2:
        return set()
    return {i for i in range(layers) if i % every < every - 1}


def _per_layer(value: Any, layers: int, default: int) -> list[int]:
    """A per-layer count (an int, or an array with one per layer; 0 = no attention there)."""
    if isinstance(value, list) and len(value) == layers and all(isinstance(v, int) for v in value):
        return list(value)
    return [_max_int(value) or default] * layers


def _max_int(value: Any) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, list):
        ints = [v for v in value if isinstance(v, int)]
        return max(ints) if ints else None
    return None


def parameters_label(count: int) -> str:
    """1234567 -> "1.2M", 1_500_000_000 -> "1.5B"."""
    for unit, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if count >= scale:
            return f"{count / scale:.1f}{unit}".replace(".0", "")
    return str(count)


def quant_from_filename(filename: str) -> str | None:
    """The quantization named in a file name ("...-Q4_K_M.gguf" -> "Q4_K_M"), if any."""
    found = _QUANT_IN_NAME.findall(Path(filename).stem)
    return found[-1].upper() if found else None


class _Reader:
    def __init__(self, buf: mmap.mmap, size: int, version: int):
        self.buf = buf
        self.size = size
        self.pos = 0
        self.wide = version >= 2

    def need(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(f"truncated header at byte {self.pos}")

    def scalar(self, fmt: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def count(self) -> int:
        return int(self.scalar("<Q" if self.wide else "<I"))

    def string(self) -> str:
        n = self.count()
        self.need(n)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        n = self.count()
        self.need(n)
        self.pos += n

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type = self.scalar("<I")
            n = self.count()
            if n <= _KEEP_ARRAY:
                return [self.value(item_type) for _ in range(n)]
            self.skip_array(item_type, n)
            return ArraySummary(_type_name(item_type), n)
        raise GGUFError(f"unknown value type {vtype} at byte {self.pos}")

    def skip_array(self, item_type: int, n: int) -> None:
        if item_type in _SCALARS:
            width = struct.calcsize(_SCALARS[item_type])
            self.need(width * n)
            self.pos += width * n
        elif item_type == _STRING:
            for _ in range(n):
                self.skip_string()
        else:
            for _ in range(n):
                self.value(item_type)


def _type_name(vtype: int) -> str:
    return _ITEM_NAMES.get(vtype, "int")


def read_gguf(path: Path) -> GGUFInfo:
    """Parse the header of a GGUF file (metadata, tensor shapes); raises GGUFError."""
    try:
        with path.open("rb") as f:
            size = path.stat().st_size
            if size < 24:
                raise GGUFError(f"{path.name} is not a GGUF file (only {size} bytes)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(path, buf, size)
    except OSError as exc:
        raise GGUFError(f"cannot read {path.name}: {exc.strerror or exc}") from exc
    except (ValueError, OverflowError, MemoryError) as exc:
        raise GGUFError(f"corrupt GGUF header in {path.name}: {exc}") from exc


def _parse(path: Path, buf: mmap.mmap, size: int) -> GGUFInfo:
    if buf[:4] != b"GGUF":
        raise GGUFError(f"{path.name} is not a GGUF file (bad magic {bytes(buf[:4])!r})")
    (version,) = struct.unpack_from("<I", buf, 4)
    if version not in (1, 2, 3):
        raise GGUFError(f"{path.name}: unsupported GGUF version {version} (big-endian file?)")
    r = _Reader(buf, size, version)
    r.pos = 8
    tensor_count, kv_count = r.count(), r.count()
    if kv_count > size or tensor_count > size:
        raise GGUFError(f"corrupt GGUF header in {path.name}: implausible counts")
    metadata: dict[str, Any] = {}
    tokens_at: int | None = None
    for _ in range(kv_count):
        key = r.string()
        vtype = r.scalar("<I")
        if key == "tokenizer.ggml.tokens" and vtype == _ARRAY:
            tokens_at = r.pos
        metadata[key] = r.value(vtype)
    parameters = 0
    tensor_types: Counter[int] = Counter()
    data_end: int | None = 0  # end of the last tensor's data, relative to the data section
    for _ in range(tensor_count):
        r.skip_string()
        n_dims = r.scalar("<I")
        if n_dims > 8:
            raise GGUFError(f"corrupt GGUF header in {path.name}: tensor with {n_dims} dims")
        elements = 1
        for _ in range(n_dims):
            elements *= r.scalar("<Q")
        ggml_type = r.scalar("<I")
        offset = r.scalar("<Q")
        parameters += elements
        if n_dims >= 2:
            tensor_types[ggml_type] += elements
        block = TYPE_SIZES.get(ggml_type)
        if block is None or data_end is None:
            data_end = None
        else:
            data_end = max(data_end, offset + -(-elements // block[0]) * block[1])
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0:
        alignment = _DEFAULT_ALIGNMENT
    data_start = -(-r.pos // alignment) * alignment
    return GGUFInfo(
        path=str(path),
        file_size=size,
        version=version,
        tensor_count=tensor_count,
        parameters=parameters,
        metadata=metadata,
        quantization=_quantization(metadata, tensor_types) or quant_from_filename(path.name),
        special_tokens=_special_tokens(r, metadata, tokens_at),
        required_size=None if data_end is None or not tensor_count else data_start + data_end,
    )


def _quantization(metadata: dict[str, Any], tensor_types: Counter[int]) -> str | None:
    ftype = metadata.get("general.file_type")
    if isinstance(ftype, int):
        name = _enum_name(LlamaFileType, ftype & ~LlamaFileType.GUESSED)
        if name:  # the name llama.cpp prints: "MOSTLY_Q4_K_M" -> "Q4_K_M", "ALL_F32" -> "F32"
            return name.removeprefix("MOSTLY_").removeprefix("ALL_")
    if tensor_types:  # files without general.file_type: the commonest matrix type
        return _enum_name(GGMLQuantizationType, tensor_types.most_common(1)[0][0])
    return None


def _enum_name(kind: type[IntEnum], value: int) -> str | None:
    try:
        return kind(value).name
    except ValueError:
        return None


def _special_tokens(
    r: _Reader, metadata: dict[str, Any], tokens_at: int | None
) -> dict[str, tuple[int, str]]:
    """{"bos": (id, text), ...} from tokenizer.ggml.*_token_id and the vocabulary."""
    ids: dict[str, int] = {}
    for key, value in metadata.items():
        special = key.startswith("tokenizer.ggml.") and key.endswith("_token_id")
        if special and isinstance(value, int) and value >= 0:
            ids[key.removeprefix("tokenizer.ggml.").removesuffix("_token_id")] = value
    texts: dict[int, str] = {}
    tokens = metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list):
        texts = {i: t for i, t in enumerate(tokens) if isinstance(t, str)}
    elif tokens_at is not None and ids:
        r.pos = tokens_at
        item_type, n = r.scalar("<I"), r.count()
        wanted = set(ids.values())
        if item_type == _STRING:
            for i in range(min(n, max(wanted) + 1)):
                if i in wanted:
                    texts[i] = r.string()
                else:
                    r.skip_string()
    return {name: (tid, texts.get(tid, "")) for name, tid in sorted(ids.items())}
