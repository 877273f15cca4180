"""Every environment variable portaserve reads, in one place.

Read through the functions here (not ``os.environ`` elsewhere) so that the set of variables is
documented and testable. Each is read at call time, so tests can monkeypatch the environment.
"""

from __future__ import annotations

import os
from pathlib import Path


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def device() -> str | None:
    """``PORTASERVE_DEVICE``: the device to use, e.g. ``cpu`` or ``cuda:0``."""
    value = os.environ.get("PORTASERVE_DEVICE", "").strip()
    return value or None


def plugin_allowlist() -> list[str] | None:
    """``PORTASERVE_PLUGINS``: comma list of entry-point names to load; unset loads all."""
    value = os.environ.get("PORTASERVE_PLUGINS")
    if value is None:
        return None
    return [name.strip() for name in value.split(",") if name.strip()]


def disable_plugin_autoload() -> bool:
    """``PORTASERVE_DISABLE_PLUGIN_AUTOLOAD=1``: load no entry-point plugins (built-ins stay)."""
    return _flag("PORTASERVE_DISABLE_PLUGIN_AUTOLOAD")


def cache_dir() -> Path:
    """``PORTASERVE_CACHE_DIR``: where fetched models are kept (default ~/.cache/portaserve)."""
    value = os.environ.get("PORTASERVE_CACHE_DIR")
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "portaserve"


def api_key() -> str | None:
    """``PORTASERVE_API_KEY``: bearer token the server requires when ``--api-key`` is not given."""
    value = os.environ.get("PORTASERVE_API_KEY", "").strip()
    return value or None


def num_threads() -> int | None:
    """``PORTASERVE_NUM_THREADS``: CPU threads for the cpu device (default: physical cores)."""
    value = os.environ.get("PORTASERVE_NUM_THREADS", "").strip()
    return int(value) if value else None


def log_level() -> str:
    """``PORTASERVE_LOG_LEVEL``: logging level name (default INFO)."""
    return os.environ.get("PORTASERVE_LOG_LEVEL", "INFO").upper()


def openvino_precision() -> str:
    """``PORTASERVE_OPENVINO_PRECISION``: ``f32`` (default, exact) or ``auto`` (plugin defaults)."""
    return os.environ.get("PORTASERVE_OPENVINO_PRECISION", "").strip().lower() or "f32"


def openvino_weights() -> str:
    """``PORTASERVE_OPENVINO_WEIGHTS``: weight format of the openvino graph: gguf (default:
    GGUF Q4_0/Q4_1/Q8_0 blocks as they are, other weights f32), f32, int8 or int4."""
    return os.environ.get("PORTASERVE_OPENVINO_WEIGHTS", "").strip().lower() or "gguf"


def cuda_graphs() -> bool:
    """``PORTASERVE_CUDA_GRAPHS``: replay decode steps from CUDA graphs on cuda (default on;
    ``0`` runs every step op by op)."""
    return os.environ.get("PORTASERVE_CUDA_GRAPHS", "1").strip().lower() not in {"0", "false", "no", "off"}


def cuda_pdl() -> bool:
    """``PORTASERVE_CUDA_PDL``: launch the cuda device's Triton kernels with programmatic
    dependent launch on sm_90+ (each kernel starts while the one before it finishes; the
    decode GEMV prefetches its first weight tiles into L2 meanwhile). Default on: on the H200
    it took batch-1 decode from 4.47 to 4.40 ms (bf16) and 4.22 to 4.09 ms (fp8) with identical
    logits (docs/benchmarks.md); ``PORTASERVE_CUDA_PDL=0`` turns it off."""
    return os.environ.get("PORTASERVE_CUDA_PDL", "1").strip().lower() not in {"0", "false", "no", "off"}


def fp8_fast_accum() -> bool:
    """``PORTASERVE_FP8_FAST_ACCUM``: let fp8 W8A8 matmuls on cuda (``torch._scaled_mm``) keep
    their running sums in the tensor cores' reduced precision instead of promoting them to
    float32 along K (cuBLAS/CUTLASS "fast accumulation"). Default on: on an H100 it took the
    GEMMs of a 8192-token prompt step 6-17% faster and fp8 1000/1000 throughput from 14,889 to
    15,564 tok/s, at 2-3e-3 relative error against the float32 emulation where promoted sums
    are at 1.7e-3 (docs/benchmarks.md); ``PORTASERVE_FP8_FAST_ACCUM=0`` turns it off."""
    return os.environ.get("PORTASERVE_FP8_FAST_ACCUM", "1").strip().lower() not in {"0", "false", "no", "off"}


def cpu_native() -> bool:
    """``PORTASERVE_CPU_NATIVE``: build and use the cpu device's native small-batch kernels
    (``portaserve.devices.cpu_native``; default on; ``0`` keeps the torch-only paths)."""
    return os.environ.get("PORTASERVE_CPU_NATIVE", "1").strip().lower() not in {"0", "false", "no", "off"}


def cc() -> str:
    """``CC``: the C compiler that builds the native cpu kernels (default ``cc``)."""
    return os.environ.get("CC", "").strip() or "cc"
