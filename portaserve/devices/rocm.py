"""The ``rocm`` device: AMD GPUs through a ROCm (HIP) build of torch and Triton's AMD backend.

It runs the cuda device's Triton kernels unchanged (``portaserve/devices/cuda/``); torch's HIP
builds expose the GPU through the ``torch.cuda`` namespace, so allocation, memory queries and
synchronisation are shared too (``TritonGPUDevice``). It is chosen from the torch build
(``torch.version.hip`` set), never from a device name in core. Graph capture stays off until
it has been measured on an AMD GPU; RCCL serves tensor parallelism under the ``nccl`` name.

Status: no AMD GPU was available to this project. The kernels are checked in Triton's
interpreter in CI (the same code the AMD backend compiles) and the probe/selection logic is
unit-tested with a faked HIP build; nothing has run on real ROCm hardware yet.
"""

from __future__ import annotations

from typing import Any

from portaserve import hookimpl
from portaserve.devices.cuda import TritonGPUDevice, probe_gpu
from portaserve.plugins.device import Availability

PORTASERVE_PLUGIN_API = "1.0"


class RocmDevice(TritonGPUDevice):
    """AMD Instinct / Radeon GPUs: torch (hipBLASLt) GEMMs and the Triton kernels."""

    name = "rocm"
    priority = 100
    graph_capture = False

    @classmethod
    def probe(cls) -> Availability:
        return probe_gpu("hip")


@hookimpl
def portaserve_register_devices(register: Any) -> None:
    register(RocmDevice)
