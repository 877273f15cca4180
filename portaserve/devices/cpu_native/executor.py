"""The cpu device's whole-model executor: decode steps of Llama-family models in one native call.

Op by op, a decode step of a small model on a CPU is mostly overhead: every op is a Python call,
a few tensor allocations and an OpenMP fork/join (SmolLM2-135M has 30 layers of about 12 ops).
``ps_decode_step`` (kernels.c) runs the whole step, embeddings in and logits out, inside one
parallel region with the same kernels the op-by-op path uses (so the two agree to float32
rounding). Steps that are not pure decode (prefill, chunked prefill mixed with decode) and
batches larger than ``MAX_DECODE_ROWS`` run op by op through the model, exactly as without an
executor.

``build_executor`` says why a model does not qualify (``None, reason``): it takes float32
Llama-family models (``LlamaForCausalLM``, SiLU MLP, no q/k norm, rotary over the whole head)
whose linears are float32, GGUF Q4_0 / Q4_1 / Q8_0 / Q4_K / Q5_K / Q6_K, int8, int4 or fp8
e4m3 (weight-only), with fused q|k|v and gate|up, over a float32 ``blocks_nhd`` KV cache (an
fp8 cache, ``EngineConfig.kv_cache_dtype``, runs op by op: the C kernels read float32 caches
only).
"""

from __future__ import annotations

import ctypes
from dataclasses import replace
from typing import Any

import torch

from portaserve.core.batch import ScheduledBatch
from portaserve.devices import cpu_native
from portaserve.quant.base import QuantizedWeight

#: Decode batches up to this many requests run natively (larger ones are compute bound and the
#: tiled native linear re-expands each weight block once per 8 tokens; BLAS is better there).
MAX_DECODE_ROWS = 32

#: The phases ``NativeDecodeExecutor.profile`` times, in kernels.c's order.
PHASES = ("norms", "qkv", "rotary + KV write", "attention", "o proj", "gate_up", "silu*up",
          "down", "lm_head")

_ptr, _i64, _i32, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", _ptr), ("post_norm", _ptr), ("qkv", cpu_native.Linear),
                ("o", cpu_native.Linear), ("gate_up", cpu_native.Linear),
                ("down", cpu_native.Linear), ("kv_cache", _ptr)]


class _Model(ctypes.Structure):
    _fields_ = [("num_layers", _i64), ("hidden", _i64), ("num_heads", _i64),
                ("num_kv_heads", _i64), ("head_dim", _i64), ("inter", _i64),
                ("num_blocks", _i64), ("block_size", _i64), ("eps", _f32), ("scale", _f32),
                ("cos_sin", _ptr), ("final_norm", _ptr), ("lm_head", cpu_native.Linear),
                ("layers", ctypes.POINTER(_Layer))]


class _Unsupported(Exception):
    pass


class NativeDecodeExecutor:
    """``Executor`` for the cpu device. Build with ``build_executor``."""

    def __init__(self, model: Any, kv_caches: list[Any], lib: ctypes.CDLL, struct: _Model,
                 keep: list[Any]) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self._lib = lib
        self._struct = struct
        self._keep = keep  # every tensor and ctypes array the struct points into
        self.vocab_size = struct.lm_head.n
        self.native_steps = 0  # steps run natively (for tests and the step profiler)
        #: When set to a float64 tensor of len(PHASES) zeros, native steps add the seconds
        #: each phase took (measured by one thread between the barriers that end the phases).
        self.profile: torch.Tensor | None = None

    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        """Float32 logits [len(batch.logits_indices), vocab] of one step."""
        r = batch.num_reqs
        if r == 0:
            return self._op_by_op(batch)
        if batch.num_tokens == r:
            if r > MAX_DECODE_ROWS:
                return self._op_by_op(batch)
            logits = self._native(batch)
            return logits if batch.logits_indices.numel() == r else logits[batch.logits_indices]
        qlens = batch.query_start_loc[1:] - batch.query_start_loc[:-1]
        ones = (qlens == 1).nonzero().flatten().tolist()
        if not ones or len(ones) > MAX_DECODE_ROWS:
            return self._op_by_op(batch)
        # a mixed step (prefills joining running decodes): the one-token rows run natively,
        # the rest op by op; requests never read each other's KV writes, so order is free
        many = (qlens != 1).nonzero().flatten().tolist()
        logits = torch.empty(batch.logits_indices.numel(), self.vocab_size, dtype=torch.float32)
        for rows, run in ((ones, self._native), (many, self._op_by_op)):
            part, where = _subset(batch, rows)
            out = run(part)  # runs even when no row samples: the step writes their KV
            if where.numel():
                logits[where] = out[part.logits_indices] if run is self._native else out
        return logits

    def _native(self, batch: ScheduledBatch) -> torch.Tensor:
        """A pure decode batch (one token per request, at most MAX_DECODE_ROWS)."""
        r = batch.num_reqs
        hidden = self.model._embed(batch.token_ids).float().contiguous()  # [R, H]; scratch below
        logits = torch.empty(r, self.vocab_size, dtype=torch.float32)
        positions = batch.positions.to(torch.int64).contiguous()
        slots = batch.slot_mapping.to(torch.int64).contiguous()
        tables = batch.block_tables.to(torch.int32).contiguous()
        seq_lens = batch.seq_lens.to(torch.int32).contiguous()
        rc = self._lib.ps_decode_step(
            ctypes.addressof(self._struct), r, hidden.data_ptr(), positions.data_ptr(),
            slots.data_ptr(), tables.data_ptr(), tables.stride(0), seq_lens.data_ptr(),
            logits.data_ptr(), torch.get_num_threads(),
            self.profile.data_ptr() if self.profile is not None else None)
        if rc != 0:
            raise MemoryError(f"the native decode step could not allocate scratch for {r} rows")
        self.native_steps += 1
        return logits  # every row's logits; callers pick batch.logits_indices

    @torch.inference_mode()
    def _op_by_op(self, batch: ScheduledBatch) -> torch.Tensor:
        if batch.num_reqs == 0:
            return torch.empty((0, self.vocab_size), dtype=torch.float32)
        attn = batch.attention_metadata(torch.device("cpu"))
        hidden = self.model.forward(batch.token_ids, batch.positions, attn, self.kv_caches)
        if batch.logits_indices.numel() == 0:
            return torch.empty((0, 0), dtype=torch.float32)
        return self.model.compute_logits(hidden[batch.logits_indices]).float()


def _subset(batch: ScheduledBatch, rows: list[int]) -> tuple[ScheduledBatch, torch.Tensor]:
    """The requests ``rows`` of ``batch`` as a batch of their own, and for each of its logits
    rows the index of that row in ``batch``'s logits."""
    qsl = batch.query_start_loc.tolist()
    tokens = [t for r in rows for t in range(qsl[r], qsl[r + 1])]
    tok = torch.tensor(tokens, dtype=torch.int64)
    new_index = {t: i for i, t in enumerate(tokens)}
    keep = [(i, new_index[t]) for i, t in enumerate(batch.logits_indices.tolist()) if t in new_index]
    lens = torch.tensor([qsl[r + 1] - qsl[r] for r in rows], dtype=torch.int32)
    starts = torch.zeros(len(rows) + 1, dtype=torch.int32)
    starts[1:] = torch.cumsum(lens, 0)
    idx = torch.tensor(rows, dtype=torch.int64)
    part = replace(
        batch, req_ids=[batch.req_ids[r] for r in rows], token_ids=batch.token_ids[tok],
        positions=batch.positions[tok], query_start_loc=starts, seq_lens=batch.seq_lens[idx],
        context_lens=batch.context_lens[idx], block_tables=batch.block_tables[idx],
        slot_mapping=batch.slot_mapping[tok],
        logits_indices=torch.tensor([j for _, j in keep], dtype=torch.int64),
        logits_req_ids=[batch.logits_req_ids[i] for i, _ in keep],
        # the core filled any async-scheduling placeholders in before execute()
        **{f: None for f in ("prev_token_rows", "prev_sample_rows") if hasattr(batch, f)})
    return part, torch.tensor([i for i, _ in keep], dtype=torch.int64)


def _linear(proj: Any, k: int, keep: list[Any], name: str) -> cpu_native.Linear:
    if len(proj) != 1:
        raise _Unsupported(f"{name} is not one fused weight")
    weight, bias = proj[0]
    if bias is not None:
        if bias.dtype != torch.float32:
            raise _Unsupported(f"{name} bias is {bias.dtype}")
        bias = bias.contiguous()
        keep.append(bias)
    if isinstance(weight, QuantizedWeight):
        if weight.format not in cpu_native.FORMATS:
            raise _Unsupported(f"{name} is {weight.format} (native formats: "
                               f"{', '.join(cpu_native.FORMATS)})")
        if weight.shape[1] != k or not all(t.is_contiguous() and t.device.type == "cpu"
                                           for t in weight.data.values()):
            raise _Unsupported(f"{name} has an unexpected layout")
        return cpu_native.linear_struct(weight, bias, keep)
    if not isinstance(weight, torch.Tensor) or weight.dtype != torch.float32 or weight.dim() != 2:
        raise _Unsupported(f"{name} is not a float32 matrix or a native packed format")
    if weight.shape[1] != k or not weight.is_contiguous() or weight.device.type != "cpu":
        raise _Unsupported(f"{name} has an unexpected layout")
    return cpu_native.linear_struct(weight, bias, keep)


def _vector(t: Any, size: int, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.shape != (size,) \
            or not t.is_contiguous():
        raise _Unsupported(f"{name} is not a float32 vector of {size}")
    return t


def build_executor(model: Any, kv_caches: list[Any]) -> tuple[NativeDecodeExecutor | None, str]:
    """The native executor for ``model``, or ``(None, why not)``."""
    lib = cpu_native.library()
    if lib is None:
        return None, f"native kernels unavailable: {cpu_native.unavailable_reason()}"
    try:
        struct, keep = _describe(model, kv_caches)
    except _Unsupported as e:
        return None, str(e)
    return NativeDecodeExecutor(model, kv_caches, lib, struct, keep), "ok"


def _describe(model: Any, kv_caches: list[Any]) -> tuple[_Model, list[Any]]:
    from portaserve.core.models.llama import LlamaForCausalLM

    if not isinstance(model, LlamaForCausalLM):
        raise _Unsupported(f"{type(model).__name__} is not a Llama-family model")
    cfg = model.config
    if model.dtype != torch.float32:
        raise _Unsupported(f"the model computes in {model.dtype} (native: float32)")
    h, d = cfg.hidden_size, model.head_dim
    hq, hk = model.num_heads, model.num_kv_heads
    if hq % hk:
        raise _Unsupported("query heads are not a multiple of KV heads")
    cos_sin = model.cos_sin_cache
    if cos_sin.dtype != torch.float32 or cos_sin.dim() != 2 or cos_sin.shape[1] != d \
            or not cos_sin.is_contiguous() or d % 2:
        raise _Unsupported("rotary does not cover the whole head in float32")
    keep: list[Any] = [kv_caches, cos_sin]
    layers = (_Layer * len(model.layers))()
    inter = None
    for i, (layer, cache) in enumerate(zip(model.layers, kv_caches, strict=True)):
        if layer.q_norm is not None or layer.k_norm is not None:
            raise _Unsupported("q/k norm (Qwen3) is not in the native step")
        if not (isinstance(cache, torch.Tensor) and cache.dtype == torch.float32
                and cache.is_contiguous() and cache.dim() == 5 and cache.shape[0] == 2
                and tuple(cache.shape[3:]) == (hk, d)):
            what = cache.dtype if isinstance(cache, torch.Tensor) else type(cache).__name__
            raise _Unsupported(f"the KV cache is {what} (native: a contiguous float32 blocks_nhd "
                               "tensor)")
        gate_up = _linear(layer.gate_up, h, keep, f"layer {i} gate_up")
        if gate_up.n % 2 or (inter is not None and gate_up.n // 2 != inter):
            raise _Unsupported(f"layer {i} gate_up has {gate_up.n} rows")
        inter = gate_up.n // 2
        qkv = _linear(layer.qkv, h, keep, f"layer {i} qkv")
        if qkv.n != (hq + 2 * hk) * d:
            raise _Unsupported(f"layer {i} qkv has {qkv.n} rows")
        o = _linear(layer.o, hq * d, keep, f"layer {i} o")
        down = _linear(layer.down, inter, keep, f"layer {i} down")
        if o.n != h or down.n != h:
            raise _Unsupported(f"layer {i} o/down do not map back to the hidden size")
        layers[i] = _Layer(_vector(layer.input_norm, h, "input norm").data_ptr(),
                           _vector(layer.post_norm, h, "post norm").data_ptr(),
                           qkv, o, gate_up, down, cache.data_ptr())
    lm_head = _linear([(model.lm_head, None)], h, keep, "lm_head")
    first = kv_caches[0]
    struct = _Model(len(model.layers), h, hq, hk, d, inter or 0, first.shape[1], first.shape[2],
                    float(model.eps), float(model.scale), cos_sin.data_ptr(),
                    _vector(model.norm, h, "final norm").data_ptr(), lm_head, layers)
    keep.append(layers)
    return struct, keep
