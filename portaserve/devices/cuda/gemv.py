"""Dense GEMV for decode batches: a few rows of x against a bf16/fp16 weight, as one Triton kernel.

At batch 1 a decode step is nothing but weight reads, and cuBLAS's choice for these shapes left
bandwidth behind: on the H200 (``benchmarks/gpu_gemv.py``) it read the 8B shape's o projection
at 60% of the copy bandwidth and q|k|v at 75%, where this kernel reaches 69% and 80% (gate|up
95% vs 89%, down 89% vs 84%, lm_head slightly ahead), about 0.25 ms of a 4.6 ms step.

Each program owns BLOCK_N output columns and streams their weight rows over K. The weight tile
is the left operand of ``tl.dot`` ("swap AB": ``out^T = W x^T``), so the rows of x only pad the
16-wide right operand, and Triton pipelines the weight loads (``num_stages``) as it does for any
dot operand. Accumulation is float32; the tile config is picked per weight shape from the sweep.

Tried and dropped: folding ``rms_norm`` or ``silu_and_mul`` into the GEMV's input (every program
recomputing its input tile) measured 2-4x slower than the separate kernel + GEMV, because the
computed operand is no longer a plain pipelined load.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from portaserve.devices.cuda.launch import is_interpreted, triton_kernel
from portaserve.errors import DeviceError

#: Most rows of x the GEMV takes (the right operand of the dot is 16 wide). Larger batches go
#: to cuBLAS, whose tiles use the tensor cores fully.
MAX_ROWS = 8


@triton_kernel
def _gemv_kernel(
    x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid ``(cdiv(N, BLOCK_N),)``: output columns n0..n0+BLOCK_N of all M (<= BLOCK_M) rows."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    acc = tl.full([BLOCK_N, BLOCK_M], 0.0, dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        w = tl.load(w_rows + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(x_rows + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(w, tl.trans(x))
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
             tl.trans(acc).to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def tile_config(n: int, k: int) -> dict[str, int]:
    """(BLOCK_N, BLOCK_K, warps, stages) for a weight [N, K], from the H200 sweep of
    ``benchmarks/gpu_gemv.py --sweep`` on the Llama-3-8B shapes: narrow tiles and deeper
    pipelines for few output rows or long rows (o, down), 64-row tiles for q|k|v, short
    pipelines for the wide gate|up and lm_head (plenty of programs already)."""
    if n <= 4096 or k > 8192:
        return {"BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4, "num_stages": 5}
    if n < 16384:
        return {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 5}
    return {"BLOCK_N": 64 if n > 65536 else 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``gemv`` takes this product: at most ``MAX_ROWS`` rows of 2-D x, and a 16-bit
    weight of x's dtype with contiguous rows."""
    return (x.dim() == 2 and 0 < x.shape[0] <= MAX_ROWS
            and weight.dtype in (torch.bfloat16, torch.float16) and x.dtype == weight.dtype
            and weight.dim() == 2 and weight.stride(-1) == 1)


def gemv(x: torch.Tensor, weight: torch.Tensor, config: dict[str, int] | None = None) -> torch.Tensor:
    """``x @ weight.T`` for x [M <= 16, K], weight [N, K] -> [M, N] in x's dtype."""
    num_rows, n, k = x.shape[0], weight.shape[0], weight.shape[1]
    if x.dim() != 2 or x.shape[1] != k or num_rows > 16:
        raise DeviceError(f"cuda gemv: x {tuple(x.shape)} does not fit weight {tuple(weight.shape)} "
                          "(at most 16 rows)")
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty((num_rows, n), dtype=x.dtype, device=x.device)
    if num_rows == 0:
        return out
    cfg = dict(tile_config(n, k) if config is None else config)
    if is_interpreted(x):
        cfg.update(BLOCK_N=16, BLOCK_K=32, num_stages=1)
    block_n, block_k = cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K")
    _gemv_kernel.on(x)[(triton.cdiv(n, block_n),)](
        x, weight, out, num_rows, n, k, x.stride(0), weight.stride(0), out.stride(0),
        BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, **cfg,
    )
    return out
