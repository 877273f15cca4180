"""The KV block pool: block metadata, the free LRU list, reference counts and prefix hashes.

The device owns the KV memory; this module owns which block ids are in use. Every block id in
``[0, num_blocks)`` has one ``Block`` record, made once at construction. A block is either
referenced (``ref_cnt > 0``, held by one or more block tables) or free (``ref_cnt == 0``, in the
free list). Nothing else.

Prefix caching: a *full* block whose tokens are in the KV cache gets a chained hash of
(parent block's hash, its token ids, extra keys such as a cache salt), and the pool maps that
hash to the block. A new request walks its own chain of hashes through the map and reuses the
longest run of cached blocks (``find_cached_prefix``). Eviction is lazy: a cached block that
drops to ``ref_cnt == 0`` keeps its hash and stays findable in the free list until it is handed
out again by ``allocate``. The free list is in LRU order: ``allocate`` takes from the front;
``free`` puts cached blocks at the back (a request's blocks tail first, so its first blocks,
the ones most likely shared, are evicted last) and uncached blocks at the front (they hold
nothing worth keeping).

Hashes are SHA-256 over a fixed byte encoding (no pickle, no Python ``hash``), so they are the
same in every process and run, and can serve as global ids (offload tiers, multi-process).
Two different prefixes colliding would need a SHA-256 collision.

Only the scheduler calls this, in check-then-commit pairs: ``can_allocate`` then ``allocate``.
"""

from __future__ import annotations

import hashlib
import struct
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from portaserve.errors import PortaserveError

#: A block's chained content hash (32 bytes of SHA-256).
BlockHash = bytes
#: Extra keys mixed into every block hash: strings, ints or bytes (cache salt, adapter name).
ExtraKeys = tuple[str | int | bytes, ...]


class BlockPoolError(PortaserveError, RuntimeError):
    """The block pool was asked for something it cannot do (a caller skipped the check)."""


@dataclass(slots=True)
class Block:
    """Metadata of one KV block. ``block_hash`` is set only while the block is in the cache map."""

    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None


@dataclass(slots=True)
class BlockPoolStats:
    """Prefix-cache counters (cumulative) and current occupancy."""

    num_blocks: int
    num_free_blocks: int
    num_cached_blocks: int
    query_tokens: int
    hit_tokens: int
    query_blocks: int
    hit_blocks: int
    num_lookups: int

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks


def _encode_extra(extra_keys: ExtraKeys) -> bytes:
    parts: list[bytes] = []
    for key in extra_keys:
        if isinstance(key, bytes):
            tag, raw = b"b", key
        elif isinstance(key, str):
            tag, raw = b"s", key.encode("utf-8")
        elif isinstance(key, int) and not isinstance(key, bool):
            tag, raw = b"i", str(key).encode("ascii")
        else:
            raise BlockPoolError(
                f"extra_keys entries must be str, int or bytes; got {type(key).__name__}"
            )
        parts.append(tag + struct.pack("<I", len(raw)) + raw)
    return b"".join(parts)


def hash_block_tokens(
    parent_hash: BlockHash | None, token_ids: Sequence[int], extra_keys: ExtraKeys = ()
) -> BlockHash:
    """The chained hash of one full block: SHA-256 of parent hash, token ids and extra keys."""
    h = hashlib.sha256()
    h.update(parent_hash if parent_hash is not None else b"\x00" * 32)
    h.update(struct.pack("<I", len(token_ids)))
    h.update(array("q", token_ids).tobytes())
    h.update(_encode_extra(extra_keys))
    return h.digest()


def extend_block_hashes(
    block_hashes: list[BlockHash],
    token_ids: Sequence[int],
    block_size: int,
    extra_keys: ExtraKeys = (),
    max_blocks: int | None = None,
) -> list[BlockHash]:
    """Append the hashes of the full blocks of ``token_ids`` not yet in ``block_hashes``.

    ``block_hashes`` holds the chain of the first ``len(block_hashes)`` blocks already (it is
    extended in place and returned). ``max_blocks`` caps how many blocks are hashed in total.
    """
    num_full = len(token_ids) // block_size
    if max_blocks is not None:
        num_full = min(num_full, max_blocks)
    parent = block_hashes[-1] if block_hashes else None
    for i in range(len(block_hashes), num_full):
        parent = hash_block_tokens(
            parent, token_ids[i * block_size : (i + 1) * block_size], extra_keys
        )
        block_hashes.append(parent)
    return block_hashes


class BlockPool:
    """Block ids ``0..num_blocks-1``: free LRU list, reference counts, prefix-cache map."""

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise BlockPoolError(f"num_blocks must be a positive integer; got {num_blocks!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise BlockPoolError(f"block_size must be a positive integer; got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks: list[Block] = [Block(i) for i in range(num_blocks)]
        #: Free block ids in eviction order (front is taken first). Values unused.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._hash_to_block: dict[BlockHash, int] = {}
        self._query_tokens = 0
        self._hit_tokens = 0
        self._query_blocks = 0
        self._hit_blocks = 0
        self._num_lookups = 0

    # -- occupancy ---------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks that ``allocate`` can hand out (includes cached blocks nobody references)."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._hash_to_block)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by some request, in [0, 1]."""
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def stats(self) -> BlockPoolStats:
        return BlockPoolStats(
            num_blocks=self.num_blocks,
            num_free_blocks=len(self._free),
            num_cached_blocks=len(self._hash_to_block),
            query_tokens=self._query_tokens,
            hit_tokens=self._hit_tokens,
            query_blocks=self._query_blocks,
            hit_blocks=self._hit_blocks,
            num_lookups=self._num_lookups,
        )

    def free_block_ids(self) -> list[int]:
        """Free block ids in eviction order (for tests and debugging)."""
        return list(self._free)

    def cached_blocks(self) -> dict[BlockHash, int]:
        """A copy of the hash -> block id map (for tests and debugging)."""
        return dict(self._hash_to_block)

    # -- prefix cache ------------------------------------------------------------------------

    def find_cached_prefix(
        self, block_hashes: Sequence[BlockHash], max_blocks: int | None = None
    ) -> list[int]:
        """Block ids of the longest cached run of ``block_hashes`` from the first block.

        Pure: takes no reference and counts nothing (the caller commits with ``allocate`` and
        ``record_prefix_lookup``). ``max_blocks`` caps the match; a request's caller passes
        ``(num_tokens - 1) // block_size`` so at least one token is left to compute, because the
        last token must run to produce logits.
        """
        if not self.enable_prefix_caching:
            return []
        limit = len(block_hashes) if max_blocks is None else min(max_blocks, len(block_hashes))
        found: list[int] = []
        for block_hash in block_hashes[:limit]:
            block_id = self._hash_to_block.get(block_hash)
            if block_id is None:
                break
            found.append(block_id)
        return found

    def find_cached_prefix_for_tokens(
        self, token_ids: Sequence[int], extra_keys: ExtraKeys = ()
    ) -> list[int]:
        """``find_cached_prefix`` from raw token ids, leaving at least the last token uncached."""
        if not self.enable_prefix_caching or not token_ids:
            return []
        max_blocks = (len(token_ids) - 1) // self.block_size
        hashes = extend_block_hashes([], token_ids, self.block_size, extra_keys, max_blocks)
        return self.find_cached_prefix(hashes)

    def record_prefix_lookup(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        """Count one committed prefix lookup (a request admitted with this many tokens hit)."""
        self._num_lookups += 1
        self._query_tokens += num_query_tokens
        self._hit_tokens += num_hit_tokens
        self._query_blocks += num_query_tokens // self.block_size
        self._hit_blocks += num_hit_tokens // self.block_size

    def cache_full_blocks(
        self,
        block_ids: Sequence[int],
        block_hashes: Sequence[BlockHash],
        num_cached_blocks: int,
        num_full_blocks: int,
    ) -> None:
        """Enter blocks ``[num_cached_blocks, num_full_blocks)`` of a block table in the cache.

        The caller guarantees those blocks are full and their tokens are in the KV cache, and
        ``block_hashes[i]`` is block i's chained hash. A block whose hash is already cached
        under another block (two requests computed the same prefix at once) stays uncached;
        it is freed to the front of the free list later.
        """
        if not self.enable_prefix_caching:
            return
        if num_full_blocks > min(len(block_ids), len(block_hashes)):
            raise BlockPoolError(
                f"cache_full_blocks: num_full_blocks {num_full_blocks} exceeds the block table "
                f"({len(block_ids)}) or the hashes ({len(block_hashes)})"
            )
        for i in range(num_cached_blocks, num_full_blocks):
            block = self.blocks[block_ids[i]]
            block_hash = block_hashes[i]
            if block.block_hash is not None:
                continue  # found in the cache at admission: already mapped
            if block_hash in self._hash_to_block:
                continue
            block.block_hash = block_hash
            self._hash_to_block[block_hash] = block.block_id

    # -- allocation --------------------------------------------------------------------------

    def _num_revived(self, cached_block_ids: Iterable[int]) -> int:
        return sum(1 for b in cached_block_ids if self.blocks[b].ref_cnt == 0)

    def can_allocate(self, num_new_blocks: int, cached_block_ids: Sequence[int] = ()) -> bool:
        """Whether ``allocate(num_new_blocks, cached_block_ids)`` would succeed."""
        if not cached_block_ids:
            return num_new_blocks <= len(self._free)
        return num_new_blocks <= len(self._free) - self._num_revived(cached_block_ids)

    def allocate(self, num_new_blocks: int, cached_block_ids: Sequence[int] = ()) -> list[int]:
        """Take a reference on ``cached_block_ids``, then hand out ``num_new_blocks`` fresh ones.

        Returns ``list(cached_block_ids) + new ids``. Fresh blocks come from the front of the free
        list; a cached block handed out fresh is evicted from the cache map then.
        """
        if num_new_blocks < 0 or not self.can_allocate(num_new_blocks, cached_block_ids):
            raise BlockPoolError(
                f"cannot allocate {num_new_blocks} blocks (+{len(cached_block_ids)} cached): "
                f"{len(self._free)} free of {self.num_blocks}"
            )
        for block_id in cached_block_ids:
            block = self.blocks[block_id]
            if block.block_hash is None:
                raise BlockPoolError(f"block {block_id} is not in the prefix cache")
            if block.ref_cnt == 0:
                del self._free[block_id]
            block.ref_cnt += 1
        new_ids: list[int] = []
        for _ in range(num_new_blocks):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:  # lazy eviction happens here
                del self._hash_to_block[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            new_ids.append(block_id)
        return [*cached_block_ids, *new_ids]

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference on each block of a block table (given in table order).

        Blocks are released tail first. A block reaching zero references joins the free list:
        at the back if it is cached (evicted last, its prefix stays findable), at the front if
        not (nothing to keep).
        """
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            if block.ref_cnt <= 0:
                raise BlockPoolError(f"block {block_id} freed more times than it was allocated")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block_id] = None
                if block.block_hash is None:
                    self._free.move_to_end(block_id, last=False)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash if no block is in use; returns whether it did."""
        if len(self._free) != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self._hash_to_block.clear()
        return True
