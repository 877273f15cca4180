"""Helpers of the device conformance suite: tolerances, random inputs, paged-KV test cases.

The tests themselves are in ``test_conformance.py``; ``pytest_plugin.py`` adds the command-line
options and fixtures. Everything here builds inputs on the host in float32, casts them to the
dtype under test, and computes the expected result on the host in float32 from those cast
values, so the oracle never depends on the device under test.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

#: (atol, rtol) per compute dtype, for outputs of magnitude about 1. Roughly two units in the
#: last place of the dtype plus float32 accumulation-order noise.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for ``dtype``; unknown (8-bit) dtypes get a loose default."""
    return TOLERANCES.get(dtype, (1e-1, 1e-1))


#: fp8 KV cache formats the suite checks on devices that declare them
#: (``Capabilities.kv_cache_dtypes``), by test id.
FP8_KV_DTYPES: dict[str, torch.dtype] = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def fp8_rounding_bound(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """How far an fp8 ``dtype`` value stored for ``x`` (float32, already saturated) may lie from
    it when rounded to nearest: half a unit in the last place. That is ``eps / 2`` relative for
    normal values (e4m3: 3 mantissa bits, eps = 2^-3, so 2^-4 = 6.25%; e5m2: 12.5%) and half
    the subnormal step, ``eps * smallest_normal / 2``, absolute below the normal range."""
    info = torch.finfo(dtype)
    return torch.maximum(x.abs() * (info.eps / 2), torch.tensor(info.eps * info.smallest_normal / 2))


def generator(nodeid: str, seed: int = 0) -> torch.Generator:
    """A host generator seeded from the test id (reproducible, different per test)."""
    return torch.Generator().manual_seed(zlib.crc32(nodeid.encode()) ^ seed)


def randn(gen: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    """Float32 normal values on the host, times ``scale``."""
    return torch.randn(*shape, generator=gen) * scale


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Compare in float32 on the host with ``dtype``'s tolerance; the message names the op."""
    atol, rtol = tolerance(dtype)
    actual = actual.detach().to("cpu", torch.float32)
    expected = expected.detach().to("cpu", torch.float32)
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    torch.testing.assert_close(
        actual, expected, atol=atol, rtol=rtol,
        msg=lambda m: f"{what} ({dtype}, atol={atol}, rtol={rtol}): {m}")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``|actual - expected| / |expected|`` (Frobenius), in float32 on the host."""
    actual = actual.detach().to("cpu", torch.float32)
    expected = expected.detach().to("cpu", torch.float32)
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-12))


def dense_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """The definition of one request's attention, in float32 on the host.

    q [Q, Hq, D] holds the last Q positions of a sequence whose keys/values are k, v [S, Hk, D];
    query i sits at position S - Q + i and sees keys 0..that position. Returns [Q, Hq, D].
    """
    num_q, num_s = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)  # [S, Hq, D]
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,shd->hqs", q.float(), k) * scale  # [Hq, Q, S]
    q_pos = torch.arange(num_s - num_q, num_s)
    hidden = torch.arange(num_s)[None, :] > q_pos[:, None]  # [Q, S]
    probs = torch.softmax(scores.masked_fill(hidden[None], float("-inf")), dim=-1)
    return torch.einsum("hqs,shd->qhd", probs, v)


@dataclass(frozen=True, slots=True)
class PagedRequest:
    """One request of a paged test step: ``num_cached`` tokens already in the cache, then
    ``num_new`` tokens written and attended this step."""

    num_cached: int
    num_new: int

    @property
    def seq_len(self) -> int:
        return self.num_cached + self.num_new


#: Named batches: prefill only, prefill after a cached prefix (partial and full blocks), pure
#: decode (one request on a block boundary), and decode mixed with chunked prefill.
PAGED_SCENARIOS: dict[str, tuple[PagedRequest, ...]] = {
    "prefill": (PagedRequest(0, 1), PagedRequest(0, 7), PagedRequest(0, 37)),
    "cached_prefix": (PagedRequest(16, 4), PagedRequest(5, 1), PagedRequest(30, 19), PagedRequest(3, 13)),
    "decode": (PagedRequest(0, 1), PagedRequest(15, 1), PagedRequest(16, 1), PagedRequest(47, 1), PagedRequest(70, 1)),
    "mixed": (PagedRequest(33, 1), PagedRequest(0, 9), PagedRequest(8, 1), PagedRequest(21, 12)),
}


def scattered_block_tables(
    gen: torch.Generator, requests: tuple[PagedRequest, ...], block_size: int, spare: int = 3
) -> tuple[list[list[int]], int]:
    """Give each request its blocks from one shuffled pool (non-contiguous, out of order).

    Returns (block ids per request, total number of blocks to allocate).
    """
    needed = [-(-r.seq_len // block_size) for r in requests]
    num_blocks = sum(needed) + spare
    pool = torch.randperm(num_blocks, generator=gen).tolist()
    tables, at = [], 0
    for n in needed:
        tables.append(pool[at : at + n])
        at += n
    return tables, num_blocks


def slots(block_ids: list[int], positions: range, block_size: int) -> list[int]:
    """Cache slots (block_id * block_size + offset) of token positions of one request."""
    return [block_ids[p // block_size] * block_size + p % block_size for p in positions]
