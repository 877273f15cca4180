"""fp8 (e4m3) weights with scales, fp8 activations, and the fp8 KV cache option.

Weight: ``weight`` float8_e4m3fn [N, K] and ``weight_scale`` float32, either a scalar (per
tensor) or [N] (per output channel); ``w = weight * weight_scale``. ``meta["activation"]`` is
how activations are quantized by a W8A8 kernel: ``"dynamic_per_token"`` (default; one scale per
row of x), ``"dynamic_per_tensor"``, or ``"static"`` with ``data["input_scale"]`` from the
checkpoint (the ``compressed-tensors`` / ``fbgemm_fp8`` / vLLM "fp8" layouts all reduce to this).

The reference (``dequantize``) is weight-only: x stays in its dtype. ``fp8_linear`` is the
W8A8 computation through ``torch._scaled_mm`` (the fp8 tensor-core matmul on sm_89+; torch also
has a CPU implementation); ``fp8_linear_emulated`` states the same numerics in plain torch. The
method declares them as ``numerics["w8a8"]`` (``quant.base.Numerics``): a kernel with
``quant_numerics = "w8a8"`` is checked against the emulation, and the emulation against the
reference within ``W8A8_MAX_REL_ERROR``. Fused projections (q|k|v, gate|up) concatenate rows;
per-tensor weight scales become per-channel then (the same products).

KV cache (``EngineConfig.kv_cache_dtype``, ``--kv-cache-dtype``): ``kv_cache_dtype(name)`` maps
the option to a dtype ("fp8" and "fp8_e4m3" are ``torch.float8_e4m3fn``). The engine refuses a
format the device does not list in ``Capabilities.kv_cache_dtypes``, then allocates the cache in
it (``KVCacheSpec.dtype``: half the bytes of bf16 per token, so twice the blocks in the same
memory). ``write_kv`` stores ``reference.to_cache_dtype(x)`` (scale 1.0, saturated at +-448 for
e4m3, rounded to nearest even) and ``paged_attention`` upcasts what it reads. Prefix caching is
unchanged (block hashes are over token ids).
"""

from __future__ import annotations

import torch

from portaserve import envs
from portaserve.errors import ConfigError, ModelError
from portaserve.quant.base import Numerics, QuantizedActivation, QuantizedWeight

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0
ACTIVATION_SCHEMES = ("dynamic_per_token", "dynamic_per_tensor", "static")
KV_CACHE_DTYPES = {"auto": None, "fp8": FP8_DTYPE, "fp8_e4m3": FP8_DTYPE,
                   "fp8_e5m2": torch.float8_e5m2}
#: W8A8 against the weight-only reference, relative Frobenius error on random normal inputs:
#: e4m3 keeps 3 mantissa bits, so each quantized activation is off by up to 2^-4 of itself;
#: over a dot product that is about 3% (3.4% the worst seen over shapes, dtypes and schemes).
W8A8_MAX_REL_ERROR = 0.05
#: A W8A8 kernel against the emulation, same measure: Hopper's fp8 tensor cores (``_scaled_mm``)
#: sum products with fewer bits than float32 (seen on the H200: 9e-5 at 300 x 4096, more on
#: short dot products whose outputs are small); a wrong scale or code is off by 1e-2 or more.
W8A8_ACCUMULATION_REL_ERROR = 1e-3
#: The same with fast accumulation (``FAST_ACCUM``): 2.1e-3 at K 4096 and 3.3e-3 at 14336 on an
#: H100, still well below a wrong scale or code.
W8A8_FAST_ACCUMULATION_REL_ERROR = 5e-3
#: ``_scaled_mm``'s ``use_fast_accum`` in the cuda kernel (``kernels_triton.fp8_quant_linear``;
#: ``PORTASERVE_FP8_FAST_ACCUM``, default on; read at import, benchmarks flip it): sums kept in
#: the fp8 tensor cores' own precision along all of K.
FAST_ACCUM = envs.fp8_fast_accum()


def kv_cache_dtype(name: str, model_dtype: torch.dtype | None = None) -> torch.dtype | None:
    """The KV cache dtype for ``--kv-cache-dtype NAME`` ("auto" -> ``model_dtype``). Raises
    ``ConfigError`` (field ``kv_cache_dtype``) for an unknown name."""
    if name not in KV_CACHE_DTYPES:
        raise ConfigError(f"kv_cache_dtype must be one of {list(KV_CACHE_DTYPES)}; got {name!r}",
                          field="kv_cache_dtype")
    return KV_CACHE_DTYPES[name] or model_dtype


def amax_scale(amax: torch.Tensor) -> torch.Tensor:
    """The scale that maps ``amax`` to 448 (1 where amax is 0): ``amax * fp32(1/448)``.

    A multiply by the reciprocal, not a division: torch divides a CUDA tensor by a Python
    scalar that way (so a division here would differ between CPU and GPU in the last bit),
    and the Triton activation quantizer computes the very same product."""
    scale = amax.float() * (1.0 / FP8_MAX)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x / scale`` saturated to +-448 and rounded to e4m3 (scale broadcasts over x)."""
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


class FP8Method:
    """fp8 e4m3 weights, per-tensor or per-channel scales."""

    name = "fp8"

    @property
    def numerics(self) -> dict[str, Numerics]:
        """W8A8 (``fp8_linear_emulated``), which fp8 kernels may declare; the accumulation
        allowance is fast accumulation's while ``FAST_ACCUM`` is on."""
        accumulation = W8A8_FAST_ACCUMULATION_REL_ERROR if FAST_ACCUM else W8A8_ACCUMULATION_REL_ERROR
        return {"w8a8": Numerics(emulate=fp8_linear_emulated, max_rel_error=W8A8_MAX_REL_ERROR,
                                 accumulation_rel_error=accumulation)}

    def dequantize(self, weight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
        return self._dequant(weight.data["weight"], weight.data["weight_scale"], dtype)

    def dequantize_rows(self, weight: QuantizedWeight, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        scale = weight.data["weight_scale"]
        if scale.dim() == 1:
            scale = scale.index_select(0, rows)
        return self._dequant(weight.data["weight"].index_select(0, rows), scale, dtype)

    @staticmethod
    def _dequant(w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        s = scale.float()
        s = s[:, None] if s.dim() == 1 else s
        return (w.float() * s).to(dtype)  # [N, K]

    def select_rows(self, weight: QuantizedWeight, rows: torch.Tensor | slice) -> QuantizedWeight:
        def pick(t: torch.Tensor) -> torch.Tensor:
            return t[rows] if isinstance(rows, slice) else t.index_select(0, rows)

        data = dict(weight.data)
        data["weight"] = pick(data["weight"])
        if data["weight_scale"].dim() == 1:
            data["weight_scale"] = pick(data["weight_scale"])
        return QuantizedWeight(self.name, (data["weight"].shape[0], weight.shape[1]), data, self,
                               dict(weight.meta))

    def concat_rows(self, weights: list[QuantizedWeight]) -> QuantizedWeight | None:
        """Weights stacked along output rows (a model's fused q|k|v, gate|up). Their scales
        become one per row (a per-tensor scale repeated over its rows: the same dequantized
        values) unless all are the same per-tensor scale. None when the activation schemes or
        the static input scales differ: a W8A8 kernel quantizes x once for the fused weight, so
        fusing would change its numerics."""
        scheme = weights[0].meta.get("activation", "dynamic_per_token")
        if any(w.meta.get("activation", "dynamic_per_token") != scheme for w in weights):
            return None
        data = {"weight": torch.cat([w.data["weight"] for w in weights])}
        scales = [w.data["weight_scale"] for w in weights]
        if all(s.dim() == 0 and torch.equal(s, scales[0]) for s in scales):
            data["weight_scale"] = scales[0].clone()
        else:
            data["weight_scale"] = torch.cat([s.float().expand(w.shape[0])
                                              for s, w in zip(scales, weights, strict=True)])
        if scheme == "static":
            inputs = [w.data["input_scale"] for w in weights]
            if not all(torch.equal(i, inputs[0]) for i in inputs):
                return None
            data["input_scale"] = inputs[0].clone()
        return QuantizedWeight(self.name, (data["weight"].shape[0], weights[0].shape[1]), data,
                               self, {"activation": scheme})

    def quantize(self, w: torch.Tensor, per_channel: bool = True,
                 activation: str = "dynamic_per_token") -> QuantizedWeight:
        """Online: scale = amax / 448 per output channel (or per tensor)."""
        if w.dim() != 2:
            raise ConfigError(f"fp8: expected a 2-D weight; got shape {tuple(w.shape)}", field="weight")
        wf = w.detach().float()
        scale = amax_scale(wf.abs().amax(dim=1) if per_channel else wf.abs().amax())
        q = quantize_fp8(wf, scale[:, None] if per_channel else scale)
        return self.from_tensors(q, scale, activation=activation)

    def from_tensors(self, weight: torch.Tensor, weight_scale: torch.Tensor,
                     input_scale: torch.Tensor | None = None,
                     activation: str | None = None) -> QuantizedWeight:
        """From an fp8 checkpoint: ``weight`` e4m3 [N, K], ``weight_scale`` scalar, [1], [N] or
        [N, 1]; ``input_scale`` (a scalar) makes the activation scheme static."""
        if weight.dtype != FP8_DTYPE or weight.dim() != 2:
            raise ModelError(f"fp8: weight must be 2-D float8_e4m3fn; got {weight.dtype} "
                             f"{tuple(weight.shape)}", field="weight")
        scale = weight_scale.float().reshape(-1)
        if scale.numel() == 1:
            scale = scale.reshape(())
        elif scale.numel() != weight.shape[0]:
            raise ModelError(f"fp8: weight_scale has {scale.numel()} values for {weight.shape[0]} "
                             "rows (expected 1 or one per row)", field="weight_scale")
        activation = activation or ("static" if input_scale is not None else "dynamic_per_token")
        if activation not in ACTIVATION_SCHEMES:
            raise ConfigError(f"fp8 activation scheme must be one of {ACTIVATION_SCHEMES}; got "
                              f"{activation!r}", field="activation")
        data = {"weight": weight.contiguous(), "weight_scale": scale.contiguous()}
        if activation == "static":
            if input_scale is None:
                raise ModelError("fp8: static activation scheme needs input_scale", field="input_scale")
            data["input_scale"] = input_scale.float().reshape(())
        return QuantizedWeight(self.name, tuple(weight.shape), data, self, {"activation": activation})


def quantize_activation(x: torch.Tensor, weight: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] -> (fp8 [T, K], float32 scale [T, 1] or scalar) by the weight's scheme."""
    scheme = weight.meta.get("activation", "dynamic_per_token")
    if scheme == "static":
        scale = weight.data["input_scale"].to(x.device)
    elif scheme == "dynamic_per_tensor":
        scale = amax_scale(x.abs().amax())
    else:
        scale = amax_scale(x.abs().amax(dim=1, keepdim=True))  # [T, 1]
    return quantize_fp8(x, scale), scale


def quantize_per_token(x: torch.Tensor) -> QuantizedActivation:
    """x [T, K] -> its dynamic per-token fp8 quantization (what a fused ``*_fp8`` op yields)."""
    scale = amax_scale(x.abs().amax(dim=1, keepdim=True).float())  # [T, 1]
    return QuantizedActivation(quantize_fp8(x, scale), scale, x.dtype)


def fp8_linear_emulated(x: torch.Tensor | QuantizedActivation, weight: QuantizedWeight,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8 numerics in float32 torch: quantize x (unless it comes quantized), multiply the fp8
    values, scale the result."""
    if isinstance(x, QuantizedActivation):
        return _emulated(x.data, x.scale, weight, bias, x.dtype)
    xq, xs = quantize_activation(x, weight)
    return _emulated(xq, xs, weight, bias, x.dtype)


def _emulated(xq: torch.Tensor, xs: torch.Tensor, weight: QuantizedWeight,
              bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    ws = weight.data["weight_scale"].float()
    out = xq.float() @ weight.data["weight"].float().t()  # [T, N]
    out = out * xs * (ws if ws.dim() == 0 else ws[None, :])
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def scaled_mm(xq: torch.Tensor, x_scale: torch.Tensor, weight: QuantizedWeight,
              out_dtype: torch.dtype, fast_accum: bool = False) -> torch.Tensor:
    """fp8 ``xq`` [T, K] times the fp8 weight through ``torch._scaled_mm`` -> [T, N] in
    ``out_dtype``; ``x_scale`` is a scalar or [T, 1]. Host-sync free (CUDA-graph safe).
    ``fast_accum``: cuBLAS's ``use_fast_accum`` (a cuda kernel's choice, ``FAST_ACCUM``).

    bfloat16 output takes the scales inside the matmul (row-wise when either is a vector);
    float16 / float32 output (which row-wise scaling does not offer) takes the unscaled float32
    product and applies the scales after."""
    ws = weight.data["weight_scale"].float()
    wq = weight.data["weight"].t()  # [K, N], column-major as _scaled_mm wants
    rows = xq.shape[0]
    fast = {"use_fast_accum": True} if fast_accum else {}
    if out_dtype == torch.bfloat16:
        if x_scale.dim() == 0 and ws.dim() == 0:
            return torch._scaled_mm(xq, wq, scale_a=x_scale, scale_b=ws, out_dtype=out_dtype, **fast)
        xs = x_scale.reshape(-1, 1).expand(rows, 1).contiguous()  # [T, 1]
        ws = ws.reshape(1, -1).expand(1, weight.shape[0]).contiguous()  # [1, N]
        return torch._scaled_mm(xq, wq, scale_a=xs, scale_b=ws, out_dtype=out_dtype, **fast)
    one = torch.ones((), dtype=torch.float32, device=xq.device)
    out = torch._scaled_mm(xq, wq, scale_a=one, scale_b=one, out_dtype=torch.float32, **fast)
    out = out * x_scale.reshape(-1, 1) * (ws if ws.dim() == 0 else ws[None, :])
    return out.to(out_dtype)


def fp8_linear(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8 through ``torch._scaled_mm`` (row-wise scales when per-token / per-channel)."""
    xq, xs = quantize_activation(x, weight)
    out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32
    out = scaled_mm(xq, xs, weight, out_dtype)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out  # [T, N]

