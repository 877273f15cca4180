"""GGUF loader: header -> ``ModelConfig``, tensors -> weights under Hugging Face names.

Parses the header itself (fast on large vocabularies) and memory-maps the tensors;
dequantization uses the ``gguf`` package. llama.cpp stores the Q and K
projections of ``llama`` models with their rows permuted for its interleaved ("normal") rotary;
the loader undoes that permutation, so every model here uses NeoX (rotate-half) rotary, as
Hugging Face transformers does when it loads a GGUF. ``qwen2``/``qwen3`` files use NeoX rotary
in llama.cpp already and are not permuted.

Every tensor goes through ``_convert_tensor``: the block formats of ``portaserve.quant``
(Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K) stay packed as a ``QuantizedWeight`` (``keep_packed``,
default on); other types are dequantized with ``gguf.quants.dequantize`` into dense tensors.
"""

from __future__ import annotations

import logging
import math
import mmap
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType

from portaserve.core.config import ModelConfig
from portaserve.errors import ModelError
from portaserve.quant.base import QuantizedWeight

logger = logging.getLogger(__name__)

#: GGUF general.architecture -> portaserve architecture
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
#: architectures whose GGUF Q/K rows llama.cpp permuted for interleaved rotary
_PERMUTED_QK = {"llama"}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


@dataclass(slots=True)
class GGUFTensor:
    """One tensor of a GGUF file: its raw bytes (memory-mapped) and logical shape."""

    name: str
    shape: tuple[int, ...]  # logical, slowest dimension first: (rows, cols)
    tensor_type: GGMLQuantizationType
    #: F32/F16: the values [rows, cols]; other types: raw bytes [rows, bytes_per_row] uint8
    data: np.ndarray


@dataclass(slots=True)
class GGUFFile:
    """A parsed GGUF file: header key/values as plain Python values, and its tensors."""

    path: Path
    metadata: dict[str, Any]
    tensors: list[GGUFTensor]


# GGUF value type -> struct format (little-endian scalars)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
          6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Reads GGUF header values from a buffer. Written here (rather than through
    ``gguf.GGUFReader``) because the reader builds numpy views per string, which takes tens of
    seconds for a 50k-token vocabulary; this takes well under one."""

    def __init__(self, buf: Any, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, count = self.scalar("<I"), self.scalar("<Q")
            if itype in _NUMPY:
                array = np.frombuffer(self.buf, dtype=_NUMPY[itype], count=count, offset=self.pos)
                self.pos += array.nbytes
                return array.tolist()
            return [self.value(itype) for _ in range(count)]
        raise ModelError(f"GGUF {self.path.name!r}: unknown value type {vtype} at byte {self.pos}",
                         field="model")


def read_gguf(path: Path, *, with_tensors: bool = True) -> GGUFFile:
    """Parse a GGUF (v2/v3, little-endian) header and map its tensors without reading them."""
    from gguf import GGML_QUANT_SIZES

    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read GGUF file {str(path)!r}: {e}", field="model") from e
    cur = _Cursor(buf, path)
    try:
        if bytes(buf[:4]) != b"GGUF":
            raise ModelError(f"{str(path)!r} is not a GGUF file", field="model")
        cur.pos = 4
        version = cur.scalar("<I")
        if version not in (2, 3):
            raise ModelError(f"GGUF {path.name!r} has version {version} (byte order or version "
                             "unsupported; supported: little-endian v2 and v3)", field="model")
        num_tensors, num_kv = cur.scalar("<Q"), cur.scalar("<Q")
        meta: dict[str, Any] = {}
        for _ in range(num_kv):
            key = cur.string()
            meta[key] = cur.value(cur.scalar("<I"))
        infos = []
        for _ in range(num_tensors):
            name = cur.string()
            dims = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
            infos.append((name, dims, cur.scalar("<I"), cur.scalar("<Q")))
    except struct.error as e:
        raise ModelError(f"GGUF {path.name!r} is truncated or corrupt: {e}", field="model") from e
    tensors: list[GGUFTensor] = []
    if not with_tensors:
        buf.close()
    else:
        alignment = int(meta.get("general.alignment", 32))
        start = -(-cur.pos // alignment) * alignment
        raw = np.frombuffer(buf, dtype=np.uint8)
        for name, dims, type_id, offset in infos:
            try:
                qtype = GGMLQuantizationType(type_id)
                block, type_size = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError) as e:
                raise ModelError(f"GGUF tensor {name!r} has unknown type id {type_id}",
                                 field="model") from e
            shape = tuple(int(d) for d in reversed(dims))  # GGUF lists dims fastest-first
            row_bytes = dims[0] // block * type_size
            rows = math.prod(dims[1:])
            data = raw[start + offset : start + offset + rows * row_bytes]
            if data.size != rows * row_bytes:
                raise ModelError(f"GGUF {path.name!r} is truncated: tensor {name!r} runs past "
                                 "the end of the file", field="model")
            if qtype == GGMLQuantizationType.F32:
                data = data.view(np.float32).reshape(shape)
            elif qtype == GGMLQuantizationType.F16:
                data = data.view(np.float16).reshape(shape)
            else:
                data = data.reshape(*shape[:-1], row_bytes)
            tensors.append(GGUFTensor(name, shape, qtype, data))
    return GGUFFile(path, meta, tensors)


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """Every header key of a GGUF file as plain Python values (str, int, float, lists)."""
    return read_gguf(path, with_tensors=False).metadata


def gguf_model_config(meta: dict[str, Any], tensor_names: set[str], name: str = "") -> ModelConfig:
    """Map a GGUF header to ``ModelConfig``; raises ``ModelError`` on unsupported models."""
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ModelError(
            f"GGUF {name!r} has architecture {arch!r}; supported GGUF architectures are "
            f"{sorted(GGUF_ARCHITECTURES)}", field="model")

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if isinstance(value, list):  # per-layer values (e.g. head_count_kv) must be uniform
            if len(set(value)) != 1:
                raise ModelError(f"GGUF {name!r}: per-layer {arch}.{key} = {value[:8]}... is not "
                                 "supported (layers must share one shape)", field="model")
            value = value[0]
        return value

    hidden = int(get("embedding_length"))
    num_heads = int(get("attention.head_count"))
    tokens = meta.get("tokenizer.ggml.tokens") or []
    vocab = int(get("vocab_size", 0) or len(tokens))
    eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                             "tokenizer.ggml.eom_token_id") if meta.get(k) is not None]
    return ModelConfig(
        architecture=GGUF_ARCHITECTURES[arch],
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(get("attention.head_count_kv", num_heads)),
        head_dim=int(get("attention.key_length", hidden // num_heads)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(get, name),
        max_position_embeddings=int(get("context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(int(i) for i in eos)),
        name=str(meta.get("general.name") or name),
    )


def _rope_scaling(get: Callable[..., Any], name: str) -> dict[str, Any] | None:
    kind = get("rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(get("rope.scaling.factor", 1.0))}
    raise ModelError(f"GGUF {name!r}: rope scaling {kind!r} is not supported (supported: linear, "
                     "and Llama 3 frequency factors)", field="model")


def load_gguf(
    path: Path,
    *,
    dtype: torch.dtype,
    device: torch.device,
    progress: bool = True,
    keep_packed: bool = True,
    quantization: str | None = None,
) -> tuple[ModelConfig, dict[str, torch.Tensor | QuantizedWeight], dict[str, Any]]:
    """Config, weights under Hugging Face names, and the raw header (for the tokenizer).

    ``keep_packed``: GGUF block formats stay packed (``QuantizedWeight``), else dequantized.
    ``quantization``: re-quantize the decoder's linear weights online (``quant.registry``).
    """
    gguf_file = read_gguf(path)
    meta = gguf_file.metadata
    names = {t.name for t in gguf_file.tensors}
    config = gguf_model_config(meta, names, name=path.name)
    weights: dict[str, torch.Tensor | QuantizedWeight] = {}
    perms = _qk_row_perms(config) if meta["general.architecture"] in _PERMUTED_QK else {}
    tensors: Any = gguf_file.tensors
    if progress:
        from tqdm.auto import tqdm

        tensors = tqdm(tensors, desc=f"loading {path.name}", unit="tensor", leave=False)
    for tensor in tensors:
        if tensor.name == "rope_freqs.weight":  # Llama 3.1 long-context frequency factors
            factors = _dense(tensor).flatten().tolist()
            config = _with_rope_factors(config, factors)
            continue
        hf_name = gguf_to_hf_name(tensor.name)
        kind = tensor.name.split(".", 2)[-1] if tensor.name.startswith("blk.") else ""
        weights[hf_name] = _convert_tensor(hf_name, tensor, dtype=dtype, device=device,
                                           row_perm=perms.get(kind), keep_packed=keep_packed,
                                           quantization=quantization)
    return config, weights, meta


def gguf_to_hf_name(name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight`` (and globals)."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _LAYER_RE.match(name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    raise ModelError(f"GGUF tensor {name!r} has no Hugging Face name here; known tensors are "
                     f"{sorted(_GLOBAL_NAMES)} and blk.N.{{{', '.join(sorted(_LAYER_NAMES))}}}",
                     field="model")


def _qk_row_perms(config: ModelConfig) -> dict[str, torch.Tensor]:
    """Row indices that turn llama.cpp's interleaved Q/K rows back into rotate-half order."""

    def perm(num_heads: int) -> torch.Tensor:
        d = config.head_dim
        # GGUF row h*D + 2j + t holds Hugging Face row h*D + t*(D/2) + j
        return torch.arange(num_heads * d).view(num_heads, d // 2, 2).transpose(1, 2).reshape(-1)

    q, k = perm(config.num_heads), perm(config.num_kv_heads)
    return {"attn_q.weight": q, "attn_q.bias": q, "attn_k.weight": k, "attn_k.bias": k}


def _with_rope_factors(config: ModelConfig, factors: list[float]) -> ModelConfig:
    from dataclasses import replace

    return replace(config, rope_scaling={"rope_type": "freq_factors", "factors": factors})


def _dense(tensor: GGUFTensor) -> torch.Tensor:
    """A GGUF tensor as a float32 torch tensor of its logical shape (rows, cols)."""
    from gguf import quants

    if tensor.data.dtype in (np.float32, np.float16):
        array = np.array(tensor.data, dtype=np.float32)  # a writable copy
    else:
        array = quants.dequantize(tensor.data, tensor.tensor_type)
    return torch.from_numpy(array.reshape(tensor.shape))


def _convert_tensor(
    name: str,
    tensor: GGUFTensor,
    *,
    dtype: torch.dtype,
    device: torch.device,
    row_perm: torch.Tensor | None = None,
    keep_packed: bool = True,
    quantization: str | None = None,
) -> torch.Tensor | QuantizedWeight:
    """One GGUF tensor -> a model weight. The single place a packed format is handled.

    ``row_perm`` (Q/K of llama GGUFs) reorders output rows; a packed format keeps its blocks
    along rows, so a format kept packed applies it to its per-row data the same way.
    """
    from portaserve.quant import registry as quant_registry
    from portaserve.quant.gguf_formats import GGUF_FORMATS, from_gguf_tensor

    requantized = quantization is not None and quant_registry.is_quantized_linear(name)
    if (keep_packed and not requantized and tensor.tensor_type.name in GGUF_FORMATS
            and len(tensor.shape) == 2):
        packed = from_gguf_tensor(tensor.data, tensor.tensor_type.name, tensor.shape)
        if row_perm is not None:
            packed = quant_registry.select_rows(packed, row_perm)
        return packed.to(device)
    try:
        weight = _dense(tensor)
    except (NotImplementedError, ValueError) as e:
        raise ModelError(f"GGUF tensor {tensor.name!r} ({name}) has type "
                         f"{tensor.tensor_type.name}, which cannot be read: {e}",
                         field="model") from e
    if row_perm is not None:
        weight = weight[row_perm]
    if requantized:
        return quant_registry.quantize_checkpoint_tensor(name, weight, quantization).to(device)
    return weight.to(device=device, dtype=dtype)
