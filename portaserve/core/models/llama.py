"""The Llama family (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM2, TinyLlama) over the kernel table.

Written once for every device: each op is a call into ``KernelTable`` and nothing here knows
which device runs it. Weights arrive under Hugging Face names (dense tensors or
``QuantizedWeight``); at construction q/k/v are fused into one projection and gate/up into
another (dense weights, or packed ones whose format offers ``concat_rows``), so a layer runs
four GEMMs. Covers tied embeddings, q/k/v bias (Qwen2), per-head q/k
RMSNorm (Qwen3), and rotary scaling (linear, Llama 3, GGUF frequency factors) folded into one
``cos_sin_cache`` computed at construction. Rotary is NeoX style (rotate-half); GGUF loaders
undo llama.cpp's interleaved Q/K layout before the weights reach this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from portaserve.core.config import ModelConfig
from portaserve.errors import ModelError
from portaserve.plugins.device import AttentionMetadata
from portaserve.plugins.kernel_table import KernelTable
from portaserve.quant.base import QuantizedWeight, accepts_quantized_activation

Weight = torch.Tensor | QuantizedWeight
#: one projection: (weight [N, K], bias [N] | None); a fused projection is a list of one
Proj = list[tuple[Weight, torch.Tensor | None]]


@dataclass(slots=True)
class _Layer:
    input_norm: torch.Tensor  # [H]
    post_norm: torch.Tensor  # [H]
    qkv: Proj  # -> [T, (Hq + 2 Hk) D]
    o: Proj  # -> [T, H]
    gate_up: Proj  # -> [T, 2 I]
    down: Proj  # -> [T, H]
    q_norm: torch.Tensor | None  # [D] (Qwen3)
    k_norm: torch.Tensor | None
    #: Whether qkv / gate_up / down take their input quantized by the op before them (fp8
    #: W8A8 with per-token activations on a kernel that accepts them: ``rms_norm_fp8``, ...).
    fp8_inputs: tuple[bool, bool, bool] = (False, False, False)


class LlamaForCausalLM:
    """A decoder-only Llama-family model. ``forward`` gives hidden states, ``compute_logits``
    the float32 logits of the rows the sampler needs."""

    def __init__(
        self,
        config: ModelConfig,
        weights: dict[str, Weight],
        kernels: KernelTable,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.config = config
        self.kernels = kernels
        self.dtype = dtype
        self.device = torch.device(device)
        self._weights = weights
        self._used: set[str] = set()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        self.eps = config.rms_norm_eps

        self.embed_tokens = self._take("model.embed_tokens.weight")
        self.layers = [self._build_layer(i) for i in range(config.num_layers)]
        for layer in self.layers:
            layer.fp8_inputs = tuple(self._takes_fp8_input(p) for p in (layer.qkv, layer.gate_up, layer.down))
        self.norm = self._take("model.norm.weight")
        if config.tie_word_embeddings:
            self.lm_head = self.embed_tokens
            self._used.add("lm_head.weight")  # a tied copy in the file is not needed
        else:
            self.lm_head = self._take("lm_head.weight")
        unused = sorted(set(weights) - self._used)
        if unused:
            raise ModelError(f"{type(self).__name__} ({config.architecture}) does not use the "
                             f"weights {unused[:6]}{'...' if len(unused) > 6 else ''}",
                             field="model")
        del self._weights
        self.cos_sin_cache = rotary_cos_sin_cache(config).to(device=self.device, dtype=dtype)

    # -- construction -----------------------------------------------------------------------

    def _take(self, name: str, required: bool = True) -> Any:
        weight = self._weights.get(name)
        if weight is None:
            if required:
                raise ModelError(f"{self.config.architecture} model is missing weight {name!r}",
                                 field="model")
            return None
        self._used.add(name)
        if isinstance(weight, QuantizedWeight):
            return weight.to(self.device)
        return weight.to(device=self.device, dtype=self.dtype)

    def _proj(self, prefix: str, names: tuple[str, ...]) -> Proj:
        parts = [(self._take(f"{prefix}.{n}.weight"), self._take(f"{prefix}.{n}.bias", False))
                 for n in names]
        if len(parts) == 1:
            return parts
        weight = _concat_rows([w for w, _ in parts])  # [sum N, K]
        if weight is None:
            return parts
        has_bias = [b is not None for _, b in parts]
        if not any(has_bias):
            return [(weight, None)]
        biases = [b if b is not None else torch.zeros(w.shape[0], dtype=self.dtype,
                                                      device=self.device) for w, b in parts]
        return [(weight, torch.cat(biases))]

    def _build_layer(self, i: int) -> _Layer:
        p = f"model.layers.{i}"
        qk_norm = self.config.qk_norm
        return _Layer(
            input_norm=self._take(f"{p}.input_layernorm.weight"),
            post_norm=self._take(f"{p}.post_attention_layernorm.weight"),
            qkv=self._proj(f"{p}.self_attn", ("q_proj", "k_proj", "v_proj")),
            o=self._proj(f"{p}.self_attn", ("o_proj",)),
            gate_up=self._proj(f"{p}.mlp", ("gate_proj", "up_proj")),
            down=self._proj(f"{p}.mlp", ("down_proj",)),
            q_norm=self._take(f"{p}.self_attn.q_norm.weight") if qk_norm else None,
            k_norm=self._take(f"{p}.self_attn.k_norm.weight") if qk_norm else None,
        )

    def _takes_fp8_input(self, proj: Proj) -> bool:
        """One fp8 W8A8 weight with dynamic per-token activations, whose kernel takes them
        quantized: the op before it then writes fp8 (half the bytes, no separate quantize)."""
        if len(proj) != 1 or not isinstance(proj[0][0], QuantizedWeight):
            return False
        weight = proj[0][0]
        kernel = getattr(self.kernels, "quant_ops", {}).get(weight.format)
        return (weight.format == "fp8" and kernel is not None and accepts_quantized_activation(kernel)
                and weight.meta.get("activation", "dynamic_per_token") == "dynamic_per_token")

    # -- forward ----------------------------------------------------------------------------

    def _linear(self, x: torch.Tensor, proj: Proj) -> torch.Tensor:
        outs = [self.kernels.quant_linear(x, w, b) if isinstance(w, QuantizedWeight)
                else self.kernels.linear(x, w, b) for w, b in proj]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if isinstance(self.embed_tokens, QuantizedWeight):
            return self.embed_tokens.embedding(input_ids, self.dtype)
        return self.kernels.embedding(input_ids, self.embed_tokens)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        attn: AttentionMetadata,
        kv_caches: list[Any],
    ) -> torch.Tensor:
        """Hidden states after the final norm, ``[T, H]``; writes this step's K/V."""
        k = self.kernels
        num_tokens = input_ids.shape[0]
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        hidden = self._embed(input_ids)  # [T, H]
        if not self.layers:
            return k.rms_norm(hidden, self.norm, self.eps)
        # x: the normed input of the next block, residual: the stream; each block's closing
        # projection and the next norm go through ``_project_norm`` (one fused op where it can)
        residual = hidden
        x = (k.rms_norm_fp8 if self.layers[0].fp8_inputs[0] else k.rms_norm)(
            hidden, self.layers[0].input_norm, self.eps)
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            _, fp8_gate_up, fp8_down = layer.fp8_inputs
            if layer.q_norm is None and len(layer.qkv) == 1:  # (one launch where the kernel can)
                q = k.linear_rotary_write_kv(x, *layer.qkv[0], positions, self.cos_sin_cache, kv_cache,
                                             attn.slot_mapping, self.num_heads)
            else:
                qkv = self._linear(x, layer.qkv)  # [T, (Hq + 2 Hk) D]
                q = qkv[:, :q_size].view(num_tokens, self.num_heads, self.head_dim)
                key = qkv[:, q_size : q_size + kv_size].view(num_tokens, self.num_kv_heads,
                                                            self.head_dim)
                value = qkv[:, q_size + kv_size :].view(num_tokens, self.num_kv_heads, self.head_dim)
                if layer.q_norm is not None:
                    q = k.rms_norm(q.reshape(-1, self.head_dim), layer.q_norm, self.eps).view_as(q)
                    key = k.rms_norm(key.reshape(-1, self.head_dim), layer.k_norm,
                                     self.eps).view_as(key)
                q = k.rotary_write_kv(positions, q, key, value, self.cos_sin_cache, kv_cache,
                                      attn.slot_mapping)
            out = k.paged_attention(q, kv_cache, attn, self.scale)  # [T, Hq, D]
            x, residual = self._project_norm(out.reshape(num_tokens, q_size), layer.o,
                                             layer.post_norm, residual, fp8_gate_up)
            if fp8_down or len(layer.gate_up) != 1:
                act = k.silu_and_mul_fp8 if fp8_down else k.silu_and_mul
                h = act(self._linear(x, layer.gate_up))
            else:  # (one launch where the gate|up kernel can)
                h = k.linear_silu_and_mul(x, *layer.gate_up[0])
            nxt = self.layers[i + 1] if i + 1 < len(self.layers) else None
            x, residual = self._project_norm(
                h, layer.down,
                self.norm if nxt is None else nxt.input_norm, residual,
                nxt is not None and nxt.fp8_inputs[0])
        return x

    def _project_norm(self, x: torch.Tensor, proj: Proj, norm_weight: torch.Tensor,
                      residual: torch.Tensor, fp8_out: bool) -> tuple[Any, torch.Tensor]:
        """``proj(x)``, then ``rms_norm`` with the residual -> (normed, new residual): the fused
        op ``linear_rms_norm`` for one projection; ``rms_norm_fp8`` after it when the next
        linear takes fp8 activations."""
        if len(proj) == 1 and not fp8_out:
            weight, bias = proj[0]
            return self.kernels.linear_rms_norm(x, weight, bias, norm_weight, self.eps, residual)
        norm = self.kernels.rms_norm_fp8 if fp8_out else self.kernels.rms_norm
        return norm(self._linear(x, proj), norm_weight, self.eps, residual)

    __call__ = forward

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor, upcast: bool = True) -> torch.Tensor:
        """``hidden`` [L, H] -> logits [L, V], float32; ``upcast=False``: in the lm_head's output
        dtype, for a caller that upcasts only where it must (the sampler: an argmax is exact in
        any dtype, and at 512 rows x 128256 the float32 copy is ~0.2 ms of a step)."""
        logits = self._linear(hidden, [(self.lm_head, None)])
        return logits.float() if upcast or UPCAST_LOGITS else logits


def _concat_rows(weights: list[Weight]) -> Weight | None:
    """One weight holding all rows of ``weights``, or None when they cannot be fused (mixed
    kinds, or a packed format without ``concat_rows``: then each runs as its own GEMM)."""
    if all(isinstance(w, torch.Tensor) for w in weights):
        return torch.cat(weights, dim=0)  # type: ignore[arg-type]
    first = weights[0]
    if not all(isinstance(w, QuantizedWeight) for w in weights) or not isinstance(
            first, QuantizedWeight):
        return None
    concat = getattr(first.method, "concat_rows", None)
    same = all(w.format == first.format and w.shape[1] == first.shape[1]  # type: ignore[union-attr]
               for w in weights)
    return concat(weights) if concat is not None and same else None


def rotary_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Rotary inverse frequencies [D/2] with the model's scaling applied (float32)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float()
                                            / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "freq_factors":  # GGUF rope_freqs: per-frequency divisors
        factors = torch.tensor(scaling["factors"], dtype=torch.float32)
        if factors.shape != inv_freq.shape:
            raise ModelError(f"rope frequency factors have shape {tuple(factors.shape)}; "
                             f"expected {tuple(inv_freq.shape)}", field="rope_scaling")
        return inv_freq / factors
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ModelError(f"rope scaling {kind!r} is not supported (supported: default, linear, "
                     "llama3, freq_factors)", field="rope_scaling")


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths slowed by ``factor``, short ones kept, a smooth
    blend between the two thresholds."""
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    original = float(scaling.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv_freq
    long_wave = wavelen > original / low  # slow these down fully
    short_wave = wavelen < original / high  # keep these
    blend = ((original / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    mixed = (1 - blend) * inv_freq / factor + blend * inv_freq
    return torch.where(long_wave, inv_freq / factor, torch.where(short_wave, inv_freq, mixed))


#: Whether ``compute_logits`` upcasts to float32 even for a caller that asks it not to (the
#: runner and the decode graphs): the behaviour before 2026-12-07, for the A/B of the greedy
#: argmax on bf16 logits (``benchmarks/gpu_llama8b.py --upcast-logits``). The fp8 1000/1000 run
#: measured 2% lower the day the argmax moved to bf16, on another H100; not yet separated.
UPCAST_LOGITS = False


def rotary_cos_sin_cache(config: ModelConfig) -> torch.Tensor:
    """``[max_position_embeddings, D]``: cos of every position's angles, then sin (float32)."""
    inv_freq = rotary_inv_freq(config)  # [D/2]
    positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)  # [P, D/2]
    return torch.cat((angles.cos(), angles.sin()), dim=-1)
