"""How the Triton kernels of the cuda/rocm devices are launched on any torch tensor.

A kernel is written once as a plain Python function and wrapped by ``triton_kernel``. On GPU
tensors it runs compiled (``triton.jit``); on CPU tensors it runs in Triton's interpreter, so CI
and the conformance suite can check the very same kernel code on a machine without a GPU,
whatever ``TRITON_INTERPRET`` says (with ``TRITON_INTERPRET=1`` set, GPU tensors run
interpreted too, which is Triton's own behaviour). The interpreter's bfloat16 arithmetic is
not exact: check kernels in float32/float16 there.

Rule for kernel code: call no ``@triton.jit`` helper from ``triton.language.standard``
(``tl.sum``, ``tl.max``, ``tl.cdiv``, ``tl.zeros``, ``tl.sigmoid``...). When Triton was imported
without ``TRITON_INTERPRET=1`` those are compiled-only functions the interpreter cannot call.
Reduce with ``tl.reduce(x, axis, SUM)`` / ``tl.reduce(x, axis, MAX)`` (the interpreter knows
these combine functions and runs them as numpy reductions) and use ``tl.full`` for zeros.
"""

from __future__ import annotations

import inspect
import os
import threading
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

_ENV_LOCK = threading.Lock()

#: Combine functions for ``tl.reduce`` (Triton's own, so the interpreter reduces them natively).
SUM = tl.standard._sum_combine
MAX = tl.standard._elementwise_max


def _jit(fn: Callable[..., Any], no_specialize: tuple[str, ...]) -> Any:
    """``triton.jit``, telling it not to specialize the arguments ``no_specialize`` (on the
    value 1, on divisibility by 16, on pointer alignment) where this Triton knows how."""
    if not no_specialize:
        return triton.jit(fn)
    known = inspect.signature(triton.jit).parameters
    kw = {name: list(no_specialize) for name in ("do_not_specialize", "do_not_specialize_on_alignment")
          if name in known}
    return triton.jit(fn, **kw)


def _jit_interpreted(fn: Callable[..., Any], no_specialize: tuple[str, ...]) -> Any:
    """``triton.jit`` with the interpreter forced on (Triton reads the flag at decoration)."""
    with _ENV_LOCK:
        old = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            return _jit(fn, no_specialize)
        finally:
            if old is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = old


class TritonKernel:
    """One Triton kernel, compiled for GPU tensors and interpreted for CPU tensors.

    ``kernel.on(tensor)[grid](*args, **constexprs)`` launches it for ``tensor``'s device.
    """

    def __init__(self, fn: Callable[..., Any], no_specialize: tuple[str, ...] = ()) -> None:
        self.fn = fn
        self.no_specialize = no_specialize
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self._compiled: Any = None
        self._interpreted: Any = None

    def on(self, tensor: torch.Tensor) -> Any:
        if tensor.device.type == "cpu":
            if self._interpreted is None:
                self._interpreted = _jit_interpreted(self.fn, self.no_specialize)
            return self._interpreted
        if self._compiled is None:
            self._compiled = _jit(self.fn, self.no_specialize)
        return self._compiled


def triton_kernel(fn: Callable[..., Any] | None = None, *, no_specialize: tuple[str, ...] = ()) -> Any:
    """Decorator: make ``fn`` a ``TritonKernel`` (see the module docstring).

    ``no_specialize`` names arguments whose value changes from step to step in ways Triton
    would otherwise compile a variant for (a count that is sometimes 1 or a multiple of 16, a
    pointer into a slice that is not 16-byte aligned): each variant is a compile of about a
    second the first time it shows up, mid-run. Only for arguments whose specialization buys
    nothing (scalar loads, loop bounds)."""
    if fn is None:
        return lambda f: TritonKernel(f, no_specialize)
    return TritonKernel(fn, no_specialize)


def is_interpreted(tensor: torch.Tensor) -> bool:
    """Whether kernels on ``tensor`` run in the interpreter (smaller tiles keep it quick)."""
    if tensor.device.type == "cpu":
        return True
    knobs = getattr(triton, "knobs", None)  # Triton's own flag; knobs exist since Triton 3.4
    return bool(knobs is not None and knobs.runtime.interpret)


_PDL: dict[int, bool] = {}


def triton_has_pdl() -> bool:
    """Whether this Triton launches with PDL (``launch_pdl``) and has the ``gdc_*`` calls the
    kernels use: 3.3 and later (the project allows triton >= 3.0)."""
    try:
        major, minor = (int(part) for part in triton.__version__.split(".")[:2])
    except ValueError:
        return False
    cuda_extra = getattr(tl.extra, "cuda", None)
    return (major, minor) >= (3, 3) and all(
        hasattr(cuda_extra, name) for name in ("gdc_wait", "gdc_launch_dependents"))


def pdl(tensor: torch.Tensor) -> bool:
    """Whether kernels on ``tensor`` launch with programmatic dependent launch (PDL): asked for
    (``envs.cuda_pdl``, on by default), compiled (not the interpreter), Triton 3.3+, an NVIDIA
    GPU of compute capability 9+.

    A kernel launched so is passed ``PDL=True`` and must begin with
    ``tl.extra.cuda.gdc_launch_dependents()`` (the next kernel may launch now) and
    ``tl.extra.cuda.gdc_wait()`` (the previous kernel has finished and its writes are visible)
    before it touches any memory the kernels before it write: with every kernel of a chain
    waiting so, ordering holds transitively. Kernels not launched so (torch's, cuBLAS's) keep
    plain stream order with their neighbours. Read-only data (weights) may be prefetched
    between the two calls: that is the gain, beside the hidden launch latency."""
    if is_interpreted(tensor) or tensor.device.type != "cuda" or torch.version.hip:
        return False
    index = tensor.device.index or 0
    if index not in _PDL:
        from portaserve import envs

        _PDL[index] = (envs.cuda_pdl() and triton_has_pdl()
                       and torch.cuda.get_device_capability(index)[0] >= 9)
    return _PDL[index]


class _Helper(triton.runtime.jit.JITFunction):
    """A ``@triton.jit`` function for kernels to call (``triton_helper``)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Only reached from a kernel running in the interpreter (a compiled kernel inlines the
        # helper): there its body runs as Python, ``tl`` patched like the kernel's own.
        return self.fn(*args, **kwargs)


def triton_helper(fn: Callable[..., Any]) -> Any:
    """Decorator for a function that ``triton_kernel`` kernels call: compiled into them on a
    GPU and run as Python when they are interpreted (a plain ``@triton.jit`` function refuses
    to be called from the interpreter). Define it in the kernels' module, so that the
    interpreter's patching of that module's ``tl`` covers it."""
    return _Helper(fn)


@triton_helper
def prefetch_l2(ptrs):
    """Pull the 128-byte lines holding ``ptrs`` into L2: a hint, nothing waits for it. For a
    kernel launched with PDL to fetch read-only data (weights) while the kernel before it
    finishes; compiled kernels only (inline PTX)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)


def pdl_options(tensor: torch.Tensor) -> tuple[dict[str, Any], dict[str, Any]]:
    """(constexprs, launch options) for a kernel with a ``PDL`` constexpr on ``tensor``."""
    on = pdl(tensor)
    return {"PDL": on}, ({"launch_pdl": True} if on else {})


def fp8_codes_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype a kernel quantizing ``tensor`` to fp8 e4m3 stores its codes in: e4m3 when
    compiled; float32 quotients in the interpreter, whose fp8 casts round wrongly (32 became
    16), for torch to convert (``.to(FP8_DTYPE)`` after the launch; free when already e4m3)."""
    return torch.float32 if is_interpreted(tensor) else torch.float8_e4m3fn


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


#: (kernel, tensor dtype, constexprs, warps, stages) asked for -> (constexprs, stages) that fit.
_FITTED: dict[tuple, tuple[dict[str, Any], int]] = {}


def launch_fitting(
    kernel: TritonKernel,
    tensor: torch.Tensor,
    grid: tuple[int, ...],
    args: tuple[Any, ...],
    constexprs: dict[str, Any],
    *,
    num_warps: int,
    num_stages: int,
) -> None:
    """Launch, shrinking the tiles while the compiled kernel needs more shared memory than the
    GPU has (Triton's ``OutOfResources``, raised before anything runs): first fewer pipeline
    stages, then half the ``BLOCK_N`` keys per tile. The fitted config is remembered."""
    from triton.runtime.errors import OutOfResources

    key = (kernel.__name__, tensor.dtype, *constexprs.values(), num_warps, num_stages)
    if key in _FITTED:
        constexprs, num_stages = _FITTED[key]
    fitted = dict(constexprs)
    while True:
        try:
            kernel.on(tensor)[grid](*args, **fitted, num_warps=num_warps, num_stages=num_stages,
                                    **({"launch_pdl": True} if fitted.get("PDL") else {}))
        except OutOfResources:
            if num_stages > 1:
                num_stages -= 1
            elif fitted.get("BLOCK_N", 0) > 16:
                fitted["BLOCK_N"] //= 2
            else:
                raise
            continue
        _FITTED[key] = (fitted, num_stages)
        return


#: (device, user) -> zeroed int32 counters of a kernel whose last program merges the others'.
_COUNTERS: dict[tuple[torch.device, str], torch.Tensor] = {}
#: Outgrown counter buffers, never freed: a captured graph may still use one.
_RETIRED: list[torch.Tensor] = []


def split_counters(device: torch.device, count: int, user: str) -> torch.Tensor:
    """At least ``count`` zeroed int32 counters on ``device`` for kernel family ``user``.

    For kernels whose work units are split over programs that each store a partial result
    and bump a counter, the last to arrive merging the rest and resetting the counter to zero.
    So the counters are zero between launches, and one buffer serves every launch on the
    device's stream, captured graphs included (they hold its address). It only grows outside
    graph capture (a warm-up run at each captured size allocates it first); an eager launch
    larger than any captured one (more decode rows than the largest graph) grows it, and the
    outgrown buffer stays allocated for the graphs that use it."""
    key = (device, user)
    counters = _COUNTERS.get(key)
    if counters is None or counters.numel() < count:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{user}: split counters must be allocated before graph capture "
                               "(run the same shapes once eagerly first)")
        counters = torch.zeros(max(count, 1024), dtype=torch.int32, device=device)
        if key in _COUNTERS:  # graphs captured earlier hold the old buffer's address: keep it
            _RETIRED.append(_COUNTERS[key])
        _COUNTERS[key] = counters
    return counters
