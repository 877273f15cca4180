"""Block pool: allocation, reference counts, chained hashes, lazy eviction order, counters."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portaserve.core.block_pool import (
    BlockPool,
    BlockPoolError,
    extend_block_hashes,
    hash_block_tokens,
)


def _tokens(n: int) -> list[int]:
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    return [rng.randrange(1, 50_000) for _ in range(n)]


def _cache_sequence(pool: BlockPool, tokens: list[int], extra: tuple = ()) -> list[int]:
    """Allocate blocks for ``tokens``, enter its full blocks in the cache, return the table."""
    num_blocks = -(-len(tokens) // pool.block_size)
    table = pool.allocate(num_blocks)
    hashes = extend_block_hashes([], tokens, pool.block_size, extra)
    pool.cache_full_blocks(table, hashes, 0, len(hashes))
    return table


def test_allocate_and_free_count_references() -> None:
    pool = BlockPool(8, 4)
    a = pool.allocate(3)
    assert len(set(a)) == 3 and pool.num_free_blocks == 5
    assert pool.usage == pytest.approx(3 / 8)
    assert pool.can_allocate(5) and not pool.can_allocate(6)
    with pytest.raises(BlockPoolError, match="cannot allocate 6"):
        pool.allocate(6)
    pool.free(a)
    assert pool.num_free_blocks == 8 and pool.usage == 0.0
    with pytest.raises(BlockPoolError, match="freed more times"):
        pool.free(a[:1])


def test_hash_chain_depends_on_parent_tokens_and_extra_keys() -> None:
    toks = _tokens(8)
    h0 = hash_block_tokens(None, toks[:4])
    h1 = hash_block_tokens(h0, toks[4:])
    assert h1 != hash_block_tokens(None, toks[4:])  # position in the chain matters
    assert h1 != hash_block_tokens(h0, toks[4:], ("salt",))
    assert hash_block_tokens(h0, toks[4:], ("a",)) != hash_block_tokens(h0, toks[4:], ("b",))
    assert hash_block_tokens(None, [1]) != hash_block_tokens(None, [1], (1,))
    assert hash_block_tokens(None, toks[:4], ("1",)) != hash_block_tokens(None, toks[:4], (1,))
    assert extend_block_hashes([], toks, 4) == [h0, h1]
    assert extend_block_hashes([h0], toks + [5], 4) == [h0, h1]  # partial block not hashed
    with pytest.raises(BlockPoolError, match="extra_keys"):
        hash_block_tokens(None, toks, (1.5,))  # type: ignore[arg-type]


def test_hash_is_stable_across_processes() -> None:
    """The digest does not depend on PYTHONHASHSEED (it can be a global id)."""
    toks = _tokens(16)
    expected = hash_block_tokens(hash_block_tokens(None, toks[:8], ("s",)), toks[8:], ("s",))
    code = (
        "import sys; from portaserve.core.block_pool import hash_block_tokens as h; "
        f"t={toks!r}; sys.stdout.write(h(h(None, t[:8], ('s',)), t[8:], ('s',)).hex())"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    assert out.stdout == expected.hex()
    # and it is plain SHA-256 over the documented encoding
    raw = hashlib.sha256(
        b"\x00" * 32
        + (8).to_bytes(4, "little")
        + array("q", toks[:8]).tobytes()
        + b"s"
        + (1).to_bytes(4, "little")
        + b"s"
    )
    assert hash_block_tokens(None, toks[:8], ("s",)) == raw.digest()


def test_find_cached_prefix_walks_the_chain() -> None:
    pool = BlockPool(16, 4)
    toks = _tokens(14)  # 3 full blocks and 2 tokens
    table = _cache_sequence(pool, toks)
    assert pool.num_cached_blocks == 3
    hashes = extend_block_hashes([], toks, 4)
    assert pool.find_cached_prefix(hashes) == table[:3]
    assert pool.find_cached_prefix(hashes, max_blocks=2) == table[:2]
    diverged = toks[:4] + [toks[4] + 1] + toks[5:]
    assert pool.find_cached_prefix(extend_block_hashes([], diverged, 4)) == table[:1]
    salted = extend_block_hashes([], toks, 4, ("other",))
    assert pool.find_cached_prefix(salted) == []
    # the last token must stay uncached: 12 tokens = 3 full blocks, only 2 may be reused
    assert pool.find_cached_prefix_for_tokens(toks[:12]) == table[:2]
    assert pool.find_cached_prefix_for_tokens(toks[:13]) == table[:3]


def test_shared_blocks_are_reference_counted() -> None:
    pool = BlockPool(8, 4)
    toks = _tokens(9)
    table = _cache_sequence(pool, toks)
    cached = pool.find_cached_prefix_for_tokens(toks)
    assert cached == table[:2]
    assert pool.can_allocate(5, cached) and not pool.can_allocate(6, cached)
    second = pool.allocate(1, cached)
    assert second[:2] == table[:2] and second[2] not in table
    assert [pool.blocks[b].ref_cnt for b in table] == [2, 2, 1]
    pool.free(table)
    assert [pool.blocks[b].ref_cnt for b in table] == [1, 1, 0]
    assert pool.num_free_blocks == 8 - 3


def test_lazy_eviction_and_tail_first_order() -> None:
    pool = BlockPool(6, 2)
    toks = _tokens(8)
    table = _cache_sequence(pool, toks)  # 4 cached blocks
    pool.free(table)
    assert pool.num_free_blocks == 6 and pool.num_cached_blocks == 4
    # freed blocks still serve hits until reused
    assert pool.find_cached_prefix_for_tokens(toks + [1]) == table
    order = pool.free_block_ids()
    # never-used blocks first, then the request's blocks tail first: the head is evicted last
    assert order[-4:] == table[::-1]
    # taking 3 blocks uses the 2 never-used ones, then evicts the request's last block only
    taken = pool.allocate(3)
    assert taken[2] == table[3]
    assert pool.find_cached_prefix_for_tokens(toks + [1]) == table[:3]
    assert pool.num_cached_blocks == 3
    assert pool.blocks[table[3]].block_hash is None


def test_uncached_blocks_are_reused_before_cached_ones() -> None:
    pool = BlockPool(4, 2)
    toks = _tokens(4)
    cached_table = _cache_sequence(pool, toks)
    scratch = pool.allocate(2)  # never cached
    pool.free(cached_table)
    pool.free(scratch)
    assert set(pool.allocate(2)) == set(scratch)
    assert pool.find_cached_prefix_for_tokens(toks + [3]) == cached_table


def test_duplicate_content_keeps_one_cached_copy() -> None:
    pool = BlockPool(8, 4)
    toks = _tokens(8)
    first = _cache_sequence(pool, toks)
    second = _cache_sequence(pool, toks)  # computed in parallel, same content
    assert pool.num_cached_blocks == 2
    assert pool.find_cached_prefix_for_tokens(toks + [9]) == first
    pool.free(second)
    assert set(pool.free_block_ids()[:2]) == set(second)  # the unmapped copies go first
    pool.free(first)


def test_prefix_counters_and_reset() -> None:
    pool = BlockPool(8, 4)
    pool.record_prefix_lookup(20, 0)
    pool.record_prefix_lookup(20, 16)
    stats = pool.stats
    assert (stats.query_tokens, stats.hit_tokens, stats.query_blocks, stats.hit_blocks) == (
        40,
        16,
        10,
        4,
    )
    assert stats.hit_rate == pytest.approx(0.4) and stats.num_lookups == 2
    table = _cache_sequence(pool, _tokens(8))
    assert not pool.reset_prefix_cache()
    pool.free(table)
    assert pool.reset_prefix_cache() and pool.num_cached_blocks == 0


def test_disabled_prefix_caching_never_hits() -> None:
    pool = BlockPool(8, 4, enable_prefix_caching=False)
    toks = _tokens(12)
    _cache_sequence(pool, toks)
    assert pool.num_cached_blocks == 0
    assert pool.find_cached_prefix_for_tokens(toks + [1]) == []


def test_bad_construction_is_refused() -> None:
    with pytest.raises(BlockPoolError, match="num_blocks"):
        BlockPool(0, 4)
    with pytest.raises(BlockPoolError, match="block_size"):
        BlockPool(4, 0)


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["alloc", "free", "share"]), st.integers(0, 7), st.integers(0, 3)
        ),
        max_size=60,
    )
)
def test_random_pool_operations_keep_invariants(ops: list[tuple[str, int, int]]) -> None:
    """Tables of random sequences drawn from 4 shared texts; check refs/free/map each time."""
    pool = BlockPool(12, 2)
    texts = [_tokens(12) for _ in range(4)]
    tables: list[tuple[list[int], list[int]]] = []  # (block ids, tokens)
    for kind, n, text in ops:
        if kind == "free" and tables:
            ids, _ = tables.pop(n % len(tables))
            pool.free(ids)
        elif kind in ("alloc", "share"):
            toks = texts[text][: 2 * n + 1]
            cached = pool.find_cached_prefix_for_tokens(toks) if kind == "share" else []
            need = -(-len(toks) // 2) - len(cached)
            if pool.can_allocate(need, cached):
                ids = pool.allocate(need, cached)
                hashes = extend_block_hashes([], toks, 2)
                pool.cache_full_blocks(ids, hashes, len(cached), len(hashes))
                tables.append((ids, toks))
                # whatever the cache handed out holds exactly these tokens' prefix
                for b, block_id in enumerate(cached):
                    assert pool.blocks[block_id].block_hash == hashes[b]
        refs = [0] * 12
        for ids, _ in tables:
            for b in ids:
                refs[b] += 1
        free = set(pool.free_block_ids())
        assert len(free) == len(pool.free_block_ids())
        for block in pool.blocks:
            assert block.ref_cnt == refs[block.block_id]
            assert (block.ref_cnt == 0) == (block.block_id in free)
        for h, b in pool.cached_blocks().items():
            assert pool.blocks[b].block_hash == h
        assert sum(b.block_hash is not None for b in pool.blocks) == pool.num_cached_blocks
    for ids, _ in tables:
        pool.free(ids)
    assert pool.num_free_blocks == 12 and all(b.ref_cnt == 0 for b in pool.blocks)
