"""The kernel table: one callable per op, resolved for one device.

Resolution order per op: a kernel registered for this device through
``portaserve_register_kernels`` (a vendor overriding one op), then the device's own native
kernel, then the reference. ``sources`` records which one won, so ``portaserve devices`` and
the logs show every fallback. The model calls ops as attributes: ``kernels.linear(x, w, b)``.

Fused ops (``FUSED_OPS``) resolve the same way, except that the last resort is not the
reference but the composition of the table's own ops (source ``"composed"``): a device with
native ``rotary`` and ``write_kv`` but no fused kernel keeps running its own kernels.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from portaserve.errors import DeviceError
from portaserve.plugins.device import FUSED_OPS, OP_NAMES, REFERENCE_KV_LAYOUTS

KernelFn = Callable[..., Any]
_LAYOUT_OPS = ("write_kv", "paged_attention")


@dataclass(slots=True)
class KernelTable:
    device_name: str
    kv_layout: str
    ops: dict[str, KernelFn]
    #: op -> "native", "plugin:<name>" or "reference"
    sources: dict[str, str]
    #: fused op -> "native", "plugin:<name>" or "composed"
    fused_sources: dict[str, str] = field(default_factory=dict)
    #: quant format -> kernel, and format -> source
    quant_ops: dict[str, KernelFn] = field(default_factory=dict)
    quant_sources: dict[str, str] = field(default_factory=dict)

    # The ops as attributes (bound in __post_init__ for a cheap call on the hot path).
    embedding: KernelFn = field(init=False, repr=False)
    linear: KernelFn = field(init=False, repr=False)
    rms_norm: KernelFn = field(init=False, repr=False)
    rotary: KernelFn = field(init=False, repr=False)
    silu_and_mul: KernelFn = field(init=False, repr=False)
    write_kv: KernelFn = field(init=False, repr=False)
    paged_attention: KernelFn = field(init=False, repr=False)
    all_reduce: KernelFn = field(init=False, repr=False)
    rotary_write_kv: KernelFn = field(init=False, repr=False)
    rms_norm_fp8: KernelFn = field(init=False, repr=False)
    silu_and_mul_fp8: KernelFn = field(init=False, repr=False)
    linear_rms_norm: KernelFn = field(init=False, repr=False)
    linear_silu_and_mul: KernelFn = field(init=False, repr=False)
    linear_rotary_write_kv: KernelFn = field(init=False, repr=False)
    _reference_quant: KernelFn = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for name in OP_NAMES:
            if name != "quant_linear":
                object.__setattr__(self, name, self.ops[name])
        self._reference_quant = self.ops["quant_linear"]
        # composed fused ops are built here, from this table's ops and quant kernels (so a
        # table made with ``dataclasses.replace(table, quant_ops=...)`` composes with its own)
        self.ops = dict(self.ops)
        composing = {**self.ops, "quant_linear": _QuantDispatch(self.quant_ops, self._reference_quant)}
        for name in FUSED_OPS:  # (in order: a fused op may be composed of an earlier one)
            if self.fused_sources.get(name, "composed") == "composed":
                self.ops[name] = _COMPOSE[name](composing)
            composing[name] = self.ops[name]
            object.__setattr__(self, name, self.ops[name])

    def quant_linear(self, x: Any, weight: Any, bias: Any = None) -> Any:
        """Dispatch on the weight's format; formats without a kernel use reference dequant."""
        fn = self.quant_ops.get(weight.format, self._reference_quant)
        return fn(x, weight, bias)

    @property
    def native_ops(self) -> list[str]:
        return [op for op in OP_NAMES if self.sources.get(op) != "reference"]

    @property
    def fallback_ops(self) -> list[str]:
        return [op for op in OP_NAMES if self.sources.get(op) == "reference"]


def build_kernel_table(
    device_name: str,
    kv_layout: str,
    native: Mapping[str, KernelFn],
    reference: Mapping[str, KernelFn],
    overrides: Mapping[str, tuple[str, KernelFn]] | None = None,
    native_quant: Mapping[str, KernelFn] | None = None,
    quant_overrides: Mapping[str, tuple[str, KernelFn]] | None = None,
) -> KernelTable:
    """Resolve every op for a device. ``overrides`` maps op -> (plugin name, kernel)."""
    overrides = overrides or {}
    unknown = sorted(set(native) - set(OP_NAMES) - set(FUSED_OPS))
    if unknown:
        raise DeviceError(f"device {device_name!r} declares unknown ops {unknown}; ops are "
                          f"{list(OP_NAMES)} and the optional fused {list(FUSED_OPS)}")

    def own(name: str) -> tuple[KernelFn, str] | None:
        """A plugin's kernel for ``name``, else the device's native one, else None."""
        if name in overrides:
            plugin, fn = overrides[name]
            return fn, f"plugin:{plugin}"
        return (native[name], "native") if name in native else None

    ops: dict[str, KernelFn] = {}
    sources: dict[str, str] = {}
    for name in OP_NAMES:
        found = own(name)
        if found is None:
            fn = reference[name]
            if name in _LAYOUT_OPS:
                if kv_layout not in REFERENCE_KV_LAYOUTS:
                    raise DeviceError(
                        f"device {device_name!r} uses KV layout {kv_layout!r}, which the reference "
                        f"{name} cannot read (it reads {list(REFERENCE_KV_LAYOUTS)}); the device "
                        f"must implement {name} natively")
                fn = functools.partial(fn, kv_layout=kv_layout)
            found = fn, "reference"
        ops[name], sources[name] = found
    quant_ops: dict[str, KernelFn] = {}
    quant_sources: dict[str, str] = {}
    for fmt, fn in (native_quant or {}).items():
        quant_ops[fmt], quant_sources[fmt] = fn, "native"
    for fmt, (plugin, fn) in (quant_overrides or {}).items():
        quant_ops[fmt], quant_sources[fmt] = fn, f"plugin:{plugin}"
    fused_sources: dict[str, str] = {}
    for name in FUSED_OPS:  # (the table composes those no kernel is found for)
        found = own(name)
        if found is not None:
            ops[name], fused_sources[name] = found
        else:
            fused_sources[name] = "composed"
    return KernelTable(device_name, kv_layout, ops, sources, fused_sources, quant_ops,
                       quant_sources)


def _compose_rotary_write_kv(ops: Mapping[str, KernelFn]) -> KernelFn:
    rotary, write_kv = ops["rotary"], ops["write_kv"]

    def rotary_write_kv(positions: Any, q: Any, k: Any, v: Any, cos_sin_cache: Any,
                        kv_cache: Any, slot_mapping: Any) -> Any:
        q, k = rotary(positions, q, k, cos_sin_cache)
        write_kv(k, v, kv_cache, slot_mapping)
        return q

    return rotary_write_kv


def _compose_rms_norm_fp8(ops: Mapping[str, KernelFn]) -> KernelFn:
    from portaserve.quant.fp8 import quantize_per_token

    rms_norm = ops["rms_norm"]

    def rms_norm_fp8(x: Any, weight: Any, eps: float, residual: Any = None) -> Any:
        if residual is None:
            return quantize_per_token(rms_norm(x, weight, eps))
        y, residual = rms_norm(x, weight, eps, residual)
        return quantize_per_token(y), residual

    return rms_norm_fp8


def _compose_silu_and_mul_fp8(ops: Mapping[str, KernelFn]) -> KernelFn:
    from portaserve.quant.fp8 import quantize_per_token

    silu_and_mul = ops["silu_and_mul"]

    def silu_and_mul_fp8(x: Any) -> Any:
        return quantize_per_token(silu_and_mul(x))

    return silu_and_mul_fp8


def _compose_projection_then(after: str | Callable[[Mapping[str, KernelFn]], KernelFn],
                             fused_attr: str) -> Callable[[Mapping[str, KernelFn]], KernelFn]:
    """A projection fused op: ``linear`` (``quant_linear`` for a ``QuantizedWeight``: its
    format's kernel), then the op ``after`` (a name, or a builder from the ops) on the output
    and the remaining arguments; where the projection's kernel carries ``fused_attr`` and that
    does not answer None, it runs the whole op itself."""

    def compose(ops: Mapping[str, KernelFn]) -> KernelFn:
        from portaserve.quant.base import QuantizedWeight

        linear, quant = ops["linear"], ops["quant_linear"]
        then = ops[after] if isinstance(after, str) else after(ops)

        def projection_then(x: Any, weight: Any, bias: Any = None, *rest: Any) -> Any:
            kernel = quant.kernel_for(weight.format) if isinstance(weight, QuantizedWeight) else linear
            fused = getattr(kernel, fused_attr, None)
            if fused is not None:
                out = fused(x, weight, bias, *rest)
                if out is not None:
                    return out
            return then(kernel(x, weight, bias), *rest)

        return projection_then

    return compose


class _QuantDispatch:
    """``quant_linear`` by the weight's format, as ``KernelTable.quant_linear`` dispatches."""

    def __init__(self, kernels: Mapping[str, KernelFn], fallback: KernelFn) -> None:
        self.kernels, self.fallback = kernels, fallback

    def kernel_for(self, fmt: str) -> KernelFn:
        return self.kernels.get(fmt, self.fallback)

    def __call__(self, x: Any, weight: Any, bias: Any = None) -> Any:
        return self.kernel_for(weight.format)(x, weight, bias)


def _rotary_write_kv_of_qkv(ops: Mapping[str, KernelFn]) -> KernelFn:
    """``rotary_write_kv`` of the q, k and v of a q|k|v projection's output [T, (Hq + 2 Hk) D]
    (``num_heads`` = Hq; D: ``cos_sin_cache``'s width): ``linear_rotary_write_kv``'s second part."""
    rotary_write_kv = ops["rotary_write_kv"]

    def of_qkv(qkv: Any, positions: Any, cos_sin_cache: Any, kv_cache: Any, slot_mapping: Any,
               num_heads: int) -> Any:
        num_tokens, head_dim = qkv.shape[0], cos_sin_cache.shape[-1]
        q_size = num_heads * head_dim
        kv_size = (qkv.shape[1] - q_size) // 2
        if q_size + 2 * kv_size != qkv.shape[1] or kv_size % head_dim:
            raise DeviceError(f"linear_rotary_write_kv: {qkv.shape[1]} output columns are not q|k|v "
                              f"of {num_heads} query heads and head dim {head_dim}")
        q = qkv[:, :q_size].view(num_tokens, num_heads, head_dim)
        k = qkv[:, q_size:q_size + kv_size].view(num_tokens, -1, head_dim)
        v = qkv[:, q_size + kv_size:].view(num_tokens, -1, head_dim)
        return rotary_write_kv(positions, q, k, v, cos_sin_cache, kv_cache, slot_mapping)

    return of_qkv


#: fused op -> builds it from the resolved ops it stands for (``quant_linear``: by format)
_COMPOSE: dict[str, Callable[[Mapping[str, KernelFn]], KernelFn]] = {
    "rotary_write_kv": _compose_rotary_write_kv,
    "rms_norm_fp8": _compose_rms_norm_fp8,
    "silu_and_mul_fp8": _compose_silu_and_mul_fp8,
    # (x, weight, bias, norm_weight, eps, residual) / (x, weight, bias)
    "linear_rms_norm": _compose_projection_then("rms_norm", "with_rms_norm"),
    "linear_silu_and_mul": _compose_projection_then("silu_and_mul", "with_silu_and_mul"),
    # (x, weight, bias, positions, cos_sin_cache, kv_cache, slot_mapping, num_heads)
    "linear_rotary_write_kv": _compose_projection_then(_rotary_write_kv_of_qkv, "with_rotary_write_kv"),
}
