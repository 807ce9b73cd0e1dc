"""PrefixCache: restore the longest cached prefix before a request, save new blocks after it.

Keys (all prefixed by nothing but their kind letter, and rooted in the model fingerprint):
  <block key>       KV of tokens [i*B, (i+1)*B), chained: the key names the whole prefix
  t<tail key>       KV of a partial last block: the exact end of a saved sequence
  w<end key>        sliding-window models only: the SWA cache's window at that end
  m<fingerprint>    b"swa" or b"full": how this model's state is laid out
Conversations that share a system prompt share its blocks: each block is stored once.
A prompt-cache partition (llmserve/tenancy.py: per API key, per cache_salt) has a root of its
own, the fingerprint salted: no key of one partition is ever found from another.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from llmserve.cache import kvstate
from llmserve.cache.prefix import block_keys, tail_key
from llmserve.cache.store import DiskTier, RamTier
from llmserve.engine.base import Engine, StatefulEngine, common_prefix
from llmserve.tenancy import salted

logger = logging.getLogger(__name__)

CacheMode = Literal["tiered", "ram", "llama_disk", "off"]


@dataclass(frozen=True)
class Match:
    """What the cache holds for a prompt: `tokens` restorable from these keys."""

    tokens: int
    blocks: list[str]
    tail: str | None
    window: str | None


@dataclass(frozen=True)
class PartitionKeys:
    """A model's cache keys in one partition (llmserve/tenancy.py): what match, peek, pin and
    uncached read of an engine (a sequence's view salts its own fingerprint)."""

    info: Any
    fingerprint: str


def in_partition(engine: Engine, partition: str) -> Engine:
    """engine as the cache keys it for a request of `partition` ("" : engine itself)."""
    fp = str(getattr(engine, "fingerprint", "") or "")
    if not partition or not fp:
        return engine
    return PartitionKeys(engine.info, salted(fp, partition))  # type: ignore[return-value]


class PrefixCache:
    """The prompt cache of one server process (RAM tier, disk tier, or llama-cpp-python's)."""

    def __init__(
        self,
        mode: CacheMode,
        directory: Path,
        ram_bytes: int,
        disk_bytes: int,
        block_tokens: int = 64,
    ):
        self.mode = mode
        self.block = block_tokens
        self.directory = directory
        self.ram = RamTier(ram_bytes) if mode in ("tiered", "ram") else None
        self._disk: DiskTier | None = None
        self._disk_bytes = disk_bytes
        self.llama_disk_bytes = disk_bytes
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="llmserve-cache-writer")
        self._broken: set[str] = set()  # fingerprints whose state layout we cannot split
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.tokens_reused = 0
        self.tokens_evaluated = 0
        self.restore_seconds = 0.0

    # -- storage ---------------------------------------------------------------------------

    @property
    def disk(self) -> DiskTier | None:
        """The disk tier, opened on first use (a server whose engine has no KV state, like
        the tests' fake one, never creates files)."""
        if self._disk is None and self.mode == "tiered":
            with self._lock:
                if self._disk is None:
                    self._disk = DiskTier(self.directory / "kv", self._disk_bytes)
        return self._disk

    def _has(self, key: str) -> bool:
        return bool(
            (self.ram is not None and key in self.ram) or (self.disk is not None and key in self.disk)
        )

    def _get(self, key: str) -> bytes | None:
        value = self.ram.get(key) if self.ram is not None else None
        if value is None and self.disk is not None:
            value = self.disk.get(key)
            if value is not None and self.ram is not None:
                self.ram.put(key, value)
        return value

    def _put(self, key: str, value: bytes) -> None:
        if self.ram is not None:
            self.ram.put(key, value)
        if self.disk is not None:
            # NOTE: disk writes run on their own thread, off the engine thread.
            self._writer.submit(self._disk_put, key, value)

    def _disk_put(self, key: str, value: bytes) -> None:
        assert self.disk is not None
        try:
            self.disk.put(key, value)
        except Exception:
            logger.exception("prompt cache: writing %s failed", key)

    def flush(self) -> None:
        """Wait for queued disk writes."""
        self._writer.submit(lambda: None).result()

    # -- lookup ----------------------------------------------------------------------------

    def _stateful(self, engine: Engine) -> StatefulEngine | None:
        # NOTE: duck-typed: a batched engine's per-sequence view has the stateful methods.
        if self.mode in ("off", "llama_disk") or not getattr(engine, "fingerprint", ""):
            return None
        if engine.fingerprint in self._broken:  # type: ignore[attr-defined]
            return None
        return engine  # type: ignore[return-value]

    def match(self, engine: Engine, tokens: list[int]) -> Match:
        """The longest restorable cached prefix of tokens (no loading, no scanning)."""
        none = Match(0, [], None, None)
        stateful = self._stateful(engine)
        if stateful is None:
            return none
        fp = stateful.fingerprint
        layout = self._get("m" + fp)
        if layout is None:
            return none
        keys = block_keys(fp, tokens, self.block)
        n_full = 0
        for key in keys:
            if not self._has(key):
                break
            n_full += 1
        # candidate ends, longest first: a saved sequence end inside the next block, then blocks
        candidates: list[tuple[int, int, str | None]] = []
        parent = keys[n_full - 1] if n_full else fp
        start = n_full * self.block
        for t in range(min(self.block - 1, len(tokens) - start), 0, -1):
            key = tail_key(parent, tokens[start : start + t])
            if self._has(key):
                candidates.append((start + t, n_full, key))
        candidates += [(i * self.block, i, None) for i in range(n_full, 0, -1)]
        for end, n_blocks, tail in candidates:
            if layout != b"swa":
                return Match(end, keys[:n_blocks], tail, None)
            end_key = tail or keys[n_blocks - 1]
            if self._has("w" + end_key):
                return Match(end, keys[:n_blocks], tail, "w" + end_key)
        return none

    def uncached(self, engine: Engine, tokens: list[int]) -> int:
        """Tokens of this prompt that saving it would newly store (its missing blocks and end)."""
        stateful = self._stateful(engine)
        if stateful is None:
            return 0
        keys, tail, _ = self._end(stateful.fingerprint, tokens)
        n = sum(self.block for key in keys if not self._has(key))
        if tail is not None and not self._has(tail):
            n += len(tokens) - len(keys) * self.block
        return n

    def pin(self, engine: Engine, tokens: list[int], seconds: float) -> int:
        """Keep the blocks of this prefix (and its end, with a window there) in RAM past
        every unpinned entry for `seconds` (Anthropic's cache_control); returns tokens pinned.

        NOTE: the RAM tier only: the disk tier stays plain LRU (diskcache culls by its own
        index), so a pinned block the disk dropped still serves from RAM."""
        stateful = self._stateful(engine)
        if stateful is None or self.ram is None or not tokens:
            return 0
        keys, tail, _ = self._end(stateful.fingerprint, tokens)
        ends = [*keys, *([tail] if tail else [])]
        # NOTE: with the layout entry, without which no block is restorable
        self.ram.pin(["m" + stateful.fingerprint, *ends, *("w" + k for k in ends)], seconds)
        return len(tokens)

    # -- request hooks (engine thread) -----------------------------------------------------

    def prepare(self, engine: Engine, tokens: list[int]) -> int:
        """Before evaluating tokens: restore the best cached prefix; returns tokens reused."""
        if self.mode == "off":
            if hasattr(engine, "reset"):
                engine.reset()
            return 0
        if self.mode == "llama_disk":
            reused = int(engine.llama_disk_restore(tokens, self.directory, self.llama_disk_bytes))  # type: ignore[attr-defined]
            return self.count_reuse(reused)
        stateful = self._stateful(engine)
        if stateful is None:
            return 0
        live = common_prefix(stateful.live_tokens(), tokens)
        found = self.match(stateful, tokens)
        if found.tokens > live and self._restore(stateful, tokens, found):
            return self.count_reuse(found.tokens)
        return self.count_reuse(live)

    def peek(self, engine: Engine, tokens: list[int], live: int) -> int:
        """/restore_cache dry run: prompt tokens a request would reuse (live: in a slot)."""
        if self.mode == "off":
            return 0
        return max(self.match(engine, tokens).tokens, live)

    def count_reuse(self, reused: int) -> int:
        """Count a request's reused prompt tokens (0: a miss)."""
        if reused:
            self.hits += 1
            self.tokens_reused += reused
        else:
            self.misses += 1
        return reused

    def _restore(self, engine: StatefulEngine, tokens: list[int], found: Match) -> bool:
        start = time.perf_counter()
        keys = found.blocks + ([found.tail] if found.tail else [])
        payloads = [self._get(k) for k in keys]
        window = self._get(found.window) if found.window else None
        if any(p is None for p in payloads) or (found.window and window is None):
            return False  # evicted or corrupted since match(): evaluate instead
        try:
            blocks = [kvstate.parse(p)[0] for p in payloads if p is not None]
            blob = kvstate.compose(blocks, kvstate.parse(window) if window else [])
        except kvstate.StateFormatError as exc:
            logger.warning("prompt cache: unusable entry (%s); evaluating instead", exc)
            return False
        ok = engine.set_state(blob, tokens[: found.tokens])
        self.restore_seconds = time.perf_counter() - start
        if ok:
            logger.debug("restored %d tokens in %.3f s", found.tokens, self.restore_seconds)
        return ok

    def _end(self, fp: str, tokens: list[int]) -> tuple[list[str], str | None, str]:
        """Block keys of tokens, the key of their partial last block, and of their end."""
        keys = block_keys(fp, tokens, self.block)
        n_full = len(keys) * self.block
        parent = keys[-1] if keys else fp
        tail = tail_key(parent, tokens[n_full:]) if len(tokens) > n_full else None
        return keys, tail, tail or parent

    def after_prompt(self, engine: Engine, prompt: list[int]) -> None:
        """At the first token: the context holds exactly the prompt. Sliding-window models
        can only be restored where their window was saved, so save it here (a few MB)."""
        stateful = self._stateful(engine)
        if stateful is None or self._get("m" + stateful.fingerprint) != b"swa":
            return
        _, _, end = self._end(stateful.fingerprint, prompt)
        if not self._has("w" + end):
            self._put("w" + end, stateful.get_state(window_only=True))

    def save(self, engine: Engine, prompt: list[int] | None = None) -> None:
        """After a request: store what the cache lacks of the live sequence (and of the
        prompt's end, so the same prompt again is a full hit)."""
        if self.mode == "llama_disk":
            engine.llama_disk_save(self.directory, self.llama_disk_bytes)  # type: ignore[attr-defined]
            return
        stateful = self._stateful(engine)
        if stateful is None:
            return
        try:
            self._save(stateful, prompt or [])
        except kvstate.StateFormatError as exc:
            logger.warning("prompt cache off for %s: %s", engine.info.name, exc)
            self._broken.add(stateful.fingerprint)

    def _save(self, engine: StatefulEngine, prompt: list[int]) -> None:
        fp = engine.fingerprint
        seq = engine.live_tokens()
        if not seq:
            return
        keys, tail, end = self._end(fp, seq)
        tails = [(len(keys) * self.block, len(seq), tail)] if tail else []
        if prompt and len(prompt) < len(seq) and seq[: len(prompt)] == prompt:
            p_keys, p_tail, _ = self._end(fp, prompt)
            if p_tail:
                tails.append((len(p_keys) * self.block, len(prompt), p_tail))
        layout = self._get("m" + fp)
        missing = [i for i, k in enumerate(keys) if not self._has(k)]
        tails = [t for t in tails if not self._has(t[2])]
        need_window = layout != b"full" and not self._has("w" + end)
        if not missing and not tails and not need_window:
            return
        sections = kvstate.parse(engine.get_state())
        base = sections[0]
        if base.n_cells != len(seq):
            raise kvstate.StateFormatError(f"{base.n_cells} cells for {len(seq)} tokens")
        if layout is None or (self.disk is not None and "m" + fp not in self.disk):
            # NOTE: also after a fresh disk index replaced a damaged one (RAM still has it)
            self._put("m" + fp, b"swa" if len(sections) > 1 else b"full")
        for i in missing:
            piece = base.between(i * self.block, (i + 1) * self.block)
            self._put(keys[i], kvstate.serialize([piece]))
        for start, stop, key in tails:
            self._put(key, kvstate.serialize([base.between(start, stop)]))
        if len(sections) > 1 and need_window:
            self._put("w" + end, kvstate.serialize(sections[1:]))

    # -- preemption (engine thread) --------------------------------------------------------

    def swap_out(self, engine: Engine) -> bool:
        """A preempted sequence's KV into the tiers (whatever mode the prompt cache is in
        for requests); False when this engine's state cannot be stored (evaluate again)."""
        stateful = self._swappable(engine)
        if stateful is None:
            return False
        try:
            self._save(stateful, [])
        except kvstate.StateFormatError as exc:
            logger.warning("prompt cache off for %s: %s", engine.info.name, exc)
            self._broken.add(stateful.fingerprint)
            return False
        return True

    def swap_in(self, engine: Engine, tokens: list[int]) -> int:
        """Restore what swap_out stored of `tokens` (the longest stored prefix; not counted
        as a cache hit); returns the tokens restored."""
        stateful = self._swappable(engine)
        if stateful is None:
            return 0
        found = self.match(stateful, tokens)
        if found.tokens and self._restore(stateful, tokens, found):
            return found.tokens
        return 0

    def _swappable(self, engine: Engine) -> StatefulEngine | None:
        # NOTE: swapping needs the RAM tier; with --prompt_cache off or llama_disk a
        # preempted sequence is evaluated again instead.
        if self.ram is None or not getattr(engine, "fingerprint", ""):
            return None
        if engine.fingerprint in self._broken:  # type: ignore[attr-defined]
            return None
        return engine  # type: ignore[return-value]

    # -- admin -----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Entries and bytes per tier, hits, misses, tokens reused."""
        return {
            "mode": self.mode,
            "block_tokens": self.block,
            "ram": None if self.ram is None else {
                "entries": len(self.ram), "bytes": self.ram.bytes, "capacity": self.ram.capacity,
            },
            "disk": None if self.disk is None else {
                "entries": len(self.disk), "bytes": self.disk.bytes,
                "directory": str(self.disk.directory),
            },
            "hits": self.hits,
            "misses": self.misses,
            "tokens_reused": self.tokens_reused,
            "tokens_evaluated": self.tokens_evaluated,
        }

    def clear(self) -> None:
        """Drop every entry of both tiers."""
        self.flush()
        if self.ram is not None:
            self.ram.clear()
        if self.disk is not None:
            self.disk.clear()

    def close(self) -> None:
        """Finish disk writes and close the disk tier."""
        self._writer.shutdown(wait=True)
        if self._disk is not None:
            self._disk.close()
