"""Pull whole tensors into L2 ahead of the kernel that reads them: ``prefetch_l2``.

At batch 1 a decode layer's small weights (the 8B shape's o projection: 8.4 MB as int4) are
read by GEMVs that run at well under the copy bandwidth, while the decode attention before
them (a few microseconds over a short context) leaves the memory system nearly idle. A launch
of ``_prefetch_kernel`` between the two asks the TMA unit for the weight's bytes in large
pieces (``cp.async.bulk.prefetch.L2``, sm_90+: one instruction per piece, nothing waits for
it), so the GEMV after the attention finds them in L2. It changes no result. Launched with
programmatic dependent launch where the chain uses it, the kernel after it starts at once.

Experimental: ``benchmarks/gpu_quant.py --decode-variant prefetch_o`` times it in the int4
batch-1 step (the model does not call it yet).
"""

from __future__ import annotations

import torch
import triton.language as tl

from portaserve.devices.cuda.launch import is_interpreted, pdl_options, triton_kernel

#: Bytes of one bulk prefetch (a multiple of 16), and pieces a program asks for (one a lane of
#: its single warp): 128 KiB a program.
PIECE_BYTES = 4096
PIECES = 32

_BULK_PREFETCH_ASM = tl.constexpr("""{
    .reg .pred p;
    setp.ne.s32 p, $2, 0;
    @p cp.async.bulk.prefetch.L2.global [$1], $2;
    mov.u32 $0, 0;
}""")


@triton_kernel
def _prefetch_kernel(ptr, nbytes, PIECE: tl.constexpr, PIECES: tl.constexpr, ASM: tl.constexpr,
                     PDL: tl.constexpr):
    """Grid ``(cdiv(nbytes, PIECE * PIECES),)``, one warp: lane i asks for bytes
    ``[start, start + PIECE)`` of its program's range (the last piece cut to whole 16 bytes;
    an empty one asks for nothing). ``ASM`` False (the interpreter): the sizes only."""
    if PDL:  # the next kernel may launch now; this one reads nothing the kernels before write
        tl.extra.cuda.gdc_launch_dependents()
    start = tl.program_id(0).to(tl.int64) * (PIECE * PIECES) + tl.arange(0, PIECES).to(tl.int64) * PIECE
    size = (tl.minimum(tl.maximum(nbytes - start, 0), PIECE) // 16 * 16).to(tl.int32)
    if ASM:
        tl.inline_asm_elementwise(_BULK_PREFETCH_ASM, "=r,l,r", [ptr + start, size], dtype=tl.int32,
                                  is_pure=False, pack=1)
    if PDL:  # (so that a PDL kernel after this one still waits for everything before it)
        tl.extra.cuda.gdc_wait()


def prefetch_bytes(tensor: torch.Tensor) -> int:
    """The bytes ``prefetch_l2`` asks for of ``tensor`` (0: not a contiguous, 16-byte aligned
    CUDA tensor, which it skips)."""
    if tensor.device.type != "cuda" or not tensor.is_contiguous() or tensor.data_ptr() % 16:
        return 0
    return tensor.numel() * tensor.element_size() // 16 * 16


def prefetch_l2(tensors: list[torch.Tensor]) -> int:
    """Launch a prefetch of each tensor into L2 (on the current stream, so a CUDA graph captures
    it); returns the bytes asked for. A hint: the data is not changed, nothing waits for it."""
    total = 0
    for tensor in tensors:
        nbytes = prefetch_bytes(tensor)
        if nbytes:
            launch_prefetch(tensor.reshape(-1).view(torch.uint8), nbytes)
            total += nbytes
    return total


def launch_prefetch(data: torch.Tensor, nbytes: int) -> None:
    """One ``_prefetch_kernel`` launch over the first ``nbytes`` of the bytes ``data`` (uint8,
    contiguous, 16-byte aligned), on any device the kernels run on (the interpreter computes
    the pieces and asks for nothing)."""
    if data.dtype != torch.uint8 or nbytes > data.numel() or nbytes % 16:
        raise ValueError(f"launch_prefetch: {nbytes} bytes (a multiple of 16) of a uint8 tensor of "
                         f"{data.numel()} ({data.dtype})")
    constexprs, options = pdl_options(data)
    grid = (max(1, -(-nbytes // (PIECE_BYTES * PIECES))),)
    _prefetch_kernel.on(data)[grid](data, nbytes, PIECE=PIECE_BYTES, PIECES=PIECES,
                                    ASM=not is_interpreted(data), num_warps=1, **constexprs, **options)
