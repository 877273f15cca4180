"""Weight-only integer formats: int8 per output channel and int4 group-wise.

``int8``: ``qweight`` int8 [N, K], ``scales`` [N] (float32 or the checkpoint's 16-bit dtype);
``w = q * scale``. Symmetric, as in every int8 weight-only checkpoint we load.

``int4``: ``qweight`` uint8 [N, K / 2] (code of column 2j in the low nibble, 2j+1 in the high),
``scales`` [N, K / G], and ``zeros`` uint8 [N, K / G] (the integer zero point, 0..15);
``w = (q - zero) * scale``. ``meta["group_size"]`` is G and ``meta["symmetric"]`` says whether
every zero is 8 (GPTQ ``sym=True`` checkpoints and ``quantization="int4_sym"``).

Sources: online quantization of a 16-bit weight (``quantize``), GPTQ safetensors
(``qweight`` int32 [K/8, N] packed along K, ``qzeros`` int32 [K/G, N/8], ``scales`` [K/G, N],
``g_idx``), and AWQ safetensors (``qweight`` int32 [K, N/8] packed along N in AWQ's
0,2,4,6,1,3,5,7 nibble order, ``qzeros`` int32 [K/G, N/8] in the same order, ``scales`` [K/G, N]).
Act-order GPTQ (a ``g_idx`` that is not ``k // G``) is refused with a message.
"""

from __future__ import annotations

import torch

from portaserve.errors import ConfigError, ModelError
from portaserve.quant.base import QuantizedWeight

_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ int32 holds column _AWQ_ORDER[i]


def _select(weight: QuantizedWeight, rows: torch.Tensor | slice) -> dict[str, torch.Tensor]:
    return {k: (v[rows] if isinstance(rows, slice) else v.index_select(0, rows))
            for k, v in weight.data.items()}


def _check_2d(name: str, w: torch.Tensor) -> None:
    if w.dim() != 2:
        raise ConfigError(f"{name}: expected a 2-D weight; got shape {tuple(w.shape)}", field="weight")


class Int8Method:
    """int8 weight-only, one scale per output channel."""

    name = "int8"

    def dequantize(self, weight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
        q, s = weight.data["qweight"], weight.data["scales"]
        return (q.float() * s.float()[:, None]).to(dtype)  # [N, K]

    def dequantize_rows(self, weight: QuantizedWeight, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        q, s = weight.data["qweight"].index_select(0, rows), weight.data["scales"].index_select(0, rows)
        return (q.float() * s.float()[:, None]).to(dtype)

    def select_rows(self, weight: QuantizedWeight, rows: torch.Tensor | slice) -> QuantizedWeight:
        data = _select(weight, rows)
        return QuantizedWeight(self.name, (data["qweight"].shape[0], weight.shape[1]), data, self,
                               dict(weight.meta))

    def concat_rows(self, weights: list[QuantizedWeight]) -> QuantizedWeight:
        """Weights stacked along output rows (a model's fused q/k/v, gate/up)."""
        data = {k: torch.cat([w.data[k] for w in weights]) for k in ("qweight", "scales")}
        return QuantizedWeight(self.name, (data["qweight"].shape[0], weights[0].shape[1]), data, self)

    def quantize(self, w: torch.Tensor) -> QuantizedWeight:
        """Symmetric per-channel: scale = max|w_row| / 127, q = round(w / scale)."""
        _check_2d(self.name, w)
        wf = w.detach().float()
        scales = wf.abs().amax(dim=1) / 127.0  # [N]
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        q = torch.round(wf / scales[:, None]).clamp_(-127, 127).to(torch.int8)
        return self.from_tensors(q, scales)

    def from_tensors(self, qweight: torch.Tensor, scales: torch.Tensor) -> QuantizedWeight:
        """From an int8 checkpoint: ``qweight`` int8 [N, K], ``scales`` [N] or [N, 1]."""
        if qweight.dtype != torch.int8 or qweight.dim() != 2:
            raise ModelError(f"int8: qweight must be a 2-D int8 tensor; got {qweight.dtype} "
                             f"{tuple(qweight.shape)}", field="qweight")
        scales = scales.reshape(-1)
        if scales.numel() != qweight.shape[0]:
            raise ModelError(f"int8: {scales.numel()} scales for {qweight.shape[0]} rows",
                             field="scales")
        return QuantizedWeight(self.name, tuple(qweight.shape), {"qweight": qweight.contiguous(),
                               "scales": scales.contiguous()}, self)


def pick_group_size(in_features: int, preferred: int = 128) -> int:
    """The largest of (preferred, 128, 64, 32) that divides ``in_features``."""
    for g in (preferred, 128, 64, 32):
        if g > 0 and in_features % g == 0:
            return g
    raise ConfigError(f"int4: in_features {in_features} is not a multiple of 32", field="group_size")


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """codes uint8 [N, K] (each < 16) -> [N, K / 2]: column 2j low nibble, 2j+1 high."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K / 2] -> codes uint8 [N, K] (inverse of ``pack_nibbles``)."""
    return torch.stack((p & 0x0F, p >> 4), dim=-1).flatten(-2)


class Int4Method:
    """int4 weight-only, group-wise scales and integer zero points."""

    name = "int4"

    def dequantize(self, weight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
        return self._dequant(weight.data, weight.meta["group_size"], dtype)

    def dequantize_rows(self, weight: QuantizedWeight, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        data = {k: v.index_select(0, rows) for k, v in weight.data.items()}
        return self._dequant(data, weight.meta["group_size"], dtype)

    @staticmethod
    def _dequant(data: dict[str, torch.Tensor], group_size: int, dtype: torch.dtype) -> torch.Tensor:
        q = unpack_nibbles(data["qweight"])  # [N, K]
        n, k = q.shape
        q = q.view(n, k // group_size, group_size).float()  # [N, G, gs]
        z = data["zeros"].float()[..., None]  # [N, G, 1]
        s = data["scales"].float()[..., None]
        return ((q - z) * s).reshape(n, k).to(dtype)

    def select_rows(self, weight: QuantizedWeight, rows: torch.Tensor | slice) -> QuantizedWeight:
        data = _select(weight, rows)
        return QuantizedWeight(self.name, (data["qweight"].shape[0], weight.shape[1]), data, self,
                               dict(weight.meta))

    def concat_rows(self, weights: list[QuantizedWeight]) -> QuantizedWeight | None:
        """Weights stacked along output rows (fused q/k/v, gate/up); None when their group
        sizes differ (the model then runs them as separate GEMMs)."""
        group = weights[0].meta["group_size"]
        if any(w.meta["group_size"] != group for w in weights):
            return None
        data = {k: torch.cat([w.data[k] for w in weights]) for k in ("qweight", "scales", "zeros")}
        meta = {"group_size": group,
                "symmetric": all(w.meta.get("symmetric", False) for w in weights)}
        return QuantizedWeight(self.name, (data["qweight"].shape[0], weights[0].shape[1]), data,
                               self, meta)

    def quantize(self, w: torch.Tensor, group_size: int = 128, symmetric: bool = False) -> QuantizedWeight:
        """Round-to-nearest per group: asymmetric (min/max over 0..15) or symmetric (zero 8)."""
        _check_2d(self.name, w)
        n, k = w.shape
        group_size = pick_group_size(k, group_size)
        wg = w.detach().float().reshape(n, k // group_size, group_size)  # [N, G, gs]
        if symmetric:
            scales = wg.abs().amax(dim=-1) / 7.0  # [N, G]; codes -8..7 around zero 8
            scales = torch.where(scales > 0, scales, torch.ones_like(scales))
            zeros = torch.full_like(scales, 8.0)
        else:
            lo = wg.amin(dim=-1).clamp(max=0.0)
            hi = wg.amax(dim=-1).clamp(min=0.0)
            scales = (hi - lo) / 15.0
            scales = torch.where(scales > 0, scales, torch.ones_like(scales))
            zeros = torch.round(-lo / scales).clamp(0, 15)
        q = torch.round(wg / scales[..., None] + zeros[..., None]).clamp_(0, 15)
        q = q.to(torch.uint8).reshape(n, k)
        return self.from_codes(q, scales, zeros.to(torch.uint8), group_size, symmetric)

    def from_codes(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   group_size: int, symmetric: bool) -> QuantizedWeight:
        """From unpacked codes uint8 [N, K], ``scales`` [N, K/G], ``zeros`` uint8 [N, K/G]."""
        n, k = codes.shape
        if k % group_size or scales.shape != (n, k // group_size) or zeros.shape != scales.shape:
            raise ModelError(
                f"int4: codes {tuple(codes.shape)}, scales {tuple(scales.shape)}, zeros "
                f"{tuple(zeros.shape)} do not agree with group size {group_size}", field="scales")
        data = {"qweight": pack_nibbles(codes).contiguous(), "scales": scales.contiguous(),
                "zeros": zeros.to(torch.uint8).contiguous()}
        meta = {"group_size": group_size, "symmetric": symmetric}
        return QuantizedWeight(self.name, (n, k), data, self, meta)

    # -- checkpoints -------------------------------------------------------------------------

    def from_gptq(self, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                  g_idx: torch.Tensor | None = None, *, bits: int = 4, symmetric: bool = False,
                  zero_offset: int = 1) -> QuantizedWeight:
        """GPTQ (AutoGPTQ / GPTQModel v1 layout): ``qweight`` int32 [K/8, N], ``qzeros`` int32
        [K/G, N/8] (stored as zero - ``zero_offset``; v1 checkpoints store zero - 1),
        ``scales`` [K/G, N]; ``w[n, k] = scale * (q - zero)``."""
        if bits != 4:
            raise ModelError(f"GPTQ: only 4-bit checkpoints load as int4; got bits={bits}", field="bits")
        k = qweight.shape[0] * 8
        num_groups = scales.shape[0]
        group_size = k // num_groups
        if g_idx is not None:
            expected = torch.arange(k, dtype=torch.int64) // group_size
            if not torch.equal(g_idx.to(torch.int64).cpu(), expected):
                raise ModelError("GPTQ: act-order checkpoints (desc_act, a permuted g_idx) are not "
                                 "supported; re-export with desc_act=False", field="g_idx")
        codes = _unpack_int32(qweight, dim=0)  # [K, N]
        zeros = (_unpack_int32(qzeros, dim=1).int() + zero_offset) & 0x0F  # [K/G, N]
        return self.from_codes(codes.t().contiguous(), scales.t().contiguous(),
                               zeros.to(torch.uint8).t().contiguous(), group_size, symmetric)

    def from_awq(self, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> QuantizedWeight:
        """AWQ (GEMM layout): ``qweight`` int32 [K, N/8], ``qzeros`` int32 [K/G, N/8] with
        AWQ's nibble order, ``scales`` [K/G, N]; ``w[n, k] = scale * (q - zero)``."""
        k = qweight.shape[0]
        group_size = k // scales.shape[0]
        codes = _awq_unorder(_unpack_int32(qweight, dim=1))  # [K, N]
        zeros = _awq_unorder(_unpack_int32(qzeros, dim=1))  # [K/G, N]
        return self.from_codes(codes.t().contiguous(), scales.t().contiguous(),
                               zeros.t().contiguous(), group_size, symmetric=False)


def _unpack_int32(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 with 8 nibbles each (nibble i at bits 4i) -> uint8 codes, 8x longer along ``dim``."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    p = packed.to(torch.int32)
    if dim == 0:
        codes = (p.unsqueeze(1) >> shifts.view(1, 8, 1)) & 0x0F  # [R, 8, C]
        return codes.reshape(-1, p.shape[1]).to(torch.uint8)
    codes = (p.unsqueeze(-1) >> shifts) & 0x0F  # [R, C, 8]
    return codes.reshape(p.shape[0], -1).to(torch.uint8)


def _pack_int32(codes: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of ``_unpack_int32``: uint8 codes -> int32 words of 8 nibbles along ``dim``."""
    if dim == 0:
        return _pack_int32(codes.t().contiguous(), dim=1).t().contiguous()
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    words = (codes.to(torch.int64).reshape(codes.shape[0], -1, 8) << shifts).sum(dim=-1)  # [R, C/8]
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _awq_unorder(codes: torch.Tensor) -> torch.Tensor:
    """Columns in AWQ's packed order -> natural order (per 8-column word)."""
    r, c = codes.shape
    words = codes.view(r, c // 8, 8)
    out = torch.empty_like(words)
    out[:, :, list(_AWQ_ORDER)] = words
    return out.view(r, c)


def to_gptq(weight: QuantizedWeight) -> dict[str, torch.Tensor]:
    """An int4 weight in the GPTQ v1 checkpoint layout (for tests and export)."""
    codes = unpack_nibbles(weight.data["qweight"]).t().contiguous()  # [K, N]
    zeros = ((weight.data["zeros"].int() - 1) & 0x0F).to(torch.uint8).t().contiguous()  # [K/G, N]
    k = codes.shape[0]
    g = weight.meta["group_size"]
    return {"qweight": _pack_int32(codes, dim=0), "qzeros": _pack_int32(zeros, dim=1),
            "scales": weight.data["scales"].t().contiguous(),
            "g_idx": (torch.arange(k) // g).to(torch.int32)}


def to_awq(weight: QuantizedWeight) -> dict[str, torch.Tensor]:
    """An int4 weight in the AWQ GEMM checkpoint layout (for tests and export)."""
    codes = unpack_nibbles(weight.data["qweight"]).t().contiguous()  # [K, N]
    zeros = weight.data["zeros"].t().contiguous()  # [K/G, N]

    def order(c: torch.Tensor) -> torch.Tensor:
        r, n = c.shape
        return c.view(r, n // 8, 8)[:, :, list(_AWQ_ORDER)].reshape(r, n)

    return {"qweight": _pack_int32(order(codes), dim=1), "qzeros": _pack_int32(order(zeros), dim=1),
            "scales": weight.data["scales"].t().contiguous()}
