"""portaserve-example-device: the smallest useful vendor device plugin.

It registers the device ``example``, which computes on the host through torch, keeps its KV
cache in the ``blocks_hnd`` layout, implements ``rms_norm`` natively (the fused residual add and
the normalization in one function) and lets every other op fall back to portaserve's reference.
A second hook adds a ``silu_and_mul`` kernel to the same device, the way a vendor adds one
kernel to a device it does not own. Copy this package and replace the kernels with yours.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import portaserve
from portaserve.devices.reference import allocate_kv_cache
from portaserve.plugins.device import Availability, Capabilities, Device, KVCacheSpec

#: The portaserve plugin API this package is written for (checked when portaserve loads it).
PORTASERVE_PLUGIN_API = "1.0"


def fused_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``y = x / rms(x) * weight``; with a residual, ``x`` becomes ``x + residual`` first."""
    if residual is not None:
        x = (x.float() + residual.float()).to(x.dtype)  # [T, H], the new residual stream
    xf = x.float()
    inv_rms = torch.rsqrt(xf.square().mean(dim=-1, keepdim=True).add_(eps))  # [T, 1]
    y = (xf * inv_rms).mul_(weight.float()).to(x.dtype)
    return y if residual is None else (y, x)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``x = [gate | up]`` [T, 2I] -> [T, I], in float32 inside."""
    gate, up = x.float().chunk(2, dim=-1)
    return (gate * torch.sigmoid(gate) * up).to(x.dtype)


class ExampleDevice(Device):
    """A pretend accelerator that runs on the host CPU."""

    name = "example"
    priority = 1  # below cpu (10): used only when asked for, e.g. --device example

    @classmethod
    def probe(cls) -> Availability:
        return Availability(True, f"host CPU through torch {torch.__version__} (example device)")

    def capabilities(self) -> Capabilities:
        return Capabilities(
            dtypes=(torch.float32, torch.bfloat16),
            kv_block_sizes=(16, 32),
            kv_layout="blocks_hnd",
            default_max_num_seqs=16,
            default_kv_cache_bytes=1 << 30,
            extra={"vendor": "portaserve examples"},
        )

    def kernels(self) -> dict[str, Callable[..., object]]:
        return {"rms_norm": fused_rms_norm}

    def allocate_kv_cache(self, spec: KVCacheSpec) -> list[torch.Tensor]:
        return allocate_kv_cache(spec, torch.device("cpu"), "blocks_hnd")


@portaserve.hookimpl
def portaserve_register_devices(register: Callable[[type], None]) -> None:
    register(ExampleDevice)


@portaserve.hookimpl
def portaserve_register_kernels(register: Callable[..., None]) -> None:
    register("example", "silu_and_mul", silu_and_mul)
