"""Loaders keep quantized weights packed: GPTQ / AWQ / fp8 safetensors, online int8/int4/fp8,
and GGUF block formats (the real SmolLM2 file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from portaserve.core.loaders.hf import load_hf_folder
from portaserve.errors import ModelError
from portaserve.quant.base import QuantizedWeight
from portaserve.quant.fp8 import FP8Method
from portaserve.quant.int_formats import Int4Method, to_awq, to_gptq

CPU = torch.device("cpu")
CONFIG = {"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}
LINEARS = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
           "self_attn.o_proj": (64, 64), "mlp.gate_proj": (128, 64), "mlp.up_proj": (128, 64),
           "mlp.down_proj": (64, 128)}


def dense_tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {"model.embed_tokens.weight": torch.randn(100, 64, generator=g),
           "model.norm.weight": torch.rand(64, generator=g) + 0.5,
           "model.layers.0.input_layernorm.weight": torch.rand(64, generator=g) + 0.5,
           "model.layers.0.post_attention_layernorm.weight": torch.rand(64, generator=g) + 0.5}
    for name, shape in LINEARS.items():
        out[f"model.layers.0.{name}.weight"] = torch.randn(*shape, generator=g) * 0.1
    return out


def write_folder(path: Path, tensors: dict[str, torch.Tensor], quant_config: dict | None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    config = dict(CONFIG, **({"quantization_config": quant_config} if quant_config else {}))
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return path


@pytest.mark.parametrize("method", ["gptq", "awq", "fp8"])
def test_prequantized_checkpoint_loads_packed(tmp_path, method):
    dense = dense_tensors(seed=1)
    tensors = {k: v for k, v in dense.items() if not k.endswith(tuple(f"{n}.weight" for n in LINEARS))}
    expected = {}
    for name in LINEARS:
        key = f"model.layers.0.{name}"
        w = dense[f"{key}.weight"]
        if method == "fp8":
            packed = FP8Method().quantize(w)
            tensors[f"{key}.weight"] = packed.data["weight"]
            tensors[f"{key}.weight_scale"] = packed.data["weight_scale"].reshape(-1, 1)
            tensors[f"{key}.input_scale"] = torch.tensor([0.05])
        else:
            packed = Int4Method().quantize(w, group_size=32)
            parts = to_gptq(packed) if method == "gptq" else to_awq(packed)
            parts["scales"] = parts["scales"].half()  # as checkpoints store them
            tensors.update({f"{key}.{k}": v for k, v in parts.items()})
        expected[f"{key}.weight"] = packed.dequantize()
    qcfg = {"quant_method": method, "bits": 4, "group_size": 32, "sym": False}
    if method == "fp8":
        qcfg = {"quant_method": "fp8", "activation_scheme": "static"}
    config, weights = load_hf_folder(write_folder(tmp_path / method, tensors, qcfg),
                                     dtype=torch.float32, device=CPU, progress=False)
    assert config.num_layers == 1
    for key, dense_w in expected.items():
        w = weights[key]
        assert isinstance(w, QuantizedWeight) and w.format == ("fp8" if method == "fp8" else "int4")
        # scales went through fp16 for GPTQ/AWQ: compare within that rounding
        torch.testing.assert_close(w.dequantize(), dense_w, atol=1e-3, rtol=1e-3)
    if method == "fp8":
        assert weights["model.layers.0.mlp.up_proj.weight"].meta["activation"] == "static"
    assert not any(k.endswith((".qweight", ".qzeros", ".scales", ".weight_scale")) for k in weights)
    assert weights["model.norm.weight"].dtype == torch.float32


def test_unsupported_prequantized_method_is_refused(tmp_path):
    folder = write_folder(tmp_path / "bnb", dense_tensors(2), {"quant_method": "bitsandbytes"})
    with pytest.raises(ModelError, match="pre-quantized checkpoint.*'bitsandbytes'"):
        load_hf_folder(folder, dtype=torch.float32, device=CPU, progress=False)


@pytest.mark.parametrize("scheme,fmt", [("int8", "int8"), ("int4", "int4"), ("fp8", "fp8"),
                                        ("Q4_K", "Q4_1")])
def test_online_quantization_of_a_dense_checkpoint(tmp_path, scheme, fmt):
    dense = dense_tensors(seed=3)
    folder = write_folder(tmp_path / "dense", dense, None)
    _, weights = load_hf_folder(folder, dtype=torch.float32, device=CPU, progress=False,
                                quantization=scheme)
    q = weights["model.layers.0.mlp.down_proj.weight"]
    assert isinstance(q, QuantizedWeight)
    # K = 128 is no multiple of 256: a K-quant falls back like llama.cpp does
    assert q.format == fmt
    err = (q.dequantize() - dense["model.layers.0.mlp.down_proj.weight"]).norm()
    assert err / dense["model.layers.0.mlp.down_proj.weight"].norm() < 0.12
    assert isinstance(weights["model.embed_tokens.weight"], torch.Tensor)  # embeddings stay dense


@pytest.mark.slow
def test_smollm2_q4_1_stays_packed():
    """The SmolLM2 Q4_1 GGUF resident in packed form: weight bytes close to the file size."""
    from quant_driver import weight_bytes

    from portaserve.core.loaders import load_model
    from portaserve.core.models.llama import LlamaForCausalLM
    from portaserve.plugins.manager import get_registry

    loaded = load_model("smollm2-135m", dtype=torch.float32, device=CPU, progress=False)
    formats = {w.format for w in loaded.weights.values() if isinstance(w, QuantizedWeight)}
    assert formats == {"Q4_1", "Q8_0"}
    registry = get_registry()
    device, _ = registry.select_device("cpu")
    model = LlamaForCausalLM(loaded.config, loaded.weights, registry.kernel_table(device),
                             dtype=torch.float32, device=CPU)
    resident = weight_bytes(model)
    file_size = loaded.path.stat().st_size
    assert 0.9 * file_size < resident < 1.05 * file_size, (resident, file_size)
    assert resident < 0.25 * 540e6  # not the ~540 MB of float32


@pytest.mark.parametrize("quantization", ["int4", "int8", "fp8", "Q4_0", "Q8_0", "Q4_K"])
def test_synthetic_model_packed_on_the_device(quantization):
    """``random:<preset>`` with ``quantization=`` packs the decoder's linears where the weights
    are made (GGUF formats as random blocks); the rest stays dense."""
    from portaserve.core.loaders import load_model

    loaded = load_model("random:tiny", dtype=torch.float32, device=CPU, quantization=quantization)
    down = loaded.weights["model.layers.1.mlp.down_proj.weight"]
    assert isinstance(down, QuantizedWeight)
    assert down.format == (quantization if quantization != "Q4_K" else "Q4_1")  # K = 128: fallback
    assert 0.01 < float(down.dequantize().std()) < 0.04  # about the dense weights' 0.02
    assert isinstance(loaded.weights["model.embed_tokens.weight"], torch.Tensor)
