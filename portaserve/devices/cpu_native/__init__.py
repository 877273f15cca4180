"""Native small-batch kernels for the ``cpu`` device: built from ``kernels.c`` at first use.

Decode on a CPU reads every weight once per step, so its speed is the bytes it reads and how
few instructions it spends per byte. Torch alone either reads float32 weights (4x the packed
GGUF bytes) or expands packed blocks through memory first; these kernels read the packed GGUF
blocks (Q4_0, Q4_1, Q8_0, the K formats), int8, int4 and fp8 e4m3 codes and expand them in
registers, and run decode attention straight over the block table. Prefill-sized batches stay
on the torch paths (BLAS is faster there).

The shared library is compiled once per machine with the host C compiler (``CC``, default
``cc``; ``-O3 -march=native -fopenmp``) into ``<cache dir>/kernels/`` under a name that hashes
the source, the compiler and the CPU's flags, and loaded with ``ctypes`` (which releases the
GIL during calls). Without a compiler, or with ``PORTASERVE_CPU_NATIVE=0``, ``library()`` is
``None``, ``unavailable_reason()`` says why, and the cpu device keeps its torch paths.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

from portaserve import envs

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")
#: Packed formats the native linear serves -> the ``fmt`` code in kernels.c
FORMATS = {"Q4_0": 0, "Q4_1": 1, "Q8_0": 2, "Q4_K": 3, "Q5_K": 4, "Q6_K": 5, "int8": 6, "int4": 7,
           "fp8": 8}
#: At most this many tokens go through the native linear; larger batches are compute bound
#: and the chunked-dequant BLAS path is faster.
MAX_TOKENS = 16

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_reason: str | None = None
_loaded = False

_c_int, _c_i64, _c_float, _ptr = ctypes.c_int, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _compiler_version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True,
                              timeout=30).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return ""


def _build(cc: str, target: Path) -> None:
    """Compile kernels.c into ``target`` (atomically: a temp file renamed into place)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    base = [cc, "-O3", "-fPIC", "-shared", "-fopenmp", "-std=c11", str(SOURCE), "-o", tmp, "-lm"]
    errors = []
    try:
        for arch in (["-march=native"], []):  # some compilers/arches lack -march=native
            proc = subprocess.run(base[:1] + arch + base[1:], capture_output=True, text=True,
                                  timeout=300)
            if proc.returncode == 0:
                os.replace(tmp, target)
                return
            errors.append(proc.stderr.strip()[-2000:])
        raise RuntimeError(f"{cc} failed to build {SOURCE.name}: {errors[-1]}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class Linear(ctypes.Structure):
    """kernels.c's ``ps_linear_t``: one linear layer, float32 rows or a packed format."""

    _fields_ = [("fmt", ctypes.c_int32), ("pad", ctypes.c_int32), ("n", _c_i64), ("k", _c_i64),
                ("w", _ptr), ("d", _ptr), ("m", _ptr), ("bias", _ptr), ("scales", _ptr),
                ("qh", _ptr), ("fscales", _ptr), ("zeros", _ptr), ("group", _c_i64)]


def linear_struct(weight: Any, bias: torch.Tensor | None, keep: list[Any]) -> Linear:
    """The ``ps_linear_t`` of a float32 matrix or a packed QuantizedWeight (whose tensors must
    be contiguous). The struct points into the weight's tensors, ``bias``, and any tensor made
    here (float32 copies of scales), which is appended to ``keep``: the caller keeps all of
    them alive for as long as the struct."""
    b = _p(bias)
    if isinstance(weight, torch.Tensor):
        n, k = weight.shape
        return Linear(-1, 0, n, k, weight.data_ptr(), None, None, b, None, None)
    data, fmt = weight.data, weight.format
    n, k = weight.shape
    if fmt == "fp8":  # e4m3 bytes and a float32 scale per row (a per-tensor scale repeated)
        fscales = data["weight_scale"].float().expand(n).contiguous()
        keep.append(fscales)
        return Linear(FORMATS[fmt], 0, n, k, data["weight"].data_ptr(), None, None, b, None, None,
                      fscales.data_ptr(), None, 0)
    if fmt in ("int8", "int4"):  # float32 scales (a copy where the checkpoint's are fp16)
        fscales = data["scales"].float().contiguous()
        keep.append(fscales)
        return Linear(FORMATS[fmt], 0, n, k, data["qweight"].data_ptr(), None, None, b, None,
                      None, fscales.data_ptr(), _p(data.get("zeros")),
                      weight.meta.get("group_size", k))
    codes = data["ql"] if fmt == "Q6_K" else data["qs"]
    second = data.get("m") if fmt in ("Q4_0", "Q4_1", "Q8_0") else data.get("dmin")
    return Linear(FORMATS[fmt], 0, n, k, codes.data_ptr(), data["d"].data_ptr(), _p(second), b,
                  _p(data.get("scales")), _p(data.get("qh")))


def _declare(lib: ctypes.CDLL) -> None:
    lib.ps_linear.restype = _c_int
    lib.ps_linear.argtypes = [ctypes.POINTER(Linear), _ptr, _c_i64, _c_i64, _ptr, _c_i64, _c_int]
    lib.ps_dequant_rows.restype = None
    lib.ps_dequant_rows.argtypes = [ctypes.POINTER(Linear), _c_i64, _c_i64, _ptr, _c_int]
    lib.ps_rms_norm.restype = None
    lib.ps_rms_norm.argtypes = [_ptr, _ptr, _ptr, _c_float, _c_i64, _c_i64, _ptr, _ptr]
    lib.ps_rotary.restype = None
    lib.ps_rotary.argtypes = [_ptr, _ptr, _c_i64, _c_i64, _c_i64, _c_i64, _ptr, _c_i64, _ptr]
    lib.ps_write_kv.restype = None
    lib.ps_write_kv.argtypes = [_ptr, _c_i64, _ptr, _c_i64, _c_i64, _c_i64, _ptr, _c_i64, _ptr]
    lib.ps_decode_step.restype = _c_int  # (ps_model_t *, R, hidden, positions, slots, tables,
    lib.ps_decode_step.argtypes = [_ptr, _c_i64, _ptr, _ptr, _ptr, _ptr, _c_i64,  # stride,
                                   _ptr, _ptr, _c_int, _ptr]  # seq_lens, logits, threads, profile)
    lib.ps_decode_num_phases.restype = _c_int
    lib.ps_paged_decode_attention.restype = _c_int
    lib.ps_paged_decode_attention.argtypes = [_ptr, _c_i64, _ptr, _c_i64, _c_i64, _c_i64, _c_i64,
                                              _c_i64, _ptr, _c_i64, _ptr, _c_i64, _c_float, _ptr,
                                              _c_int]


def library() -> ctypes.CDLL | None:
    """The loaded kernels, building them on first use; ``None`` when they cannot be had."""
    global _lib, _reason, _loaded
    if _loaded:
        return _lib
    with _lock:
        if _loaded:
            return _lib
        if not envs.cpu_native():
            _reason = "disabled by PORTASERVE_CPU_NATIVE=0"
        else:
            cc = envs.cc()
            if shutil.which(cc) is None:
                _reason = f"no C compiler {cc!r} on PATH (set CC or install gcc/clang)"
            else:
                key = hashlib.sha256()
                for part in (SOURCE.read_bytes(), _compiler_version(cc).encode(),
                             platform.machine().encode(), _cpu_flags().encode()):
                    key.update(part)
                target = envs.cache_dir() / "kernels" / f"cpu_native-{key.hexdigest()[:16]}.so"
                try:
                    if not target.exists():
                        logger.info("building the native cpu kernels with %s", cc)
                        _build(cc, target)
                    lib = ctypes.CDLL(str(target))
                    _declare(lib)
                    _lib = lib
                except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                    _reason = f"building or loading {target.name} failed: {e}"
        if _reason:
            logger.info("native cpu kernels unavailable: %s", _reason)
        _loaded = True
        return _lib


def unavailable_reason() -> str | None:
    """Why ``library()`` is ``None`` (after it was called), else ``None``."""
    library()
    return _reason


def _reset_for_tests() -> None:
    global _lib, _reason, _loaded
    with _lock:
        _lib, _reason, _loaded = None, None, False


def _p(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


# -- ops ----------------------------------------------------------------------------------------


def _struct(weight: Any) -> Linear:
    """The weight's ``ps_linear_t``, built once and kept in ``weight.meta`` with the tensors it
    points to (rebuilt when the meta was copied to a weight with other tensors, e.g. by
    ``select_rows``: the first rows of a weight start at the same address, hence the shape)."""
    key = (next(iter(weight.data.values())).data_ptr(), tuple(weight.shape))
    cached = weight.meta.get("_cpu_native_struct")
    if cached is None or cached[0] != key:
        keep: list[Any] = []
        struct = linear_struct(weight, None, keep)
        cached = weight.meta["_cpu_native_struct"] = (key, struct, keep)
    return cached[1]


def linear(x: torch.Tensor, weight: Any, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x float32 [T, K] @ dequant(weight).T (+ bias) -> float32 [T, N] for a packed
    ``QuantizedWeight`` of a ``FORMATS`` format (contiguous tensors, rows first). The caller
    checks ``library()`` and the format first."""
    lib = _lib
    assert lib is not None, "call library() first"
    t = x.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    n = weight.shape[0]
    out = torch.empty(t, n, dtype=torch.float32)
    rc = lib.ps_linear(ctypes.byref(_struct(weight)), x.data_ptr(), x.stride(0), t,
                       out.data_ptr(), n, torch.get_num_threads())
    if rc != 0:
        raise MemoryError(f"linear could not allocate scratch for {t} tokens")
    return out if bias is None else out.add_(bias.float())


def dequant_rows(weight: Any, r0: int, r1: int, out: torch.Tensor) -> torch.Tensor:
    """Rows [r0, r1) of a packed weight as float32 into ``out`` (contiguous [r1 - r0, K]),
    equal to the reference dequantization."""
    lib = _lib
    assert lib is not None, "call library() first"
    lib.ps_dequant_rows(ctypes.byref(_struct(weight)), r0, r1, out.data_ptr(),
                        torch.get_num_threads())
    return out


def paged_decode_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per request over a float32 ``blocks_nhd`` cache.

    query [R, Hq, D] float32; kv_cache [2, num_blocks, block_size, Hk, D]; block_tables int32
    [R, max_blocks]; seq_lens int32 [R] -> [R, Hq, D]."""
    lib = _lib
    assert lib is not None, "call library() first"
    r, hq, d = query.shape
    _, num_blocks, block_size, hk, _ = kv_cache.shape
    if query.stride(2) != 1 or query.stride(1) != d:
        query = query.contiguous()
    block_tables = block_tables.to(torch.int32).contiguous()
    seq_lens = seq_lens.to(torch.int32).contiguous()
    out = torch.empty(r, hq, d, dtype=torch.float32)
    rc = lib.ps_paged_decode_attention(
        query.data_ptr(), query.stride(0), kv_cache.data_ptr(), num_blocks, block_size, hk, d, hq,
        block_tables.data_ptr(), block_tables.stride(0), seq_lens.data_ptr(), r, scale,
        out.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise MemoryError("paged_decode_attention could not allocate its score buffer")
    return out


def _heads_dense(t: torch.Tensor) -> bool:
    """[T, heads, D] whose heads are packed within a token (any token stride)."""
    return t.stride(2) == 1 and t.stride(1) == t.shape[2]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """float32 contiguous [T, H] (and residual) -> y, or (y, x + residual)."""
    lib = _lib
    assert lib is not None, "call library() first"
    t, h = x.shape
    y = torch.empty_like(x)
    new_res = torch.empty_like(x) if residual is not None else None
    lib.ps_rms_norm(x.data_ptr(), _p(residual), weight.data_ptr(), eps, t, h, y.data_ptr(),
                    _p(new_res))
    return y if new_res is None else (y, new_res)


def rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
           cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half rotary, out of place: float32 q [T, Hq, D], k [T, Hk, D] with packed heads
    (``_heads_dense``), int64 positions, float32 contiguous cache [max_pos, rot_dim]."""
    lib = _lib
    assert lib is not None, "call library() first"
    outs = []
    rot_dim = cos_sin_cache.shape[1]
    for src in (q, k):
        t, heads, d = src.shape
        dst = torch.empty(t, heads, d, dtype=torch.float32)
        lib.ps_rotary(positions.data_ptr(), src.data_ptr(), src.stride(0), t, heads, d,
                      cos_sin_cache.data_ptr(), rot_dim, dst.data_ptr())
        outs.append(dst)
    return outs[0], outs[1]


def write_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """float32 key/value [T, Hk, D] (packed heads) into a contiguous float32 blocks_nhd cache
    at int64 slots."""
    lib = _lib
    assert lib is not None, "call library() first"
    _, num_blocks, block_size, hk, d = kv_cache.shape
    lib.ps_write_kv(key.data_ptr(), key.stride(0), value.data_ptr(), value.stride(0),
                    key.shape[0], hk * d, kv_cache.data_ptr(), num_blocks * block_size,
                    slot_mapping.data_ptr())
