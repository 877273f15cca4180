"""GGUF block formats kept packed: Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K.

A GGUF tensor of logical shape ``[N, K]`` is ``N`` rows of ``K / block_size`` blocks. We keep the
blocks losslessly repacked as a struct of arrays, each array with the row as its first dim, so
a row slice is a view and the reference dequantization is plain torch:

=======  ===========  =====================================================================
format   block        ``QuantizedWeight.data``  (B = blocks per row)
=======  ===========  =====================================================================
Q4_0     32 / 18 B    ``d`` fp16 [N, B], ``qs`` uint8 [N, B, 16]
Q4_1     32 / 20 B    ``d``, ``m`` fp16 [N, B], ``qs`` uint8 [N, B, 16]
Q8_0     32 / 34 B    ``d`` fp16 [N, B], ``qs`` int8 [N, B, 32]
Q4_K     256 / 144 B  ``d``, ``dmin`` fp16 [N, B], ``scales`` uint8 [N, B, 12], ``qs`` [N, B, 128]
Q5_K     256 / 176 B  as Q4_K plus ``qh`` uint8 [N, B, 32]
Q6_K     256 / 210 B  ``ql`` uint8 [N, B, 128], ``qh`` [N, B, 64], ``scales`` int8 [N, B, 16], ``d``
=======  ===========  =====================================================================

The bytes are the same as in the file (``to_gguf_bytes`` rebuilds the blocks), so resident
memory equals the file's tensor bytes. ``dequantize`` equals ``gguf.quants.dequantize`` bit for
bit in float32: the same float operations in the same order (no fused multiply-add).

Producing packed data: Q4_0, Q4_1 and Q8_0 use ``gguf.quants.quantize``; the K formats (which
gguf-py cannot quantize) use a simple min/max quantizer here: valid blocks that llama.cpp
reads, but not llama.cpp's error-minimizing scale search.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from portaserve.errors import ConfigError
from portaserve.quant.base import QuantizedWeight

QK_K = 256


@dataclass(frozen=True)
class _Field:
    name: str
    nbytes: int  # per block
    dtype: torch.dtype
    shape: tuple[int, ...]  # per block, () for a scalar


# Field order is the byte order inside a block (ggml's block_* structs).
_LAYOUTS: dict[str, tuple[int, tuple[_Field, ...]]] = {
    "Q4_0": (32, (_Field("d", 2, torch.float16, ()), _Field("qs", 16, torch.uint8, (16,)))),
    "Q4_1": (32, (_Field("d", 2, torch.float16, ()), _Field("m", 2, torch.float16, ()),
                  _Field("qs", 16, torch.uint8, (16,)))),
    "Q8_0": (32, (_Field("d", 2, torch.float16, ()), _Field("qs", 32, torch.int8, (32,)))),
    "Q4_K": (QK_K, (_Field("d", 2, torch.float16, ()), _Field("dmin", 2, torch.float16, ()),
                    _Field("scales", 12, torch.uint8, (12,)), _Field("qs", 128, torch.uint8, (128,)))),
    "Q5_K": (QK_K, (_Field("d", 2, torch.float16, ()), _Field("dmin", 2, torch.float16, ()),
                    _Field("scales", 12, torch.uint8, (12,)), _Field("qh", 32, torch.uint8, (32,)),
                    _Field("qs", 128, torch.uint8, (128,)))),
    "Q6_K": (QK_K, (_Field("ql", 128, torch.uint8, (128,)), _Field("qh", 64, torch.uint8, (64,)),
                    _Field("scales", 16, torch.int8, (16,)), _Field("d", 2, torch.float16, ()))),
}

GGUF_FORMATS: tuple[str, ...] = tuple(_LAYOUTS)


def block_size(fmt: str) -> int:
    return _LAYOUTS[fmt][0]


def type_size(fmt: str) -> int:
    return sum(f.nbytes for f in _LAYOUTS[fmt][1])


# -- bit unpacking shared by the reference and the kernels ----------------------------------


def _nibbles(qs: torch.Tensor, width: int) -> torch.Tensor:
    """uint8 [..., n * width] -> uint8 [..., 2n, width]: low nibbles of each ``width`` bytes, then high."""
    qs = qs.unflatten(-1, (-1, 1, width))  # [..., n, 1, width]
    both = torch.cat((qs & 0x0F, qs >> 4), dim=-2)  # [..., n, 2, width]
    return both.flatten(-3, -2)  # [..., 2n, width]


def k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 packed bytes of a Q4_K/Q5_K super-block -> 8 six-bit scales and 8 mins (uint8)."""
    d, m, md = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=-1)  # [..., 8]
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=-1)  # [..., 8]
    return sc, mn


def unpack_codes(fmt: str, data: dict[str, torch.Tensor]) -> torch.Tensor:
    """The integer codes of every weight as uint8/int8 [N, B, sub_blocks, sub_size] (unsigned
    for Q4_0/Q4_1/K formats before any offset; int8 for Q8_0)."""
    if fmt in ("Q4_0", "Q4_1"):
        return _nibbles(data["qs"], 16).flatten(-2).unsqueeze(2)  # [N, B, 1, 32]: lows, then highs
    if fmt == "Q8_0":
        return data["qs"].unsqueeze(2)  # [N, B, 1, 32]
    if fmt == "Q4_K":
        return _nibbles(data["qs"], 32)  # [N, B, 8, 32]
    if fmt == "Q5_K":
        low = _nibbles(data["qs"], 32)  # [N, B, 8, 32]
        shifts = torch.arange(8, dtype=torch.uint8, device=low.device).view(8, 1)
        high = (data["qh"].unsqueeze(-2) >> shifts) & 0x01  # [N, B, 8, 32]
        return low | (high << 4)
    if fmt == "Q6_K":
        low = _nibbles(data["ql"], 64).unflatten(-1, (2, 32)).flatten(-3, -2)  # [N, B, 8, 32]
        qh = data["qh"].unflatten(-1, (2, 1, 32))  # [N, B, 2, 1, 32]
        # arange, not a tensor from a host list: this runs inside CUDA-graph capture too.
        shifts = torch.arange(0, 8, 2, dtype=torch.uint8, device=qh.device).view(4, 1)
        high = ((qh >> shifts) & 0x03).flatten(-3, -2)  # [N, B, 8, 32]
        return low | (high << 4)
    raise ConfigError(f"unknown GGUF format {fmt!r}", field="format")


def dequantize_data(fmt: str, data: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Dense [N, K] weights of packed rows, float32 math identical to gguf-py, then ``dtype``."""
    q = unpack_codes(fmt, data)
    n = q.shape[0]
    if fmt == "Q4_0":
        d = data["d"].float()[..., None, None]  # [N, B, 1, 1]
        w = d * (q.to(torch.int8) - 8).float()
    elif fmt == "Q4_1":
        d, m = data["d"].float()[..., None, None], data["m"].float()[..., None, None]
        w = d * q.float() + m
    elif fmt == "Q8_0":
        w = q.float() * data["d"].float()[..., None, None]
    elif fmt in ("Q4_K", "Q5_K"):
        sc, mn = k_scale_min(data["scales"])  # [N, B, 8]
        d = (data["d"].float()[..., None] * sc.float())[..., None]  # [N, B, 8, 1]
        dm = (data["dmin"].float()[..., None] * mn.float())[..., None]
        w = d * q.float() - dm
    elif fmt == "Q6_K":
        d = (data["d"].float()[..., None] * data["scales"].float())[..., None]  # [N, B, 16, 1]
        qs = (q.to(torch.int8) - 32).reshape(*q.shape[:2], 16, 16).float()
        w = d * qs
    else:
        raise ConfigError(f"unknown GGUF format {fmt!r}", field="format")
    return w.reshape(n, -1).to(dtype)  # [N, K]


class GGUFMethod:
    """One GGUF block format as a quant method (registered under its GGUF name, e.g. "Q4_1")."""

    def __init__(self, fmt: str) -> None:
        if fmt not in _LAYOUTS:
            raise ConfigError(f"unknown GGUF format {fmt!r}; known: {list(_LAYOUTS)}", field="format")
        self.name = fmt
        self.block_size = block_size(fmt)
        self.type_size = type_size(fmt)

    def __repr__(self) -> str:
        return f"GGUFMethod({self.name})"

    # -- reference dequantization ------------------------------------------------------------

    def dequantize(self, weight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_data(self.name, weight.data, dtype)  # [N, K]

    def dequantize_rows(
        self, weight: QuantizedWeight, rows: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        data = {k: v.index_select(0, rows) for k, v in weight.data.items()}
        return dequantize_data(self.name, data, dtype)  # [len(rows), K]

    def select_rows(self, weight: QuantizedWeight, rows: torch.Tensor | slice) -> QuantizedWeight:
        """The packed rows ``rows`` (a permutation or a shard) as a new weight."""
        data = {k: (v[rows] if isinstance(rows, slice) else v.index_select(0, rows))
                for k, v in weight.data.items()}
        n = next(iter(data.values())).shape[0]
        return QuantizedWeight(self.name, (n, weight.shape[1]), data, self, dict(weight.meta))

    def concat_rows(self, weights: list[QuantizedWeight]) -> QuantizedWeight:
        """Weights of this format stacked along output rows (a model's fused q/k/v, gate/up)."""
        data = {k: torch.cat([w.data[k] for w in weights]) for k in weights[0].data}
        n = sum(w.shape[0] for w in weights)
        return QuantizedWeight(self.name, (n, weights[0].shape[1]), data, self)

    # -- bytes in and out --------------------------------------------------------------------

    def from_blocks(self, raw: np.ndarray | torch.Tensor, shape: tuple[int, int]) -> QuantizedWeight:
        """Packed weight from GGUF block bytes: ``raw`` uint8 [N, K / block * type_size] (or
        flat), ``shape`` the logical (N, K) (GGUF lists dims reversed: ne = [K, N])."""
        n, k = int(shape[0]), int(shape[1])
        if k % self.block_size:
            raise ConfigError(
                f"{self.name}: row length {k} is not a multiple of the block size "
                f"{self.block_size}", field="shape")
        num_blocks = k // self.block_size
        if isinstance(raw, np.ndarray):
            with warnings.catch_warnings():  # a read-only mmap view: the fields below are copies
                warnings.filterwarnings("ignore", message=".*not writable.*")
                raw_t = torch.as_tensor(np.ascontiguousarray(raw))
        else:
            raw_t = raw
        if raw_t.dtype != torch.uint8 or raw_t.numel() != n * num_blocks * self.type_size:
            raise ConfigError(
                f"{self.name}: expected {n * num_blocks * self.type_size} uint8 bytes for shape "
                f"{(n, k)}; got {raw_t.numel()} of {raw_t.dtype}", field="shape")
        blocks = raw_t.reshape(n, num_blocks, self.type_size)
        data: dict[str, torch.Tensor] = {}
        offset = 0
        for f in _LAYOUTS[self.name][1]:
            part = blocks[:, :, offset : offset + f.nbytes].contiguous()  # a copy: own the memory
            data[f.name] = part.view(f.dtype).reshape(n, num_blocks, *f.shape)
            offset += f.nbytes
        return QuantizedWeight(self.name, (n, k), data, self)

    def to_blocks(self, weight: QuantizedWeight) -> torch.Tensor:
        """GGUF block bytes uint8 [N, K / block * type_size] (the inverse of ``from_blocks``)."""
        n = weight.shape[0]
        parts = [weight.data[f.name].reshape(n, -1, max(1, f.nbytes // f.dtype.itemsize))
                 .contiguous().view(torch.uint8) for f in _LAYOUTS[self.name][1]]
        return torch.cat(parts, dim=-1).reshape(n, -1)

    # -- producing packed data ---------------------------------------------------------------

    def random(self, n: int, k: int, *, device: torch.device, generator: torch.Generator,
               std: float = 0.02) -> QuantizedWeight:
        """Random blocks made on ``device`` (no host work): random code bytes, 16-bit scales
        set for weights of about ``std``. For speed work (synthetic models), where values do
        not matter but their bytes do."""
        if k % self.block_size:
            raise ConfigError(f"{self.name}: row length {k} is not a multiple of the block size "
                              f"{self.block_size}", field="shape")
        blocks = k // self.block_size
        # std of the dequantized weight per unit of d with random bytes (measured once)
        spread = {"Q4_0": 4.6, "Q4_1": 4.6, "Q8_0": 74.0, "Q4_K": 225.0, "Q5_K": 440.0,
                  "Q6_K": 1400.0}[self.name]
        data: dict[str, torch.Tensor] = {}
        for f in _LAYOUTS[self.name][1]:
            shape = (n, blocks, *f.shape)
            if f.dtype == torch.float16:
                data[f.name] = torch.full(shape, std / spread, dtype=f.dtype, device=device)
            else:
                raw = torch.randint(0, 256, shape, dtype=torch.uint8, device=device, generator=generator)
                data[f.name] = raw.view(f.dtype)
        if "m" in data:  # Q4_1: centre the codes (d q + m with m = -8 d)
            data["m"] = -8 * data["d"]
        if "dmin" in data:
            data["dmin"] = data["d"] * 4
        return QuantizedWeight(self.name, (n, k), data, self)

    def quantize(self, w: torch.Tensor) -> QuantizedWeight:
        """Quantize a dense [N, K] weight into this format."""
        if w.dim() != 2:
            raise ConfigError(f"{self.name}: expected a 2-D weight; got shape {tuple(w.shape)}",
                              field="weight")
        n, k = w.shape
        if k % self.block_size:
            raise ConfigError(
                f"{self.name}: row length {k} is not a multiple of the block size "
                f"{self.block_size}", field="weight")
        x = w.detach().float().cpu().numpy()
        if self.name in ("Q4_0", "Q4_1", "Q8_0"):
            import gguf

            raw = gguf.quants.quantize(x, gguf.GGMLQuantizationType[self.name])
        else:
            raw = _K_QUANTIZERS[self.name](x.reshape(-1, QK_K)).reshape(n, -1)
        return self.from_blocks(raw, (n, k))


# -- K-quant producers (numpy; simple min/max scales) ----------------------------------------


def _round(x: np.ndarray) -> np.ndarray:
    return np.floor(x + np.float32(0.5)).astype(np.int32)


def _pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins per super-block -> the 12 bytes ``k_scale_min`` unpacks."""
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    lo_d = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    lo_m = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    md = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return np.concatenate([lo_d, lo_m, md], axis=1)


def _k_affine(blocks: np.ndarray, levels: int) -> tuple[np.ndarray, ...]:
    """Shared by Q4_K/Q5_K: codes [n, 8, 32] in 0..levels, fp16 d/dmin, 6-bit scales/mins."""
    sub = blocks.reshape(-1, 8, 32)
    lo = np.minimum(sub.min(axis=-1), 0.0)  # [n, 8] (the format subtracts a non-negative min)
    hi = sub.max(axis=-1)
    scale = (hi - lo) / levels
    d = (scale.max(axis=-1) / 63).astype(np.float16)  # [n]
    dmin = ((-lo).max(axis=-1) / 63).astype(np.float16)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.clip(_round(np.where(d[:, None] > 0, scale / d.astype(np.float32)[:, None], 0)), 0, 63)
        mn = np.clip(_round(np.where(dmin[:, None] > 0, -lo / dmin.astype(np.float32)[:, None], 0)), 0, 63)
        eff_d = (d.astype(np.float32)[:, None] * sc)[..., None]  # [n, 8, 1]
        eff_m = (dmin.astype(np.float32)[:, None] * mn)[..., None]
        q = np.where(eff_d > 0, (sub + eff_m) / eff_d, 0)
    q = np.clip(_round(q), 0, levels).astype(np.uint8)  # [n, 8, 32]
    return q, d, dmin, _pack_k_scales(sc, mn)


def _nibble_pack(q: np.ndarray, width: int) -> np.ndarray:
    """codes [n, 2m, width] (each < 16) -> bytes [n, m * width] (inverse of ``_nibbles``)."""
    q = q.reshape(q.shape[0], -1, 2, width)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(q.shape[0], -1)


def _quantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    q, d, dmin, scales = _k_affine(blocks, 15)
    return np.concatenate([d[:, None].view(np.uint8), dmin[:, None].view(np.uint8), scales,
                           _nibble_pack(q, 32)], axis=1)


def _quantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    q, d, dmin, scales = _k_affine(blocks, 31)
    qh = np.zeros((q.shape[0], 32), dtype=np.uint8)
    for s in range(8):
        qh |= ((q[:, s] >> 4) & 1) << s
    return np.concatenate([d[:, None].view(np.uint8), dmin[:, None].view(np.uint8), scales, qh,
                           _nibble_pack(q & 0x0F, 32)], axis=1)


def _quantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    sub = blocks.reshape(-1, 16, 16)
    imax = np.abs(sub).argmax(axis=-1)[..., None]
    scale = np.take_along_axis(sub, imax, axis=-1)[..., 0] / -32  # [n, 16], signed
    d = (np.abs(scale).max(axis=-1) / 127).astype(np.float16)  # [n]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.clip(_round(np.where(d[:, None] > 0, scale / d.astype(np.float32)[:, None], 0)), -128, 127)
        eff = (d.astype(np.float32)[:, None] * sc)[..., None]  # [n, 16, 1]
        q = np.where(eff != 0, sub / eff, 0)
    q = (np.clip(_round(q), -32, 31) + 32).astype(np.uint8).reshape(-1, 8, 32)  # [n, 8, 32]
    # ql: byte h*64 + i holds codes h*128 + i (low nibble) and h*128 + 64 + i (high nibble)
    ql = _nibble_pack((q & 0x0F).reshape(-1, 4, 64), 64)
    # qh: byte h*32 + i holds bits 4..5 of codes h*128 + s*32 + i at bit 2*s
    hi = (q >> 4).reshape(-1, 2, 4, 32)
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    return np.concatenate([ql, qh.reshape(-1, 64), sc.astype(np.int8).view(np.uint8),
                           d[:, None].view(np.uint8)], axis=1)


_K_QUANTIZERS = {"Q4_K": _quantize_q4_k, "Q5_K": _quantize_q5_k, "Q6_K": _quantize_q6_k}


def from_gguf_tensor(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> QuantizedWeight:
    """A GGUF tensor kept packed. ``type_name`` is the GGML type name ("Q4_1", ...)."""
    if type_name not in _LAYOUTS:
        raise ConfigError(f"GGUF type {type_name!r} cannot stay packed; packed types are "
                          f"{list(_LAYOUTS)}", field="tensor_type")
    return GGUFMethod(type_name).from_blocks(raw, shape)
