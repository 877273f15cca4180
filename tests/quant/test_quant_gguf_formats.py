"""GGUF block formats: packed in memory, reference dequant bit-identical to gguf-py in float32."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from portaserve.errors import ConfigError
from portaserve.quant.gguf_formats import GGUF_FORMATS, GGUFMethod, from_gguf_tensor

FP16_FIELDS = ("d", "m", "dmin")


def random_blocks(fmt: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random GGUF bytes of a valid tensor: random codes and scales, finite fp16 factors."""
    rng = np.random.default_rng(seed)
    method = GGUFMethod(fmt)
    raw = rng.integers(0, 256, (rows, cols // method.block_size * method.type_size), dtype=np.uint8)
    weight = method.from_blocks(raw, (rows, cols))
    for name in FP16_FIELDS:
        if name in weight.data:
            values = rng.standard_normal(weight.data[name].shape) * 0.02
            weight.data[name] = torch.from_numpy(values.astype(np.float16))
    return method.to_blocks(weight).numpy()


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("fmt", GGUF_FORMATS)
def test_dequantize_random_blocks_bit_exact(fmt):
    raw = random_blocks(fmt, 7, 512, seed=len(fmt) * 31 + ord(fmt[1]))
    expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[fmt])  # [7, 512]
    weight = GGUFMethod(fmt).from_blocks(raw, (7, 512))
    got = weight.dequantize(torch.float32).numpy()
    assert got.shape == (7, 512)
    assert np.abs(expected).max() > 0
    np.testing.assert_array_equal(bits(got), bits(expected))


@pytest.mark.parametrize("fmt", GGUF_FORMATS)
def test_packed_bytes_round_trip_and_size(fmt):
    raw = random_blocks(fmt, 5, 256, seed=3)
    weight = GGUFMethod(fmt).from_blocks(raw, (5, 256))
    assert weight.nbytes == raw.nbytes  # nothing expanded, nothing added
    assert torch.equal(GGUFMethod(fmt).to_blocks(weight), torch.from_numpy(raw))


@pytest.mark.parametrize("fmt", GGUF_FORMATS)
def test_quantize_matches_gguf_and_is_close(fmt):
    w = torch.randn(6, 512, generator=torch.Generator().manual_seed(11)) * 0.05
    method = GGUFMethod(fmt)
    weight = method.quantize(w)
    raw = method.to_blocks(weight).numpy()
    expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[fmt])
    np.testing.assert_array_equal(bits(weight.dequantize().numpy()), bits(expected))
    rel = float(np.linalg.norm(expected - w.numpy()) / np.linalg.norm(w.numpy()))
    limit = {"Q8_0": 0.01, "Q6_K": 0.04, "Q5_K": 0.06}.get(fmt, 0.12)
    assert rel < limit, (fmt, rel)
    if fmt in ("Q4_0", "Q4_1", "Q8_0"):  # the same bytes as gguf-py's quantizer
        ref = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[fmt])
        np.testing.assert_array_equal(raw, ref)


@pytest.mark.parametrize("fmt", GGUF_FORMATS)
def test_rows_and_embedding_lookup(fmt):
    raw = random_blocks(fmt, 9, 256, seed=5)
    weight = GGUFMethod(fmt).from_blocks(raw, (9, 256))
    dense = weight.dequantize(torch.float32)
    ids = torch.tensor([4, 0, 8, 4])
    assert torch.equal(weight.embedding(ids, torch.float32), dense[ids])
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(2))
    assert torch.equal(weight.method.select_rows(weight, perm).dequantize(), dense[perm])
    assert torch.equal(weight.method.select_rows(weight, slice(2, 5)).dequantize(), dense[2:5])


def test_bad_shapes_are_refused():
    with pytest.raises(ConfigError, match="multiple of the block size 256"):
        GGUFMethod("Q4_K").quantize(torch.randn(4, 576))
    with pytest.raises(ConfigError, match="expected 36 uint8 bytes"):
        GGUFMethod("Q4_0").from_blocks(np.zeros(35, dtype=np.uint8), (1, 64))
    with pytest.raises(ConfigError, match="cannot stay packed"):
        from_gguf_tensor(np.zeros(10, dtype=np.uint8), "IQ2_XS", (1, 256))


@pytest.mark.slow
def test_real_model_tensors_bit_exact():
    """Q4_1 and Q8_0 tensors of the SmolLM2 GGUF dequantize exactly as gguf-py does."""
    from portaserve.core.loaders.fetch import resolve_model

    reader = gguf.GGUFReader(resolve_model("smollm2-135m"))
    by_name = {t.name: t for t in reader.tensors}
    checked = set()
    for name in ("blk.0.attn_q.weight", "blk.5.ffn_down.weight", "token_embd.weight"):
        t = by_name[name]
        data = np.asarray(t.data)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if name == "token_embd.weight":  # 49152 rows: check a slice of whole rows
            data, shape = data[1000:3000], (2000, shape[1])
        weight = from_gguf_tensor(data, t.tensor_type.name, shape)
        expected = gguf.quants.dequantize(data, t.tensor_type)
        np.testing.assert_array_equal(bits(weight.dequantize().numpy()), bits(expected))
        checked.add(t.tensor_type.name)
    assert checked == {"Q4_1", "Q8_0"}
