"""``hal.BlockManager``: a pure-Python paged-KV block allocator with hash-based prefix caching.

It hands out the blocks of a ``hal.KVCache`` (ids ``0..num_blocks-1``, none reserved) to sequences
and turns token positions into cache slots: token ``t`` of a sequence lives in its block
``t // block_size`` at offset ``t % block_size``, slot ``block_id * block_size + offset``. It never
touches a device; the tensors it returns are small host-side index tensors.

Sharing and copy-on-write
    ``fork`` shares the parent's *full* blocks (refcount + 1) and gives the child a fresh copy of a
    partial last block, returned as ``(src, dst)`` for ``cache.copy_blocks``. Prefix-cache reuse
    also shares full blocks only. Since a shared block is always full and ``append`` writes only
    into a sequence's own partial last block (refcount 1) or into new blocks, a shared block is
    never written again and no copy-on-write is ever needed (``_slots`` asserts it).

Prefix caching (vLLM's automatic prefix caching, block granularity)
    - A full block is identified by a chained hash ``sha256(parent_hash || token ids of the block)``
      (SHA-256, so a collision, which would silently attach wrong KV, is not a practical concern).
    - A block is *registered* under its hash only once its KV is written: ``mark_computed`` says so.
      Only blocks whose token ids, and all earlier ones, were given are ever registered; a
      sequence allocated without ``token_ids`` is never cached.
    - ``allocate(..., token_ids=...)`` reuses cached blocks for the prompt's leading full blocks,
      stopping at the first miss and never reusing the block that holds the prompt's last token
      (its logits must be computed). The slots of reused tokens are ``-1`` (skip in
      ``cache.write``) so that a runtime which writes every token leaves shared blocks alone;
      ``num_cached_tokens`` says how many leading tokens it may skip computing.
    - If two blocks carry the same hash (two sequences computed one prefix independently), the
      first registered stays in the cache; the other stays private and is simply freed.
    - A registered block whose refcount drops to 0 is *evictable*: kept, still findable, in an LRU
      list. A freed sequence's blocks enter that list last block first, so a prefix's tail is
      evicted before its head. New blocks come from the free blocks (lowest id first), then from
      evicting the least recently used evictable block (its hash is forgotten).
      ``num_free_blocks`` counts free plus evictable blocks.

Every failure (``InvalidInput`` for bad arguments, ``OutOfBlocks`` when too few blocks are left)
raises before any state changes. One lock guards every public method, so a manager may be shared
between threads.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from numbers import Integral
from typing import Any, TypeVar

import numpy as np
import torch

from hal.errors import InvalidInput, OutOfBlocks

__all__ = ["BlockManager"]

SeqId = int | str
_F = TypeVar("_F", bound=Callable[..., Any])
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_ROOT_HASH = b""  # the parent hash of a sequence's first block


def _locked(method: _F) -> _F:
    @functools.wraps(method)
    def wrapper(self: BlockManager, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)
    return wrapper  # type: ignore[return-value]


def _chain_hash(parent: bytes, tokens: list[int]) -> bytes:
    """The prefix-cache key of a full block: SHA-256 of its parent's key and its token ids."""
    digest = hashlib.sha256(parent)
    digest.update(array("q", tokens).tobytes())
    return digest.digest()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------- argument checks

def _check_count(op: str, name: str, value: Any, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
        raise InvalidInput(f"[{op}] {name} must be an int >= 0, got {value!r}")
    if hi is not None and value > hi:
        raise InvalidInput(f"[{op}] {name} must be <= {hi}, got {value}")
    return int(value)


def _check_seq_id(op: str, seq_id: Any, name: str = "seq_id") -> SeqId:
    if isinstance(seq_id, str):
        return seq_id
    if isinstance(seq_id, bool) or not isinstance(seq_id, Integral):
        raise InvalidInput(f"[{op}] {name} must be an int or a str, got {type(seq_id).__name__} {seq_id!r}")
    return int(seq_id)


def _check_token_ids(op: str, token_ids: Any, num_tokens: int) -> list[int]:
    """``token_ids`` (a sequence of ints or a 1-D integer tensor/array) as a list of ``num_tokens`` ints."""
    if isinstance(token_ids, (torch.Tensor, np.ndarray)):
        integer = (token_ids.dtype.kind in "iu" if isinstance(token_ids, np.ndarray) else
                   not (token_ids.is_floating_point() or token_ids.is_complex() or token_ids.dtype == torch.bool))
        if token_ids.ndim != 1 or not integer:
            raise InvalidInput(f"[{op}] token_ids must be a 1-D integer tensor [num_tokens], got "
                               f"{token_ids.dtype} of shape {list(token_ids.shape)}")
        token_ids = token_ids.tolist()
    elif isinstance(token_ids, (str, bytes)) or not isinstance(token_ids, Iterable):
        raise InvalidInput(f"[{op}] token_ids must be a sequence of ints, got {type(token_ids).__name__}")
    tokens = list(token_ids)
    if len(tokens) != num_tokens:
        raise InvalidInput(f"[{op}] token_ids has {len(tokens)} entries but num_tokens is {num_tokens}")
    for i, t in enumerate(tokens):
        if isinstance(t, bool) or not isinstance(t, Integral) or not _INT64_MIN <= t <= _INT64_MAX:
            raise InvalidInput(f"[{op}] token_ids[{i}] must be an int64 token id, got {t!r}")
    return [int(t) for t in tokens]


# ----------------------------------------------------------------------------- state

class _Seq:
    """One sequence: its blocks in order and what the prefix cache needs to know about it."""

    __slots__ = ("blocks", "num_tokens", "token_ids", "hashes", "num_computed", "num_cached",
                 "num_registered")

    def __init__(self) -> None:
        self.blocks: list[int] = []
        self.num_tokens = 0
        self.token_ids: list[int] = []   # the known *leading* token ids (may stop short of num_tokens)
        self.hashes: list[bytes] = []    # chained hash of each full block within token_ids
        self.num_computed = 0            # leading tokens whose KV is written (mark_computed)
        self.num_cached = 0              # leading tokens reused from the prefix cache at allocate
        self.num_registered = 0          # leading full blocks already offered to the prefix cache

    def copy(self) -> _Seq:
        other = _Seq()
        for name in _Seq.__slots__:
            value = getattr(self, name)
            setattr(other, name, list(value) if isinstance(value, list) else value)
        return other

    def state(self) -> tuple:
        return tuple(tuple(v) if isinstance(v, list) else v for v in (getattr(self, n) for n in _Seq.__slots__))


class BlockManager:
    """Allocates the ``num_blocks`` blocks of ``block_size`` tokens of a paged KV cache to sequences.

    Args:
        num_blocks: blocks to hand out, ids ``0..num_blocks-1`` (all usable, none reserved).
        block_size: tokens per block (the cache's ``block_size``).

    A ``seq_id`` is an int or a str. See the module docstring for sharing and prefix caching.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        op = "hal.BlockManager"
        if _check_count(op, "num_blocks", num_blocks, hi=2**31 - 1) == 0:
            raise InvalidInput(f"[{op}] num_blocks must be >= 1, got 0")
        if _check_count(op, "block_size", block_size) == 0:
            raise InvalidInput(f"[{op}] block_size must be >= 1, got 0")
        self._num_blocks = int(num_blocks)
        self._block_size = int(block_size)
        self._lock = threading.Lock()
        self._free: list[int] = list(range(self._num_blocks))   # a heap: lowest id first
        self._refcount: list[int] = [0] * self._num_blocks
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, refcount 0; LRU first
        self._hash_to_block: dict[bytes, int] = {}
        self._block_hash: dict[int, bytes] = {}
        self._seqs: dict[SeqId, _Seq] = {}

    # ------------------------------------------------------------------------- public API

    @property
    def num_blocks(self) -> int:
        """Blocks managed in all (ids ``0..num_blocks-1``)."""
        return self._num_blocks

    @property
    def block_size(self) -> int:
        """Tokens per block."""
        return self._block_size

    @property
    @_locked
    def num_free_blocks(self) -> int:
        """Blocks a new request can get: free blocks plus evictable cached blocks."""
        return len(self._free) + len(self._evictable)

    @_locked
    def __contains__(self, seq_id: object) -> bool:
        try:
            return seq_id in self._seqs
        except TypeError:  # unhashable: not a seq id
            return False

    @_locked
    def allocate(self, seq_id: SeqId, num_tokens: int, *, token_ids: Any = None) -> torch.Tensor:
        """Adds a new sequence of ``num_tokens`` tokens; returns its slot mapping, int64 ``[num_tokens]``.

        With ``token_ids`` (``num_tokens`` ints, or a 1-D integer tensor ``[num_tokens]``) the
        prompt's leading full blocks are looked up in the prefix cache and reused (never the block
        holding the last token). Reused tokens get slot ``-1``: their KV is already in the cache
        and must not be written; ``num_cached_tokens(seq_id)`` tells how many there are.
        Raises ``OutOfBlocks`` (nothing changed) when free plus evictable blocks do not suffice.
        """
        op = "hal.BlockManager.allocate"
        seq_id = self._new_seq_id(op, seq_id)
        num_tokens = _check_count(op, "num_tokens", num_tokens)
        seq = _Seq()
        if token_ids is not None:
            seq.token_ids = _check_token_ids(op, token_ids, num_tokens)
            self._extend_hashes(seq)
        hits = self._lookup_prefix(seq.hashes, num_tokens)
        num_new = _cdiv(num_tokens, self._block_size) - len(hits)
        self._ensure_blocks(op, seq_id, num_new, hits)
        for block in hits:
            self._evictable.pop(block, None)
            self._refcount[block] += 1
        seq.blocks = hits + self._take_blocks(num_new)
        seq.num_tokens = num_tokens
        seq.num_cached = seq.num_computed = len(hits) * self._block_size
        seq.num_registered = len(hits)
        self._seqs[seq_id] = seq
        skipped = torch.full((seq.num_cached,), -1, dtype=torch.int64)   # [num_cached]: reused, not written
        return torch.cat([skipped, self._slots(seq, seq.num_cached, num_tokens - seq.num_cached)])

    @_locked
    def append(self, seq_id: SeqId, num_tokens: int, *, token_ids: Any = None) -> torch.Tensor:
        """Adds ``num_tokens`` tokens to a sequence; returns their slots, int64 ``[num_tokens]``.

        The partial last block fills first. ``token_ids`` (optional, as in ``allocate``) let the
        blocks they complete be cached after ``mark_computed``; they are recorded only while every
        earlier token id of the sequence is known.
        """
        op = "hal.BlockManager.append"
        seq = self._get(op, seq_id)
        num_tokens = _check_count(op, "num_tokens", num_tokens)
        tokens = None if token_ids is None else _check_token_ids(op, token_ids, num_tokens)
        num_new = _cdiv(seq.num_tokens + num_tokens, self._block_size) - len(seq.blocks)
        self._ensure_blocks(op, seq_id, num_new)
        seq.blocks += self._take_blocks(num_new)
        start = seq.num_tokens
        if tokens is not None and len(seq.token_ids) == start:
            seq.token_ids += tokens
            self._extend_hashes(seq)
        seq.num_tokens += num_tokens
        return self._slots(seq, start, num_tokens)

    @_locked
    def fork(self, parent_id: SeqId, child_id: SeqId) -> list[tuple[int, int]]:
        """Makes ``child_id`` a copy of ``parent_id``; returns the block copies ``[(src, dst), ...]``.

        The parent's full blocks are shared. A partial last block gets a fresh block in the child,
        returned as one ``(parent_block, child_block)`` pair that the caller must copy in every
        layer with ``cache.copy_blocks`` (after the parent's KV is written); ``[]`` when the
        parent has no partial block. The child inherits the parent's token ids and counters.
        """
        op = "hal.BlockManager.fork"
        parent = self._get(op, parent_id, "parent_id")
        child_id = self._new_seq_id(op, child_id, "child_id")
        num_full = parent.num_tokens // self._block_size
        partial = len(parent.blocks) > num_full
        self._ensure_blocks(op, child_id, int(partial))
        child = parent.copy()
        for block in parent.blocks[:num_full]:
            self._refcount[block] += 1
        copies = []
        if partial:
            child.blocks[num_full] = self._take_blocks(1)[0]
            copies.append((parent.blocks[num_full], child.blocks[num_full]))
        self._seqs[child_id] = child
        return copies

    @_locked
    def free(self, seq_id: SeqId) -> None:
        """Drops a sequence. Each of its blocks loses a reference; at refcount 0 a cached block
        becomes evictable (the sequence's last block ahead of its first in eviction order), any
        other block free."""
        seq = self._get("hal.BlockManager.free", seq_id)
        del self._seqs[seq_id]
        for block in reversed(seq.blocks):
            self._refcount[block] -= 1
            if self._refcount[block] == 0:
                if block in self._block_hash:
                    self._evictable[block] = None
                else:
                    heapq.heappush(self._free, block)

    @_locked
    def mark_computed(self, seq_id: SeqId, num_tokens: int | None = None) -> None:
        """Says the KV of the first ``num_tokens`` tokens (default: all) of a sequence is written.

        Its full blocks among them whose token ids are known enter the prefix cache (unless a
        block with the same hash is already there). Counts below an earlier call are a no-op.
        """
        op = "hal.BlockManager.mark_computed"
        seq = self._get(op, seq_id)
        if num_tokens is None:
            num_tokens = seq.num_tokens
        num_tokens = _check_count(op, "num_tokens", num_tokens, hi=seq.num_tokens)
        seq.num_computed = max(seq.num_computed, num_tokens)
        limit = min(seq.num_computed // self._block_size, len(seq.hashes))
        for i in range(seq.num_registered, limit):
            self._register(seq.blocks[i], seq.hashes[i])
        seq.num_registered = max(seq.num_registered, limit)

    @_locked
    def block_table(self, seq_ids: Iterable[SeqId]) -> torch.Tensor:
        """Block ids of ``seq_ids`` (a sequence of B ids), int32 ``[B, max_blocks]``, zero-padded on
        the right; ``max_blocks`` is the block count of the longest of these sequences."""
        op = "hal.BlockManager.block_table"
        if isinstance(seq_ids, torch.Tensor):
            seq_ids = seq_ids.tolist()
        if isinstance(seq_ids, (str, bytes)) or not isinstance(seq_ids, Iterable):
            raise InvalidInput(f"[{op}] seq_ids must be a sequence of seq ids, got {type(seq_ids).__name__} "
                               f"{seq_ids!r} (wrap a single id in a list)")
        rows = [self._get(op, seq_id).blocks for seq_id in seq_ids]
        width = max((len(r) for r in rows), default=0)
        table = torch.zeros((len(rows), width), dtype=torch.int32)
        for i, row in enumerate(rows):
            table[i, : len(row)] = torch.tensor(row, dtype=torch.int32)
        return table

    @_locked
    def seq_len(self, seq_id: SeqId) -> int:
        """Tokens in the sequence."""
        return self._get("hal.BlockManager.seq_len", seq_id).num_tokens

    @_locked
    def blocks(self, seq_id: SeqId) -> list[int]:
        """The sequence's block ids in order (a copy), ``ceil(seq_len / block_size)`` of them."""
        return list(self._get("hal.BlockManager.blocks", seq_id).blocks)

    @_locked
    def num_cached_tokens(self, seq_id: SeqId) -> int:
        """Leading tokens reused from the prefix cache at ``allocate`` (a multiple of
        ``block_size``): their KV is already written, the runtime skips computing them."""
        return self._get("hal.BlockManager.num_cached_tokens", seq_id).num_cached

    @_locked
    def num_computed_tokens(self, seq_id: SeqId) -> int:
        """Leading tokens whose KV is written: cached at ``allocate`` or marked by ``mark_computed``."""
        return self._get("hal.BlockManager.num_computed_tokens", seq_id).num_computed

    def __repr__(self) -> str:
        return (f"BlockManager(num_blocks={self._num_blocks}, block_size={self._block_size}, "
                f"free={len(self._free)}, evictable={len(self._evictable)}, seqs={len(self._seqs)})")

    # ------------------------------------------------------------------------- helpers (lock held)

    def _get(self, op: str, seq_id: Any, name: str = "seq_id") -> _Seq:
        seq_id = _check_seq_id(op, seq_id, name)
        seq = self._seqs.get(seq_id)
        if seq is None:
            raise InvalidInput(f"[{op}] unknown {name} {seq_id!r}")
        return seq

    def _new_seq_id(self, op: str, seq_id: Any, name: str = "seq_id") -> SeqId:
        seq_id = _check_seq_id(op, seq_id, name)
        if seq_id in self._seqs:
            raise InvalidInput(f"[{op}] {name} {seq_id!r} already exists (free it first or pick a new id)")
        return seq_id

    def _extend_hashes(self, seq: _Seq) -> None:
        """Chained hashes for every full block within the sequence's known token ids."""
        bs = self._block_size
        while (len(seq.hashes) + 1) * bs <= len(seq.token_ids):
            i = len(seq.hashes)
            parent = seq.hashes[-1] if seq.hashes else _ROOT_HASH
            seq.hashes.append(_chain_hash(parent, seq.token_ids[i * bs:(i + 1) * bs]))

    def _lookup_prefix(self, hashes: list[bytes], num_tokens: int) -> list[int]:
        """Cached blocks for the leading full blocks, up to the first miss; never the block
        holding the last token."""
        reusable = (num_tokens - 1) // self._block_size if num_tokens else 0
        hits: list[int] = []
        for h in hashes[:reusable]:
            block = self._hash_to_block.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def _ensure_blocks(self, op: str, seq_id: SeqId, num_new: int, hits: Sequence[int] = ()) -> None:
        """Raises ``OutOfBlocks`` unless ``num_new`` blocks can be taken once ``hits`` (cached blocks
        about to be reused, which then stop being evictable) are taken."""
        hit_evictable = sum(1 for b in hits if b in self._evictable)
        available = len(self._free) + len(self._evictable) - hit_evictable
        if num_new > available:
            reused = f" ({len(hits)} more reused from the prefix cache)" if hits else ""
            raise OutOfBlocks(
                f"[{op}] seq_id {seq_id!r} needs {num_new} new blocks of {self._block_size} tokens{reused}, "
                f"but only {available} are free ({len(self._free)} free + "
                f"{len(self._evictable) - hit_evictable} evictable): free finished sequences or give "
                f"the cache more blocks")

    def _take_blocks(self, count: int) -> list[int]:
        """``count`` fresh blocks (refcount 1): free ones lowest id first, then evicted LRU ones."""
        taken = []
        for _ in range(count):
            if self._free:
                block = heapq.heappop(self._free)
            else:
                block, _ = self._evictable.popitem(last=False)
                del self._hash_to_block[self._block_hash.pop(block)]
            assert self._refcount[block] == 0
            self._refcount[block] = 1
            taken.append(block)
        return taken

    def _register(self, block: int, block_hash: bytes) -> None:
        """Enters a computed full block into the prefix cache; the first block of a hash wins."""
        known = self._block_hash.get(block)
        if known is not None:  # shared with (or reused from) a sequence that registered it
            assert known == block_hash, "a block cannot hold two different prefixes"
        elif block_hash not in self._hash_to_block:
            self._hash_to_block[block_hash] = block
            self._block_hash[block] = block_hash

    def _slots(self, seq: _Seq, start: int, count: int) -> torch.Tensor:
        """Slots of tokens ``start..start+count-1``, int64 ``[count]``. Asserts the no-COW invariant:
        tokens are only ever written into blocks the sequence holds alone."""
        if count == 0:
            return torch.empty(0, dtype=torch.int64)
        bs = self._block_size
        written = seq.blocks[start // bs:_cdiv(start + count, bs)]
        assert all(self._refcount[b] == 1 for b in written), \
            "a shared block would be written: copy-on-write is never expected"
        positions = torch.arange(start, start + count, dtype=torch.int64)  # [count]
        blocks = torch.tensor(seq.blocks, dtype=torch.int64)              # [num_blocks_of_seq]
        return blocks[positions // bs] * bs + positions % bs               # [count]

    def _snapshot(self) -> dict[str, Any]:
        """A plain-data copy of the whole state (for tests: a failed call must leave it equal)."""
        with self._lock:
            return {
                "free": sorted(self._free),
                "refcount": list(self._refcount),
                "evictable": list(self._evictable),
                "hash_to_block": dict(self._hash_to_block),
                "block_hash": dict(self._block_hash),
                "seqs": {k: s.state() for k, s in self._seqs.items()},
            }
