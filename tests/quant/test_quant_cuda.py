"""Triton dequant-GEMMs on fused (row-concatenated) packed weights, on a CUDA GPU.

Models fuse q|k|v and gate|up through each format's ``concat_rows``; the cuda ``quant_linear``
must give the reference result on such weights in float32 and bfloat16.
"""

from __future__ import annotations

import pytest
import torch

from portaserve.devices import reference
from portaserve.quant import registry

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)"),
]


@pytest.mark.parametrize("fmt", ["int4", "int8", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_weights_match_the_reference(fmt: str, dtype: torch.dtype) -> None:
    pytest.importorskip("triton")
    from portaserve.quant.kernels_triton import triton_quant_linear

    gen = torch.Generator().manual_seed(0)
    parts = [registry.quantize(torch.randn(n, 4096, generator=gen) * 0.02, fmt)
             for n in (4096, 1024, 1024)]
    fused = parts[0].method.concat_rows(parts)
    assert fused is not None and fused.shape == (6144, 4096)
    x = torch.randn(3, 4096, generator=gen)
    ref = reference.quant_linear(x, fused, None)
    out = triton_quant_linear(x.to("cuda", dtype), fused.to(torch.device("cuda"))).float().cpu()
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    assert err < (1e-4 if dtype == torch.float32 else 2e-2), err
