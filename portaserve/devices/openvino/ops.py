"""Per-op kernels of the ``openvino`` device: each op is a small OpenVINO model, compiled once.

Every kernel here builds a tiny graph of opset ops with a dynamic token dimension, compiles it
for the device's OpenVINO target (``CPU`` here) on first use, and keeps one infer request per
(op, static sizes, dtype). Torch CPU tensors go in and come out through shared memory: inputs are
wrapped as ``openvino.Tensor`` views of the torch storage, and the output is a torch tensor the
kernel allocates and binds as the request's output, so no copy is made on either side.

Only the ops where a graph is sensible live here (``linear``, ``rms_norm``, ``silu_and_mul``,
``rotary``). ``embedding`` is a row gather and ``write_kv``/``paged_attention`` read the
``blocks_hnd`` cache the device allocates, so those fall back to the torch reference; the whole
model, paged attention included, runs as one graph through ``executor.py`` instead.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import openvino as ov
import torch
from openvino import opset13 as ops

from portaserve.errors import DeviceError

_OV_TYPES: dict[torch.dtype, Any] = {
    torch.float32: ov.Type.f32,
    torch.bfloat16: ov.Type.bf16,
    torch.float16: ov.Type.f16,
    torch.int64: ov.Type.i64,
    torch.int32: ov.Type.i32,
}
# numpy has no bfloat16: a bf16 tensor travels as its int16 bit pattern and is retyped in OpenVINO.
_NUMPY_VIEW: dict[torch.dtype, torch.dtype] = {torch.bfloat16: torch.int16}


def to_ov(t: torch.Tensor) -> ov.Tensor:
    """An ``openvino.Tensor`` sharing ``t``'s memory (a contiguous CPU tensor)."""
    if not t.is_contiguous():
        t = t.contiguous()
    ov_type = _OV_TYPES.get(t.dtype)
    if ov_type is None:
        raise DeviceError(f"openvino: no OpenVINO element type for torch dtype {t.dtype}")
    view = t.view(_NUMPY_VIEW[t.dtype]) if t.dtype in _NUMPY_VIEW else t
    return ov.Tensor(view.numpy(), list(t.shape), ov_type)


def _param(shape: list[int], ov_type: Any, name: str) -> Any:
    node = ops.parameter(shape, ov_type, name=name)
    node.output(0).get_tensor().set_names({name})
    return node


class OpCache:
    """Compiled op models keyed by (op, sizes, dtype), each with its own infer request."""

    def __init__(self, core: ov.Core, target: str, config: dict[str, Any]) -> None:
        self._core = core
        self._target = target
        self._config = config
        self._requests: dict[tuple[Any, ...], ov.InferRequest] = {}
        self._lock = threading.Lock()

    def request(self, key: tuple[Any, ...], build: Callable[[], ov.Model]) -> ov.InferRequest:
        req = self._requests.get(key)
        if req is None:
            with self._lock:
                req = self._requests.get(key)
                if req is None:
                    try:
                        compiled = self._core.compile_model(build(), self._target, self._config)
                    except RuntimeError as e:
                        raise DeviceError(f"openvino: compiling op {key} failed: {e}") from e
                    req = compiled.create_infer_request()
                    self._requests[key] = req
        return req

    def __len__(self) -> int:
        return len(self._requests)


def _run(req: ov.InferRequest, inputs: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    for i, t in enumerate(inputs):
        req.set_input_tensor(i, to_ov(t))
    req.set_output_tensor(0, to_ov(out))
    req.infer()
    return out


def _rms(x: Any, weight: Any, eps: float) -> Any:
    """y = x / sqrt(mean(x^2) + eps) * weight over the last axis, computed in f32."""
    xf = ops.convert(x, ov.Type.f32)
    mean = ops.reduce_mean(ops.multiply(xf, xf), np.array([-1], np.int64), keep_dims=True)
    inv = ops.divide(np.float32(1.0), ops.sqrt(ops.add(mean, np.float32(eps))))
    return ops.multiply(ops.multiply(xf, inv), ops.convert(weight, ov.Type.f32))


class OpenVINOKernels:
    """The native ops of the ``openvino`` device (see the module docstring)."""

    def __init__(self, cache: OpCache) -> None:
        self.cache = cache

    def table(self) -> dict[str, Callable[..., Any]]:
        return {
            "linear": self.linear,
            "rms_norm": self.rms_norm,
            "silu_and_mul": self.silu_and_mul,
            "rotary": self.rotary,
        }

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        num_tokens, k = x.shape  # x [T, K], weight [N, K]
        n = weight.shape[0]
        if weight.shape[1] != k:
            raise DeviceError(f"openvino linear: x {tuple(x.shape)} and weight {tuple(weight.shape)} disagree on K")
        has_bias = bias is not None
        key = ("linear", k, n, x.dtype, weight.dtype, has_bias)

        def build() -> ov.Model:
            px = _param([-1, k], _OV_TYPES[x.dtype], "x")
            pw = _param([n, k], _OV_TYPES[weight.dtype], "w")
            params = [px, pw]
            y = ops.matmul(ops.convert(px, ov.Type.f32), ops.convert(pw, ov.Type.f32), False, True)
            if has_bias:
                pb = _param([n], _OV_TYPES[bias.dtype], "b")  # type: ignore[union-attr]
                params.append(pb)
                y = ops.add(y, ops.convert(pb, ov.Type.f32))
            return ov.Model([ops.convert(y, _OV_TYPES[x.dtype])], params, "linear")

        inputs = [x, weight] + ([bias] if bias is not None else [])
        out = torch.empty((num_tokens, n), dtype=x.dtype)  # [T, N]
        return _run(self.cache.request(key, build), inputs, out)

    def rms_norm(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        num_tokens, hidden = x.shape  # [T, H]
        has_residual = residual is not None
        key = ("rms_norm", hidden, x.dtype, weight.dtype, float(eps), has_residual)
        dtype = _OV_TYPES[x.dtype]

        def build() -> ov.Model:
            px = _param([-1, hidden], dtype, "x")
            pw = _param([hidden], _OV_TYPES[weight.dtype], "w")
            params = [px, pw]
            xin: Any = px
            outputs = []
            if has_residual:
                pr = _param([-1, hidden], dtype, "residual")
                params.append(pr)
                xin = ops.convert(
                    ops.add(ops.convert(px, ov.Type.f32), ops.convert(pr, ov.Type.f32)), dtype)
            outputs.append(ops.convert(_rms(xin, pw, eps), dtype))
            if has_residual:
                outputs.append(xin)
            return ov.Model(outputs, params, "rms_norm")

        req = self.cache.request(key, build)
        y = torch.empty((num_tokens, hidden), dtype=x.dtype)
        if residual is None:
            return _run(req, [x, weight], y)
        summed = torch.empty((num_tokens, hidden), dtype=x.dtype)
        req.set_output_tensor(1, to_ov(summed))
        _run(req, [x, weight, residual], y)
        return y, summed

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        num_tokens, two_i = x.shape  # [T, 2I]
        inter = two_i // 2
        key = ("silu_and_mul", two_i, x.dtype)
        dtype = _OV_TYPES[x.dtype]

        def build() -> ov.Model:
            px = _param([-1, two_i], dtype, "x")
            gate, up = ops.split(ops.convert(px, ov.Type.f32), np.int64(-1), 2).outputs()
            y = ops.multiply(ops.swish(gate), up)
            return ov.Model([ops.convert(y, dtype)], [px], "silu_and_mul")

        out = torch.empty((num_tokens, inter), dtype=x.dtype)  # [T, I]
        return _run(self.cache.request(key, build), [x], out)

    def rotary(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        cos_sin_cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        num_tokens, num_q_heads, head_dim = q.shape  # [T, Hq, D]
        num_k_heads = k.shape[1]  # k [T, Hk, D]
        key = ("rotary", num_q_heads, num_k_heads, head_dim, q.dtype, cos_sin_cache.dtype)
        dtype = _OV_TYPES[q.dtype]

        def build() -> ov.Model:
            pp = _param([-1], ov.Type.i64, "positions")
            pq = _param([-1, num_q_heads, head_dim], dtype, "q")
            pk = _param([-1, num_k_heads, head_dim], dtype, "k")
            pc = _param([-1, head_dim], _OV_TYPES[cos_sin_cache.dtype], "cos_sin_cache")
            cos, sin = rotary_cos_sin(pc, pp)
            outs = [ops.convert(rotate_half(ops.convert(t, ov.Type.f32), cos, sin), dtype)
                    for t in (pq, pk)]
            return ov.Model(outs, [pp, pq, pk, pc], "rotary")

        req = self.cache.request(key, build)
        q_out = torch.empty_like(q, memory_format=torch.contiguous_format)
        k_out = torch.empty_like(k, memory_format=torch.contiguous_format)
        req.set_output_tensor(1, to_ov(k_out))
        _run(req, [positions.to(torch.int64), q, k, cos_sin_cache], q_out)
        return q_out, k_out


def rotary_cos_sin(cos_sin_cache: Any, positions: Any) -> tuple[Any, Any]:
    """cos and sin rows of ``positions``, shaped [T, 1, D/2] for broadcasting over heads."""
    rows = ops.convert(ops.gather(cos_sin_cache, positions, np.int64(0)), ov.Type.f32)  # [T, D]
    rows = ops.unsqueeze(rows, np.int64(1))  # [T, 1, D]
    cos, sin = ops.split(rows, np.int64(-1), 2).outputs()  # [T, 1, D/2] each
    return cos, sin


def rotate_half(t: Any, cos: Any, sin: Any) -> Any:
    """NeoX rotary on [T, H, D]: (t1*cos - t2*sin, t2*cos + t1*sin) over the two halves."""
    t1, t2 = ops.split(t, np.int64(-1), 2).outputs()
    first = ops.subtract(ops.multiply(t1, cos), ops.multiply(t2, sin))
    second = ops.add(ops.multiply(t2, cos), ops.multiply(t1, sin))
    return ops.concat([first, second], -1)
