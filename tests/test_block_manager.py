"""Tests of hal.BlockManager: each method and error, prefix caching, and a Hypothesis state machine
that checks refcounts, block ownership, accounting and (through a fake cache) the KV each slot holds."""

from __future__ import annotations

import random
import re
import sys
import threading

import numpy as np
import pytest
import torch
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from hal.block_manager import BlockManager
from hal.errors import InvalidInput, OutOfBlocks


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def check_invariants(m: BlockManager) -> None:
    """Everything that must hold between any two public calls, read off the private state."""
    s = m._snapshot()
    bs, n = m.block_size, m.num_blocks
    holders = [0] * n
    for seq_id, seq in m._seqs.items():
        assert len(seq.blocks) == cdiv(seq.num_tokens, bs), seq_id
        assert len(set(seq.blocks)) == len(seq.blocks), f"seq {seq_id} holds a block twice"
        assert seq.num_cached <= seq.num_computed <= seq.num_tokens
        assert len(seq.token_ids) <= seq.num_tokens
        for i, block in enumerate(seq.blocks):
            holders[block] += 1
            full = (i + 1) * bs <= seq.num_tokens
            if s["refcount"][block] > 1 or block in s["block_hash"]:
                assert full, f"block {block} is shared or cached but partial in seq {seq_id}"
    assert s["refcount"] == holders, "refcounts must equal the number of sequences holding each block"
    referenced = {b for b in range(n) if holders[b] > 0}
    free, evictable = set(s["free"]), set(s["evictable"])
    assert len(free) == len(s["free"]) and len(evictable) == len(s["evictable"])
    assert not (referenced & free) and not (referenced & evictable) and not (free & evictable)
    assert referenced | free | evictable == set(range(n)), "a block is neither used, free nor evictable"
    assert evictable <= set(s["block_hash"]) and not (free & set(s["block_hash"]))
    assert {b: h for h, b in s["hash_to_block"].items()} == s["block_hash"]
    assert m.num_free_blocks == n - len(referenced)


def slots_of(m: BlockManager, seq_id, start: int, count: int) -> list[int]:
    blocks, bs = m.blocks(seq_id), m.block_size
    return [blocks[t // bs] * bs + t % bs for t in range(start, start + count)]


def raises_unchanged(m: BlockManager, exc: type, match: str, fn, *args, **kwargs):
    """Calls fn, expects exc with a message matching match, and the state exactly as before."""
    before = m._snapshot()
    with pytest.raises(exc, match=match) as info:
        fn(*args, **kwargs)
    assert m._snapshot() == before
    check_invariants(m)
    return info


def prompt_manager(num_blocks=8, block_size=4, tokens=tuple(range(12))):
    """A manager whose sequence "a" holds ``tokens``, computed and so in the prefix cache."""
    m = BlockManager(num_blocks, block_size)
    m.allocate("a", len(tokens), token_ids=list(tokens))
    m.mark_computed("a")
    return m


# ----------------------------------------------------------------------------- construction

@pytest.mark.parametrize("args", [(0, 4), (-1, 4), (1.5, 4), (True, 4), (4, 0), (4, "16"), (2**31, 4)])
def test_constructor_rejects_bad_sizes(args):
    with pytest.raises(InvalidInput, match=r"^\[hal.BlockManager\] (num_blocks|block_size) must be"):
        BlockManager(*args)


def test_constructor_hands_out_every_block():
    m = BlockManager(5, 3)
    assert (m.num_blocks, m.block_size, m.num_free_blocks) == (5, 3, 5)
    m.allocate(0, 15)
    assert sorted(m.blocks(0)) == [0, 1, 2, 3, 4] and m.num_free_blocks == 0


# ----------------------------------------------------------------------------- allocate / append

def test_allocate_slot_mapping_formula_and_dtype():
    m = BlockManager(8, 4)
    slots = m.allocate(0, 10)
    assert slots.dtype == torch.int64 and slots.shape == (10,)
    assert m.blocks(0) == [0, 1, 2] and slots.tolist() == list(range(10))
    slots = m.allocate(1, 5)
    assert m.blocks(1) == [3, 4] and slots.tolist() == [12, 13, 14, 15, 16]
    assert slots.tolist() == slots_of(m, 1, 0, 5)
    assert m.seq_len(1) == 5 and 1 in m and 2 not in m and [1] not in m
    assert m.num_free_blocks == 3
    check_invariants(m)


def test_allocate_zero_tokens():
    m = BlockManager(2, 4)
    slots = m.allocate("s", 0)
    assert slots.dtype == torch.int64 and slots.shape == (0,)
    assert m.blocks("s") == [] and m.block_table(["s"]).shape == (1, 0)
    assert m.append("s", 5).tolist() == [0, 1, 2, 3, 4]


def test_freed_blocks_are_reused_lowest_id_first():
    m = BlockManager(6, 2)
    m.allocate(0, 4)
    m.allocate(1, 4)
    m.free(0)
    m.allocate(2, 6)
    assert m.blocks(2) == [0, 1, 4]


def test_append_fills_the_partial_block_first():
    m = BlockManager(8, 4)
    m.allocate(0, 5)          # blocks 0, 1 (1 token in block 1)
    m.allocate(1, 4)          # block 2
    slots = m.append(0, 6)    # 3 more in block 1, then 3 in a new block 3
    assert slots.dtype == torch.int64 and slots.tolist() == [5, 6, 7, 12, 13, 14]
    assert m.blocks(0) == [0, 1, 3] and m.seq_len(0) == 11
    assert m.append(0, 0).shape == (0,)
    assert m.append(0, 1).tolist() == [15]
    check_invariants(m)


def test_allocate_existing_seq_id_is_invalid():
    m = BlockManager(4, 4)
    m.allocate(3, 4)
    raises_unchanged(m, InvalidInput, r"^\[hal.BlockManager.allocate\] seq_id 3 already exists", m.allocate, 3, 1)


@pytest.mark.parametrize("bad", [-3, True, 2.0, "3", None])
def test_bad_num_tokens(bad):
    m = BlockManager(4, 4)
    m.allocate(0, 2)
    msg = re.escape(f"must be an int >= 0, got {bad!r}")
    raises_unchanged(m, InvalidInput, r"^\[hal.BlockManager.allocate\] num_tokens " + msg, m.allocate, 1, bad)
    raises_unchanged(m, InvalidInput, r"^\[hal.BlockManager.append\] num_tokens " + msg, m.append, 0, bad)


def test_bad_num_tokens_message_is_exact():
    m = BlockManager(4, 4)
    with pytest.raises(InvalidInput) as info:
        m.allocate(0, -3)
    assert str(info.value) == "[hal.BlockManager.allocate] num_tokens must be an int >= 0, got -3"
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("bad", [1.5, None, True, (1,)])
def test_bad_seq_id(bad):
    m = BlockManager(4, 4)
    raises_unchanged(m, InvalidInput, r"^\[hal.BlockManager.allocate\] seq_id must be an int or a str",
                     m.allocate, bad, 1)


def test_seq_ids_may_be_numpy_ints_and_strs():
    m = BlockManager(4, 4)
    m.allocate(np.int64(7), 1)
    m.allocate("req-1", 1)
    assert 7 in m and m.seq_len(7) == 1 and m.blocks("req-1") == [1]


def test_unknown_seq_id_everywhere():
    m = BlockManager(4, 4)
    m.allocate(1, 3)
    with pytest.raises(InvalidInput) as info:
        m.append(7, 1)
    assert str(info.value) == "[hal.BlockManager.append] unknown seq_id 7"
    for method, args in [("free", (7,)), ("mark_computed", (7,)), ("seq_len", (7,)), ("blocks", (7,)),
                         ("num_cached_tokens", (7,)), ("num_computed_tokens", (7,)), ("block_table", ([1, 7],))]:
        raises_unchanged(m, InvalidInput, rf"^\[hal.BlockManager.{method}\] unknown seq_id 7",
                         getattr(m, method), *args)
    raises_unchanged(m, InvalidInput, r"^\[hal.BlockManager.fork\] unknown parent_id 7", m.fork, 7, 8)


@pytest.mark.parametrize("op", ["allocate", "append"])
def test_out_of_blocks_leaves_state_unchanged(op):
    m = BlockManager(4, 4)
    m.allocate(0, 6)          # 2 blocks, 2 tokens of room left in block 1
    call = (lambda: m.allocate(1, 9)) if op == "allocate" else (lambda: m.append(0, 11))
    info = raises_unchanged(m, OutOfBlocks, rf"^\[hal.BlockManager.{op}\]", call)
    assert "needs 3 new blocks" in str(info.value) and "only 2 are free" in str(info.value)
    assert not isinstance(info.value, ValueError)
    assert m.append(0, 10).shape == (10,) and m.num_free_blocks == 0   # exactly fits


# ----------------------------------------------------------------------------- token ids

@pytest.mark.parametrize("ids", [[5, 6, 7], (5, 6, 7), range(5, 8), torch.tensor([5, 6, 7]),
                                 torch.tensor([5, 6, 7], dtype=torch.int32), np.array([5, 6, 7])])
def test_token_ids_forms(ids):
    m = BlockManager(4, 1)
    m.allocate("a", 3, token_ids=ids)
    m.mark_computed("a")
    m.allocate("b", 3, token_ids=[5, 6, 7])
    assert m.num_cached_tokens("b") == 2


@pytest.mark.parametrize("ids, match", [
    ([1, 2], "token_ids has 2 entries but num_tokens is 3"),
    (torch.tensor([1.0, 2.0, 3.0]), "token_ids must be a 1-D integer tensor"),
    (torch.ones(1, 3, dtype=torch.int64), "token_ids must be a 1-D integer tensor"),
    (torch.tensor([True, False, True]), "token_ids must be a 1-D integer tensor"),
    (np.array([1.0, 2.0, 3.0]), "token_ids must be a 1-D integer tensor"),
    ([1, True, 3], r"token_ids\[1\] must be an int64 token id"),
    ([1, 2.0, 3], r"token_ids\[1\] must be an int64 token id"),
    ([1, 2, 2**63], r"token_ids\[2\] must be an int64 token id"),
    ("abc", "token_ids must be a sequence of ints"),
    (5, "token_ids must be a sequence of ints"),
])
def test_bad_token_ids(ids, match):
    m = BlockManager(4, 4)
    m.allocate(0, 3, token_ids=[1, 2, 3])
    raises_unchanged(m, InvalidInput, r"^\[hal.BlockManager.allocate\] " + match, m.allocate, 1, 3, token_ids=ids)
    raises_unchanged(m, InvalidInput, r"^\[hal.BlockManager.append\] " + match, m.append, 0, 3, token_ids=ids)


# ----------------------------------------------------------------------------- fork / free

def test_fork_shares_full_blocks_and_copies_the_partial_one():
    m = BlockManager(8, 4)
    m.allocate("p", 10)                      # blocks 0, 1 full; block 2 holds 2 tokens
    copies = m.fork("p", "c")
    assert copies == [(2, 3)]
    assert m.blocks("c") == [0, 1, 3] and m.seq_len("c") == 10
    assert m._refcount[:4] == [2, 2, 1, 1]
    assert m.append("c", 1).tolist() == [3 * 4 + 2]     # the child writes into its own copy
    assert m.append("p", 1).tolist() == [2 * 4 + 2]
    check_invariants(m)


def test_fork_without_partial_block_copies_nothing():
    m = BlockManager(4, 4)
    m.allocate("p", 8)
    assert m.fork("p", "c") == [] and m.blocks("c") == [0, 1] and m.num_free_blocks == 2
    assert m.append("c", 1).tolist() == [8]              # a new block, never a shared one
    assert m.append("p", 1).tolist() == [12]
    m.allocate("e", 0)
    assert m.fork("e", "e2") == [] and m.blocks("e2") == []
    check_invariants(m)


def test_fork_errors():
    m = BlockManager(4, 4)
    m.allocate("p", 10)
    raises_unchanged(m, InvalidInput, r"^\[hal.BlockManager.fork\] child_id 'p' already exists", m.fork, "p", "p")
    m.allocate("q", 0)
    raises_unchanged(m, InvalidInput, r"child_id 'q' already exists", m.fork, "p", "q")
    m.append("q", 1)   # takes the last block: the partial copy cannot be made
    info = raises_unchanged(m, OutOfBlocks, r"^\[hal.BlockManager.fork\] seq_id 'c' needs 1 new blocks",
                            m.fork, "p", "c")
    assert "only 0 are free" in str(info.value)


def test_free_after_fork_keeps_shared_blocks_for_the_other_sequence():
    m = BlockManager(6, 4)
    m.allocate("p", 9)
    m.fork("p", "c")
    m.free("p")
    assert "p" not in m and m.blocks("c") == [0, 1, 3] and m._refcount[:4] == [1, 1, 0, 1]
    assert m.num_free_blocks == 3
    assert m.block_table(["c"]).tolist() == [[0, 1, 3]]
    m.free("c")
    assert m.num_free_blocks == 6 and m._snapshot()["free"] == list(range(6))
    raises_unchanged(m, InvalidInput, r"^\[hal.BlockManager.free\] unknown seq_id 'c'", m.free, "c")


# ----------------------------------------------------------------------------- block_table

def test_block_table_padding_order_and_dtype():
    m = BlockManager(8, 2)
    m.allocate("a", 5)   # 0 1 2
    m.allocate("b", 1)   # 3
    m.allocate("c", 0)
    table = m.block_table(["b", "a", "c", "b"])
    assert table.dtype == torch.int32 and table.shape == (4, 3)
    assert table.tolist() == [[3, 0, 0], [0, 1, 2], [0, 0, 0], [3, 0, 0]]
    assert m.block_table([]).shape == (0, 0) and m.block_table([]).dtype == torch.int32
    m.allocate(1, 2)
    assert m.block_table(torch.tensor([1])).tolist() == [[4]]
    assert m.block_table(("c",)).shape == (1, 0)


@pytest.mark.parametrize("bad", [1, "a", None])
def test_block_table_needs_a_sequence_of_ids(bad):
    m = BlockManager(2, 2)
    m.allocate("a", 1)
    raises_unchanged(m, InvalidInput, r"^\[hal.BlockManager.block_table\] seq_ids must be a sequence of seq ids",
                     m.block_table, bad)


# ----------------------------------------------------------------------------- prefix caching

def test_blocks_are_cached_only_after_mark_computed():
    m = BlockManager(8, 4)
    m.allocate("a", 12, token_ids=range(12))
    m.allocate("b", 12, token_ids=range(12))
    assert m.num_cached_tokens("b") == 0 and m.num_computed_tokens("a") == 0
    m.mark_computed("a")
    assert m.num_computed_tokens("a") == 12
    m.allocate("c", 12, token_ids=range(12))
    assert m.num_cached_tokens("c") == 8 and m.blocks("c")[:2] == m.blocks("a")[:2]


def test_hit_reuses_blocks_and_returns_minus_one_slots():
    m = prompt_manager()                               # "a": blocks 0, 1, 2 hold tokens 0..11
    slots = m.allocate("b", 11, token_ids=range(11))   # blocks 0, 1 full and cached; 2 tokens after
    assert m.num_cached_tokens("b") == 8 and m.num_computed_tokens("b") == 8
    assert m.blocks("b") == [0, 1, 3]
    assert slots.dtype == torch.int64 and slots.tolist() == [-1] * 8 + [12, 13, 14]
    assert m._refcount[:4] == [2, 2, 1, 1]
    assert m.num_free_blocks == 4
    check_invariants(m)


def test_last_prompt_token_is_always_recomputed():
    m = prompt_manager()                               # 3 full blocks, all cached
    assert len(m._hash_to_block) == 3
    slots = m.allocate("b", 12, token_ids=range(12))   # the 3rd block holds the last token
    assert m.num_cached_tokens("b") == 8 and m.blocks("b") == [0, 1, 3]
    assert slots.tolist() == [-1] * 8 + [12, 13, 14, 15]
    m.allocate("c", 4, token_ids=range(4))             # one block holding the last token: no reuse
    assert m.num_cached_tokens("c") == 0 and m.blocks("c") == [4]
    m.allocate("d", 5, token_ids=range(5))
    assert m.num_cached_tokens("d") == 4 and m.blocks("d") == [0, 5]
    m.allocate("e", 1, token_ids=[0])
    assert m.num_cached_tokens("e") == 0


def test_reuse_stops_at_the_first_miss_because_hashes_chain():
    m = prompt_manager()
    other_first_block = [9, 9, 9, 9] + list(range(4, 12))   # same 2nd and 3rd blocks, other prefix
    m.allocate("b", 12, token_ids=other_first_block)
    assert m.num_cached_tokens("b") == 0 and set(m.blocks("b")).isdisjoint(m.blocks("a"))
    middle_differs = list(range(4)) + [9, 9, 9, 9] + list(range(8, 12)) + [0]
    m.free("b")
    m.allocate("c", 13, token_ids=middle_differs)
    assert m.num_cached_tokens("c") == 4 and m.blocks("c")[0] == 0 and m.blocks("c")[1] != 1


def test_reuse_stops_at_a_miss_even_when_later_blocks_are_cached():
    m = BlockManager(6, 2)
    m.allocate("x", 3, token_ids=[0, 1, 9])          # blocks 0, 1
    m.allocate("a", 5, token_ids=[0, 1, 2, 3, 9])    # blocks 2, 3, 4: its first block repeats x's
    m.mark_computed("x")                             # block 0 cached first ...
    m.mark_computed("a")                             # ... so a's block 2 stays private; block 3 cached
    assert sorted(m._block_hash) == [0, 3]
    m.free("x")
    m.allocate("y", 6)                               # free blocks 1, 5, then evicts block 0
    assert m.blocks("y") == [1, 5, 0] and sorted(m._block_hash) == [3]
    m.free("y")
    m.allocate("b", 5, token_ids=[0, 1, 2, 3, 9])    # 1st block misses; the cached 2nd must not be used
    assert m.num_cached_tokens("b") == 0 and m.blocks("b") == [0, 1, 5]
    check_invariants(m)


def test_mark_computed_partially_registers_full_blocks_only():
    m = BlockManager(8, 4)
    m.allocate("a", 10, token_ids=range(10))
    m.mark_computed("a", 7)                    # block 0 computed; block 1 only partly
    assert m.num_computed_tokens("a") == 7 and list(m._block_hash) == [0]
    m.mark_computed("a", 3)                    # below an earlier call: no-op
    assert m.num_computed_tokens("a") == 7
    m.mark_computed("a")                       # block 1 full and computed; block 2 partial: never
    assert sorted(m._block_hash) == [0, 1]
    raises_unchanged(m, InvalidInput, r"^\[hal.BlockManager.mark_computed\] num_tokens must be <= 10, got 11",
                     m.mark_computed, "a", 11)
    raises_unchanged(m, InvalidInput, r"num_tokens must be an int >= 0, got -1", m.mark_computed, "a", -1)


def test_sequences_without_token_ids_are_never_cached():
    m = BlockManager(8, 4)
    m.allocate("a", 12)
    m.mark_computed("a")
    assert m._hash_to_block == {}
    m.append("a", 4, token_ids=range(4))       # earlier ids unknown: these cannot be chained
    m.mark_computed("a")
    assert m._hash_to_block == {}
    m.free("a")
    assert m._snapshot()["evictable"] == [] and m.num_free_blocks == 8


def test_append_token_ids_make_decode_blocks_cacheable():
    m = BlockManager(8, 4)
    m.allocate("a", 3, token_ids=[1, 2, 3])
    m.append("a", 5, token_ids=[4, 5, 6, 7, 8])
    m.append("a", 4)                           # unknown ids: this block and later ones stay private
    m.append("a", 4, token_ids=[0, 0, 0, 0])
    m.mark_computed("a")
    assert sorted(m._block_hash) == m.blocks("a")[:2]
    m.allocate("b", 9, token_ids=[1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert m.num_cached_tokens("b") == 8 and m.blocks("b")[:2] == m.blocks("a")[:2]


def test_forked_child_caches_its_own_blocks_under_the_chained_hash():
    m = BlockManager(8, 4)
    m.allocate("p", 6, token_ids=range(6))
    copies = m.fork("p", "c")
    m.append("c", 2, token_ids=[60, 70])
    m.mark_computed("p")
    m.mark_computed("c")
    assert copies == [(1, 2)] and sorted(m._block_hash) == [0, 2]
    m.allocate("n", 9, token_ids=[0, 1, 2, 3, 4, 5, 60, 70, 0])
    assert m.num_cached_tokens("n") == 8 and m.blocks("n")[:2] == [0, 2]


def test_same_prefix_computed_twice_keeps_the_first_block():
    m = BlockManager(8, 4)
    m.allocate("a", 8, token_ids=range(8))
    m.allocate("b", 8, token_ids=range(8))     # nothing cached yet: computed independently
    m.mark_computed("b")
    m.mark_computed("a")
    assert sorted(m._block_hash) == m.blocks("b") == [2, 3]
    m.free("a")                                # a's blocks were never cached: plainly free
    assert m._snapshot()["free"] == [0, 1, 4, 5, 6, 7] and m._snapshot()["evictable"] == []
    m.free("b")
    assert m._snapshot()["evictable"] == [3, 2] and m.num_free_blocks == 8
    check_invariants(m)


def test_freed_cached_blocks_are_evictable_and_still_hit():
    m = prompt_manager(num_blocks=4)
    m.free("a")
    assert m.num_free_blocks == 4 and m._snapshot()["evictable"] == [2, 1, 0]
    slots = m.allocate("b", 10, token_ids=range(10))
    assert m.num_cached_tokens("b") == 8 and m.blocks("b") == [0, 1, 3]
    assert slots.tolist()[:8] == [-1] * 8
    assert m._snapshot()["evictable"] == [2] and m.num_free_blocks == 1
    check_invariants(m)


def test_accounting_counts_reused_evictable_blocks_as_taken():
    m = prompt_manager(num_blocks=4, block_size=2, tokens=range(8))   # 4 blocks, all cached
    m.free("a")
    assert m.num_free_blocks == 4 and m._snapshot()["free"] == []
    # 10 tokens: 4 hits (all evictable) + 1 new block; the hits are not free for the new one.
    raises_unchanged(m, OutOfBlocks, r"needs 1 new blocks of 2 tokens \(4 more reused from the prefix "
                     r"cache\), but only 0 are free \(0 free \+ 0 evictable\)",
                     m.allocate, "b", 10, token_ids=range(10))
    # 8 tokens: 3 hits + 1 new block, which must come from evicting the one block not hit.
    m.allocate("b", 8, token_ids=range(8))
    assert m.blocks("b") == [0, 1, 2, 3] and m.num_cached_tokens("b") == 6
    assert m.num_free_blocks == 0 and 3 not in m._block_hash and len(m._hash_to_block) == 3
    raises_unchanged(m, OutOfBlocks, r"needs 1 new blocks", m.allocate, "c", 1)
    check_invariants(m)


def test_lru_eviction_order():
    m = BlockManager(5, 2)
    m.allocate("a", 4, token_ids=[1, 1, 1, 1])   # blocks 0, 1
    m.allocate("b", 4, token_ids=[2, 2, 2, 2])   # blocks 2, 3
    m.mark_computed("a")
    m.mark_computed("b")
    m.free("a")
    m.free("b")
    assert m._snapshot()["evictable"] == [1, 0, 3, 2]    # a freed first; each tail before its head
    assert m.num_free_blocks == 5
    m.allocate("x", 4)                                   # free block 4 first, then evicts block 1
    assert m.blocks("x") == [4, 1] and m._snapshot()["evictable"] == [0, 3, 2]
    m.allocate("a2", 3, token_ids=[1, 1, 1])             # hit on block 0: out of the LRU list
    assert m.blocks("a2") == [0, 3] and m._snapshot()["evictable"] == [2]
    m.free("a2")                                         # 0 back in, most recently used; 3 free
    assert m._snapshot()["evictable"] == [2, 0] and m._snapshot()["free"] == [3]
    m.allocate("y", 2)                                   # a free block before any eviction
    assert m.blocks("y") == [3] and m._snapshot()["evictable"] == [2, 0]
    m.allocate("z", 2)
    assert m.blocks("z") == [2] and m._snapshot()["evictable"] == [0]
    check_invariants(m)


def test_num_free_blocks_accounting():
    m = BlockManager(10, 4)
    m.allocate("a", 16, token_ids=range(16))   # 4 blocks
    assert m.num_free_blocks == 6
    m.mark_computed("a")
    m.allocate("b", 18, token_ids=range(18))   # 4 hits (shared, not evictable) + 1 new
    assert m.num_free_blocks == 5
    m.free("a")                                # nothing drops to 0: a's blocks are b's too
    assert m.num_free_blocks == 5
    m.free("b")                                # 4 evictable + 6 free
    assert m.num_free_blocks == 10 and len(m._snapshot()["evictable"]) == 4


# ----------------------------------------------------------------------------- threads

@pytest.mark.parametrize("call", [
    lambda m: m.allocate("new", 3), lambda m: m.append("s", 1), lambda m: m.fork("s", "new"),
    lambda m: m.free("s"), lambda m: m.mark_computed("s"), lambda m: m.block_table(["s"]),
    lambda m: m.seq_len("s"), lambda m: m.blocks("s"), lambda m: m.num_cached_tokens("s"),
    lambda m: m.num_computed_tokens("s"), lambda m: m.num_free_blocks, lambda m: "s" in m,
], ids=["allocate", "append", "fork", "free", "mark_computed", "block_table", "seq_len", "blocks",
        "num_cached_tokens", "num_computed_tokens", "num_free_blocks", "contains"])
def test_every_public_method_takes_the_lock(call):
    m = BlockManager(8, 4)
    m.allocate("s", 5, token_ids=range(5))
    done = threading.Event()
    worker = threading.Thread(target=lambda: (call(m), done.set()))
    with m._lock:
        worker.start()
        assert not done.wait(0.05), "the call ran while another thread held the lock"
    worker.join(5)
    assert done.is_set()


def test_threads_allocating_and_freeing_concurrently():
    m = BlockManager(64, 4)
    errors: list[BaseException] = []

    def worker(wid: int) -> None:
        rng = random.Random(wid)
        mine: list[str] = []
        try:
            for step in range(300):
                if mine and rng.random() < 0.4:
                    m.free(mine.pop(rng.randrange(len(mine))))
                    continue
                sid = f"{wid}-{step}"
                n = rng.randrange(1, 20)
                try:
                    if mine and rng.random() < 0.3:
                        m.fork(rng.choice(mine), sid)
                    else:
                        m.allocate(sid, n, token_ids=[rng.randrange(2) for _ in range(n)])
                    mine.append(sid)
                    m.append(sid, rng.randrange(3))
                except OutOfBlocks:
                    pass
                if sid in mine:
                    m.mark_computed(sid)
            for sid in mine:
                m.free(sid)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)   # switch threads as often as possible to provoke races
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    check_invariants(m)
    assert m._seqs == {} and m.num_free_blocks == 64 and m._refcount == [0] * 64


# ----------------------------------------------------------------------------- state machine

TEMPLATES = [[0] * 16, [0, 1] * 8, [1, 0, 0, 1] * 4]
ANON = 10**6   # model-only token ids of tokens whose ids the manager is not told; never in the vocabulary


class BlockManagerMachine(RuleBasedStateMachine):
    """Drives one manager with a fake cache (slot -> the prefix that KV encodes) next to it.

    After every step: refcounts, ownership and accounting invariants, and every token of every
    sequence reads, at its slot, exactly the KV of its own prefix (prefix reuse, fork copies and
    eviction are all checked by that)."""

    @initialize(num_blocks=st.integers(1, 32), block_size=st.sampled_from([1, 2, 3, 4]))
    def setup(self, num_blocks, block_size):
        self.m = BlockManager(num_blocks, block_size)
        self.tokens: dict[int, list[int]] = {}   # seq id -> its token ids (ANON+ for unknown ones)
        self.cache: dict[int, tuple] = {}        # slot -> the prefix whose last token's KV it holds
        self.next_id = 0
        self.next_anon = ANON

    # -- helpers

    def _attempt(self, fn, *args, **kwargs):
        before = self.m._snapshot()
        try:
            return fn(*args, **kwargs)
        except (OutOfBlocks, InvalidInput) as e:
            event(f"{fn.__name__}: {type(e).__name__}")
            assert self.m._snapshot() == before, "a failed call changed the state"
            return None

    def _anon(self, n):
        ids = list(range(self.next_anon, self.next_anon + n))
        self.next_anon += n
        return ids

    def _write(self, seq_id, start, slots):
        toks = self.tokens[seq_id]
        for t, slot in enumerate(slots.tolist(), start):
            if slot != -1:
                self.cache[slot] = tuple(toks[: t + 1])

    def _pick(self, pick):
        ids = sorted(self.tokens)
        return ids[pick % len(ids)]

    # -- rules

    @rule(template=st.sampled_from(TEMPLATES), cut=st.integers(0, 12),
          extra=st.lists(st.integers(0, 2), max_size=3), with_ids=st.booleans(), prefill=st.booleans())
    def allocate(self, template, cut, extra, with_ids, prefill):
        prompt = template[:cut] + extra
        n, sid = len(prompt), self.next_id
        evictable = self.m._snapshot()["evictable"]
        slots = self._attempt(self.m.allocate, sid, n, token_ids=prompt if with_ids else None)
        if slots is None:
            return
        self.next_id += 1
        self.tokens[sid] = prompt if with_ids else self._anon(n)
        cached = self.m.num_cached_tokens(sid)
        bs = self.m.block_size
        event("allocate: prefix hit" if cached else "allocate: no hit")
        if set(evictable) - set(self.m._snapshot()["evictable"]) - set(self.m.blocks(sid)[: cached // bs]):
            event("allocate: evicted cached blocks")
        assert slots.dtype == torch.int64 and slots.shape == (n,)
        assert cached % bs == 0 and (cached < n or n == 0) and (with_ids or cached == 0)
        assert (slots[:cached] == -1).all() and (slots[cached:] >= 0).all()
        self._write(sid, 0, slots)
        if prefill:   # the runtime ran the prefill at once
            self.m.mark_computed(sid)

    @precondition(lambda self: self.tokens)
    @rule(pick=st.integers(0, 99), n=st.integers(0, 6), with_ids=st.booleans(),
          ids=st.lists(st.integers(0, 2), min_size=6, max_size=6))
    def append(self, pick, n, with_ids, ids):
        sid = self._pick(pick)
        start = self.m.seq_len(sid)
        slots = self._attempt(self.m.append, sid, n, token_ids=ids[:n] if with_ids else None)
        if slots is None:
            return
        self.tokens[sid] += ids[:n] if with_ids else self._anon(n)
        assert slots.tolist() == slots_of(self.m, sid, start, n)
        self._write(sid, start, slots)

    @precondition(lambda self: self.tokens)
    @rule(pick=st.integers(0, 99))
    def fork(self, pick):
        parent, child = self._pick(pick), self.next_id
        copies = self._attempt(self.m.fork, parent, child)
        if copies is None:
            return
        self.next_id += 1
        self.tokens[child] = list(self.tokens[parent])
        bs = self.m.block_size
        assert len(copies) == (1 if self.m.seq_len(parent) % bs else 0)
        event(f"fork: {len(copies)} copies")
        for src, dst in copies:   # what cache.copy_blocks does
            for off in range(bs):
                if src * bs + off in self.cache:
                    self.cache[dst * bs + off] = self.cache[src * bs + off]

    @precondition(lambda self: self.tokens)
    @rule(pick=st.integers(0, 99))
    def free(self, pick):
        sid = self._pick(pick)
        self.m.free(sid)
        del self.tokens[sid]

    @precondition(lambda self: self.tokens)
    @rule(pick=st.integers(0, 99), upto=st.one_of(st.none(), st.integers(0, 40)))
    def mark_computed(self, pick, upto):
        sid = self._pick(pick)
        n = None if upto is None else min(upto, self.m.seq_len(sid))
        self.m.mark_computed(sid, n)

    @rule(pick=st.integers(0, 99), method=st.sampled_from(["append", "free", "fork", "mark_computed",
                                                          "allocate", "block_table", "negative"]))
    def invalid_call(self, pick, method):
        before = self.m._snapshot()
        unknown = self.next_id + 1000
        known = self._pick(pick) if self.tokens else None
        calls = {
            "append": lambda: self.m.append(unknown, 1),
            "free": lambda: self.m.free(unknown),
            "fork": lambda: self.m.fork(unknown, self.next_id),
            "mark_computed": lambda: self.m.mark_computed(unknown),
            "allocate": lambda: self.m.allocate(known if known is not None else 1.5, 1),
            "block_table": lambda: self.m.block_table([unknown]),
            "negative": lambda: self.m.append(known, -1) if known is not None else self.m.allocate(0, -1),
        }
        with pytest.raises(InvalidInput):
            calls[method]()
        assert self.m._snapshot() == before

    @precondition(lambda self: self.tokens)
    @rule()
    def free_all(self):
        for sid in list(self.tokens):
            self.m.free(sid)
            del self.tokens[sid]
        assert self.m.num_free_blocks == self.m.num_blocks

    # -- invariants

    @invariant()
    def state_is_consistent(self):
        check_invariants(self.m)
        assert set(self.m._seqs) == set(self.tokens)

    @invariant()
    def every_token_reads_its_own_kv(self):
        bs = self.m.block_size
        for sid, toks in self.tokens.items():
            assert self.m.seq_len(sid) == len(toks)
            blocks = self.m.blocks(sid)
            for t in range(len(toks)):
                assert self.cache.get(blocks[t // bs] * bs + t % bs) == tuple(toks[: t + 1]), (sid, t)

    @invariant()
    def block_table_matches_blocks(self):
        ids = sorted(self.tokens)
        table = self.m.block_table(ids)
        assert table.dtype == torch.int32
        width = max((len(self.m.blocks(i)) for i in ids), default=0)
        assert table.shape == (len(ids), width)
        for row, sid in zip(table.tolist(), ids):
            blocks = self.m.blocks(sid)
            assert row == blocks + [0] * (width - len(blocks))

    def teardown(self):
        if not hasattr(self, "m"):
            return
        for sid in list(self.tokens):
            self.m.free(sid)
        check_invariants(self.m)
        assert self.m.num_free_blocks == self.m.num_blocks, "blocks leaked"


BlockManagerMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=30, deadline=None)
TestBlockManagerMachine = BlockManagerMachine.TestCase
