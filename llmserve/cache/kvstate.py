"""Split and join llama.cpp sequence-state blobs (llama_state_seq_get_data) by token position.

A blob is a header (u32 magic 0xaf143cd8, i32 seq_id) and one section per KV cache (two for sliding-window models: base, then SWA), each:
  u32 n_stream; per stream: u32 cell_count, then per cell (i32 pos, u32 n_seq_id, [ext],
  i32 seq_id), then u32 v_trans, u32 n_layer, per layer (i32 k_type, u64 k_row, K rows),
  then per layer either (i32 v_type, u64 v_row, V rows) or, transposed,
  (i32 v_type, u32 v_el, u32 n_embd_v, n_embd_v rows of cell_count elements).
NOTE: this mirrors llama_kv_cache::state_write_meta/state_write_data of the vendored
llama.cpp; anything that does not parse exactly raises StateFormatError and the cache stays
off for that model instead of guessing.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Bytes2D = npt.NDArray[np.uint8]
MAGIC = 0xAF143CD8


class StateFormatError(ValueError):
    """The blob is not in the layout this module understands."""


@dataclass
class LayerK:
    k_type: int
    rows: Bytes2D  # (cells, k_row)


@dataclass
class LayerV:
    v_type: int
    el: int  # element size (transposed) or row size (not transposed)
    data: Bytes2D  # (cells, row) or, transposed, (n_embd_v, cells * el)


@dataclass
class Section:
    """One KV cache's cells for one sequence, sorted by position."""

    meta: Bytes2D  # (cells, meta_size)
    v_trans: bool
    k: list[LayerK]
    v: list[LayerV]

    @property
    def n_cells(self) -> int:
        return int(self.meta.shape[0])

    def positions(self) -> npt.NDArray[np.int32]:
        """Token position of every cell."""
        return np.ascontiguousarray(self.meta[:, :4]).view(np.int32).reshape(-1)

    def take(self, index: npt.NDArray[np.intp]) -> Section:
        """The cells at `index`, in that order."""
        v: list[LayerV] = []
        for layer in self.v:
            if self.v_trans:
                n_embd = layer.data.shape[0]
                cells = layer.data.reshape(n_embd, -1, layer.el)[:, index, :]
                v.append(LayerV(layer.v_type, layer.el, cells.reshape(n_embd, -1)))
            else:
                v.append(LayerV(layer.v_type, layer.el, layer.data[index]))
        return Section(
            self.meta[index], self.v_trans, [LayerK(k.k_type, k.rows[index]) for k in self.k], v
        )

    def between(self, start: int, end: int) -> Section:
        """Cells whose positions are in [start, end) (views, no copy: cells are sorted)."""
        pos = self.positions()
        lo, hi = (int(i) for i in np.searchsorted(pos, [start, end]))
        v: list[LayerV] = []
        for layer in self.v:
            if self.v_trans:
                v.append(LayerV(layer.v_type, layer.el, layer.data[:, lo * layer.el : hi * layer.el]))
            else:
                v.append(LayerV(layer.v_type, layer.el, layer.data[lo:hi]))
        k = [LayerK(layer.k_type, layer.rows[lo:hi]) for layer in self.k]
        return Section(self.meta[lo:hi], self.v_trans, k, v)

    def to_bytes(self) -> bytes:
        """Serialize as a one-stream section llama.cpp can read."""
        parts = [struct.pack("<II", 1, self.n_cells)]
        if self.n_cells == 0:
            return b"".join(parts)
        parts.append(self.meta.tobytes())
        parts.append(struct.pack("<II", int(self.v_trans), len(self.k)))
        for k in self.k:
            parts.append(struct.pack("<iQ", k.k_type, k.rows.shape[1]))
            parts.append(k.rows.tobytes())
        for v in self.v:
            if self.v_trans:
                parts.append(struct.pack("<iII", v.v_type, v.el, v.data.shape[0]))
            else:
                parts.append(struct.pack("<iQ", v.v_type, v.el))
            parts.append(v.data.tobytes())
        return b"".join(parts)


def join(sections: list[Section]) -> Section:
    """Concatenate sections (consecutive position ranges) into one."""
    if not sections:
        raise StateFormatError("nothing to join")
    first = sections[0]
    k = [
        LayerK(layer.k_type, np.concatenate([s.k[i].rows for s in sections]))
        for i, layer in enumerate(first.k)
    ]
    axis = 1 if first.v_trans else 0
    v = [
        LayerV(layer.v_type, layer.el, np.concatenate([s.v[i].data for s in sections], axis))
        for i, layer in enumerate(first.v)
    ]
    return Section(np.concatenate([s.meta for s in sections]), first.v_trans, k, v)


class _Reader:
    def __init__(self, buf: memoryview):
        self.buf = buf
        self.off = 0

    def unpack(self, fmt: str) -> tuple[int, ...]:
        size = struct.calcsize(fmt)
        if self.off + size > len(self.buf):
            raise StateFormatError("truncated state")
        values = struct.unpack_from(fmt, self.buf, self.off)
        self.off += size
        return values

    def array(self, rows: int, cols: int) -> Bytes2D:
        size = rows * cols
        if self.off + size > len(self.buf):
            raise StateFormatError("truncated state")
        out = np.frombuffer(self.buf, np.uint8, size, self.off).reshape(rows, cols)
        self.off += size
        return out


def _parse_section(r: _Reader, meta_size: int) -> Section:
    (n_stream,) = r.unpack("<I")
    if n_stream != 1:
        raise StateFormatError(f"{n_stream} KV streams; only one is supported")
    (cells,) = r.unpack("<I")
    if cells == 0:
        empty = np.zeros((0, meta_size), np.uint8)
        return Section(empty, False, [], [])
    meta = r.array(cells, meta_size)
    n_seq = np.ascontiguousarray(meta[:, 4:8]).view(np.uint32)
    if not np.all(n_seq == 1):
        raise StateFormatError("cells shared by several sequences")
    v_trans, n_layer = r.unpack("<II")
    if v_trans > 1 or not 0 < n_layer < 4096:
        raise StateFormatError("implausible layer header")
    k = []
    for _ in range(n_layer):
        k_type, k_row = r.unpack("<iQ")
        k.append(LayerK(k_type, r.array(cells, k_row)))
    v = []
    for _ in range(n_layer):
        if v_trans:
            v_type, el, n_embd = r.unpack("<iII")
            v.append(LayerV(v_type, el, r.array(n_embd, cells * el)))
        else:
            v_type, row = r.unpack("<iQ")
            v.append(LayerV(v_type, row, r.array(cells, row)))
    section = Section(meta, bool(v_trans), k, v)
    pos = section.positions()
    if np.all(pos[1:] > pos[:-1]):
        return section
    return section.take(np.argsort(pos, kind="stable"))


def parse(blob: bytes) -> list[Section]:
    """Sections of a sequence-state blob, cells sorted by position."""
    # NOTE: models with per-cell extensions (M-RoPE) write 12 more bytes of meta per cell;
    # the layout has no flag for it, so try both and keep the one that parses exactly.
    last: StateFormatError | None = None
    for meta_size in (12, 24):
        r = _Reader(memoryview(blob))
        try:
            magic, _seq = r.unpack("<Ii")
            if magic != MAGIC:
                raise StateFormatError("not a sequence state (bad magic)")
            sections = []
            while r.off < len(blob):
                sections.append(_parse_section(r, meta_size))
            if sections and 1 <= len(sections) <= 2:
                return sections
            last = StateFormatError(f"{len(sections)} sections")
        except StateFormatError as exc:
            last = exc
    raise last or StateFormatError("empty state")


def serialize(sections: list[Section]) -> bytes:
    """A blob llama_state_seq_set_data accepts."""
    return struct.pack("<Ii", MAGIC, 0) + b"".join(s.to_bytes() for s in sections)


def compose(blocks: list[Section], extra: list[Section]) -> bytearray:
    """serialize([join(blocks), *extra]) writing each byte once (restores are latency-bound)."""
    first = blocks[0]
    n = sum(b.n_cells for b in blocks)
    meta_size = first.meta.shape[1]
    size = 8 + 8 + n * meta_size + 8
    size += sum(12 + n * k.rows.shape[1] for k in first.k)
    if first.v_trans:
        size += sum(12 + v.data.shape[0] * n * v.el for v in first.v)
    else:
        size += sum(12 + n * v.el for v in first.v)
    tail = b"".join(e.to_bytes() for e in extra)
    out = bytearray(size + len(tail))
    buf = np.frombuffer(out, np.uint8)
    off = 0

    def put(data: bytes) -> None:
        nonlocal off
        out[off : off + len(data)] = data
        off += len(data)

    def rows(arrays: list[Bytes2D], width: int) -> None:
        nonlocal off
        dst = buf[off : off + n * width].reshape(n, width)
        row = 0
        for a in arrays:
            dst[row : row + a.shape[0]] = a
            row += a.shape[0]
        off += n * width

    put(struct.pack("<IiII", MAGIC, 0, 1, n))
    rows([b.meta for b in blocks], meta_size)
    put(struct.pack("<II", int(first.v_trans), len(first.k)))
    for i, layer in enumerate(first.k):
        width = layer.rows.shape[1]
        put(struct.pack("<iQ", layer.k_type, width))
        rows([b.k[i].rows for b in blocks], width)
    for i, v in enumerate(first.v):
        if first.v_trans:
            n_embd = v.data.shape[0]
            put(struct.pack("<iII", v.v_type, v.el, n_embd))
            dst = buf[off : off + n_embd * n * v.el].reshape(n_embd, n * v.el)
            col = 0
            for b in blocks:
                part = b.v[i].data
                dst[:, col : col + part.shape[1]] = part
                col += part.shape[1]
            off += n_embd * n * v.el
        else:
            put(struct.pack("<iQ", v.v_type, v.el))
            rows([b.v[i].data for b in blocks], v.el)
    put(tail)
    if off != len(out):
        raise StateFormatError("composed state size mismatch")
    return out
