"""GGUF and Hugging Face folder loaders: config mapping, weight names and Q/K layout against
transformers, sharded folders, and the errors for models that cannot be loaded."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from portaserve.core.loaders import LoadedModel, load_model
from portaserve.core.loaders.gguf import gguf_to_hf_name, read_gguf, read_gguf_metadata
from portaserve.core.loaders.hf import hf_model_config, save_hf_folder
from portaserve.errors import ModelError

CPU = torch.device("cpu")


def test_gguf_header_maps_to_model_config(smollm_loaded: LoadedModel) -> None:
    cfg = smollm_loaded.config
    assert smollm_loaded.format == "gguf" and smollm_loaded.path.suffix == ".gguf"
    assert (cfg.architecture, cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (
        "llama", 49152, 576, 1536)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 9, 3, 64)
    assert cfg.rope_theta == 100000.0 and cfg.rope_scaling is None
    assert cfg.max_position_embeddings == 8192
    assert cfg.rms_norm_eps == pytest.approx(1e-5)
    assert cfg.tie_word_embeddings and not cfg.attention_bias and not cfg.qk_norm
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids == (2,)


def test_weights_equal_transformers_state_dict(smollm_loaded: LoadedModel, hf_model: Any) -> None:
    """Names, shapes, dequantized values and the undone Q/K permutation, tensor by tensor."""
    theirs = hf_model.state_dict()
    ours = smollm_loaded.weights
    expected = set(theirs) - {"lm_head.weight"}  # tied: transformers lists the shared table
    assert set(ours) == expected
    for name in sorted(expected):
        assert ours[name].dtype == torch.float32
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-6, msg=name)
    assert ours["model.layers.0.self_attn.q_proj.weight"].std() > 0.01


def test_gguf_tensor_names() -> None:
    assert gguf_to_hf_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert gguf_to_hf_name("blk.0.ffn_gate.weight") == "model.layers.0.mlp.gate_proj.weight"
    assert gguf_to_hf_name("blk.3.attn_k_norm.weight") == "model.layers.3.self_attn.k_norm.weight"
    assert gguf_to_hf_name("output.weight") == "lm_head.weight"
    with pytest.raises(ModelError, match=r"'blk.0.ssm_conv.weight'.*attn_q"):
        gguf_to_hf_name("blk.0.ssm_conv.weight")


def test_header_parser_matches_the_gguf_package(tmp_path: Path, smollm_path: Path) -> None:
    """Every value type and a packed tensor, written by gguf's writer, read back the same."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, quants

    rng = np.random.default_rng(3)
    q8 = quants.quantize(rng.standard_normal((4, 64), dtype=np.float32),
                         GGMLQuantizationType.Q8_0)
    path = tmp_path / "types.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_uint32("t.u32", 7)
    writer.add_int32("t.i32", -7)
    writer.add_float32("t.f32", 0.5)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo ✓")
    writer.add_array("t.ints", [1, 2, 3])
    writer.add_array("t.strs", ["a", "ü", ""])
    writer.add_tensor("f32", rng.standard_normal((3, 5), dtype=np.float32))
    writer.add_tensor("f16", rng.standard_normal((2, 8)).astype(np.float16))
    writer.add_tensor("q8", q8, raw_shape=q8.shape, raw_dtype=GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    ours = read_gguf(path)
    reader = GGUFReader(str(path))
    for key in ("t.u32", "t.i32", "t.f32", "t.bool", "t.str", "t.ints", "t.strs",
                "general.architecture"):
        theirs = reader.fields[key].contents()
        assert ours.metadata[key] == (theirs.item() if isinstance(theirs, np.generic) else theirs)
    assert [t.name for t in ours.tensors] == ["f32", "f16", "q8"]
    shapes = {t.name: t.shape for t in ours.tensors}
    assert shapes == {"f32": (3, 5), "f16": (2, 8), "q8": (4, 64)}
    for mine, other in zip(ours.tensors, reader.tensors, strict=True):
        assert mine.tensor_type == other.tensor_type
        assert np.array_equal(np.asarray(mine.data), np.asarray(other.data))

    real = read_gguf_metadata(smollm_path)
    assert real["tokenizer.ggml.pre"] == "smollm" and len(real["tokenizer.ggml.merges"]) == 48900


def test_hf_folder_round_trip(hf_folder: Path, smollm_loaded: LoadedModel) -> None:
    loaded = load_model(str(hf_folder), dtype=torch.bfloat16, device=CPU, progress=False)
    assert loaded.format == "safetensors" and loaded.path == hf_folder.resolve()
    index = json.loads((hf_folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    assert replace(loaded.config, name="") == replace(smollm_loaded.config, name="")
    assert set(loaded.weights) == set(smollm_loaded.weights)
    for name, weight in loaded.weights.items():
        assert weight.dtype == torch.bfloat16
        torch.testing.assert_close(weight, smollm_loaded.weights[name].to(torch.bfloat16),
                                   rtol=0, atol=0, msg=name)


def test_unsharded_folder_and_untied_head(tmp_path: Path, smollm_loaded: LoadedModel) -> None:
    cfg = replace(smollm_loaded.config, num_layers=1, vocab_size=1000, tie_word_embeddings=False)
    keep = {k: v for k, v in smollm_loaded.weights.items()
            if not k.startswith("model.layers.") or k.startswith("model.layers.0.")}
    keep["model.embed_tokens.weight"] = keep["model.embed_tokens.weight"][:1000]
    keep["lm_head.weight"] = torch.randn_like(keep["model.embed_tokens.weight"])
    save_hf_folder(tmp_path, cfg, keep, smollm_loaded.tokenizer)
    assert (tmp_path / "model.safetensors").is_file()
    assert not (tmp_path / "model.safetensors.index.json").exists()
    loaded = load_model(str(tmp_path), dtype=torch.float32, device=CPU, progress=False)
    assert not loaded.config.tie_word_embeddings and loaded.config.num_layers == 1
    torch.testing.assert_close(loaded.weights["lm_head.weight"], keep["lm_head.weight"])


# -- config.json mapping ---------------------------------------------------------------------

BASE = {"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4}


def test_hf_config_variants() -> None:
    cfg = hf_model_config(BASE)
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling) == (
        4, 16, 10000.0, None)
    qwen2 = hf_model_config({**BASE, "model_type": "qwen2", "num_key_value_heads": 2,
                             "use_sliding_window": False, "sliding_window": 8})
    assert qwen2.attention_bias and qwen2.num_kv_heads == 2 and qwen2.max_position_embeddings == 2048
    qwen3 = hf_model_config({**BASE, "model_type": "qwen3", "head_dim": 32})
    assert qwen3.qk_norm and not qwen3.attention_bias and qwen3.head_dim == 32
    # transformers 5 keeps rope settings under rope_parameters
    v5 = hf_model_config({**BASE, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5,
                                                      "factor": 8.0}})
    assert v5.rope_theta == 5e5 and v5.rope_scaling["rope_type"] == "llama3"
    mistral = hf_model_config({**BASE, "model_type": "mistral", "sliding_window": 1024,
                               "max_position_embeddings": 32768})
    assert mistral.max_position_embeddings == 1024  # capped at the unimplemented window
    by_class = hf_model_config({**BASE, "model_type": "custom",
                                "architectures": ["Qwen2ForCausalLM"]})
    assert by_class.architecture == "qwen2"


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]},
         r"'gpt_neox'.*GPTNeoXForCausalLM.*\['llama', 'mistral', 'qwen2', 'qwen3'\]"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"'yarn'.*llama3"),
        ({"quantization_config": {"quant_method": "bitsandbytes"}}, r"pre-quantized.*'bitsandbytes'"),
        ({"hidden_size": None}, r"hidden_size"),
    ],
)
def test_hf_config_errors_name_what_was_found(patch: dict[str, Any], message: str) -> None:
    with pytest.raises(ModelError, match=message):
        hf_model_config({**BASE, **patch}, name="m")


def test_unsupported_hf_architecture_through_load_model(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "model_type": "falcon"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match=r"model_type 'falcon'.*supported model types"):
        load_model(str(tmp_path), dtype=torch.float32, device=CPU, progress=False)


# -- GGUF errors --------------------------------------------------------------------------------


def _write_gguf(path: Path, arch: str, tensors: dict[str, np.ndarray]) -> Path:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_context_length(64)
    writer.add_token_list(["a", "b", "c"])
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_of_unsupported_architecture(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "falcon.gguf", "falcon",
                       {"token_embd.weight": np.random.rand(3, 8).astype(np.float32)})
    with pytest.raises(ModelError, match=r"architecture 'falcon'.*\['llama', 'qwen2', 'qwen3'\]"):
        load_model(str(path), dtype=torch.float32, device=CPU, progress=False)


def test_gguf_with_unknown_tensor_and_truncated_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = _write_gguf(tmp_path / "odd.gguf", "llama", {
        "token_embd.weight": rng.random((3, 8), dtype=np.float32),
        "blk.0.mystery.weight": rng.random((8, 8), dtype=np.float32)})
    with pytest.raises(ModelError, match="blk.0.mystery.weight"):
        load_model(str(path), dtype=torch.float32, device=CPU, progress=False)
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 64])
    with pytest.raises(ModelError, match="truncated"):
        read_gguf(cut)
    cut.write_bytes(data[:40])
    with pytest.raises(ModelError, match="truncated or corrupt"):
        read_gguf(cut)


def test_load_model_bad_path() -> None:
    with pytest.raises(ModelError, match="no such file or folder"):
        load_model("/definitely/not/here.gguf", dtype=torch.float32, device=CPU)


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_synthetic_model_quantizes_online(scheme: str) -> None:
    # ``random:`` models take ``quantization`` like a 16-bit checkpoint (benchmarks use it):
    # the decoder's linears come back packed, everything else stays dense.
    from portaserve.core.loaders import load_model
    from portaserve.quant.base import QuantizedWeight

    loaded = load_model("random:tiny", dtype=torch.float32, device=torch.device("cpu"),
                        quantization=scheme)
    packed = {n for n, w in loaded.weights.items() if isinstance(w, QuantizedWeight)}
    assert packed and all(n.endswith("proj.weight") for n in packed)
    assert {w.format for n, w in loaded.weights.items() if n in packed} == {scheme}
    assert isinstance(loaded.weights["lm_head.weight"], torch.Tensor)
