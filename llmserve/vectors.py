"""Embeddings: the result of an embeddings request, whichever backend computed it (plain
data; imports nothing of ours)."""

from __future__ import annotations

import base64
import math
import struct
from dataclasses import dataclass


@dataclass(frozen=True)
class Embeddings:
    """Unit-length float32 vectors, one per input, and the tokens they took."""

    model: str
    vectors: list[bytes]  # little-endian float32, what base64 encodes
    prompt_tokens: int

    def floats(self, index: int) -> list[float]:
        """Vector `index` as floats (exactly the float32 values base64 carries)."""
        raw = self.vectors[index]
        return list(struct.unpack(f"<{len(raw) // 4}f", raw))

    def base64(self, index: int) -> str:
        """Vector `index` as OpenAI's base64 encoding_format."""
        return base64.b64encode(self.vectors[index]).decode("ascii")


def unit_float32(vector: list[float]) -> bytes:
    """A vector scaled to unit length, as little-endian float32."""
    norm = math.sqrt(sum(x * x for x in vector))
    scaled = [x / norm for x in vector] if norm > 0 else vector
    return struct.pack(f"<{len(scaled)}f", *scaled)
