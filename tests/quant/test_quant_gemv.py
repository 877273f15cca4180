"""The small-M Triton GEMV (``quant.gemv_triton``) against the reference, on fresh random inputs.

Without a GPU the kernel runs in Triton's interpreter on CPU tensors (float32, float16); with
``PORTASERVE_TEST_DEVICE=cuda`` the same tests run compiled on the GPU and add bfloat16. Cases:
every format it serves (GGUF blocks incl. Q4_K / Q5_K / Q6_K, also on random bytes) with each
kernel that serves it (the FMA kernel: all; the tensor-core kernel: ``DOT_FORMATS``), M = 1..4,
row counts that do not fill the last tile, K split over programs (the policy's choice, none,
and an uneven split), bias, fused q|k|v weights (``concat_rows``), int4 group sizes 32/64/128
symmetric and asymmetric, and fp8 W8A8 against ``fp8_linear_emulated`` in each activation
scheme.
"""

from __future__ import annotations

import types
import zlib

import pytest
import torch
from triton_device import DEVICE, DTYPES, RTOL, launch_spy, rel_err, skip_module_without_device

pytest.importorskip("triton")
skip_module_without_device()

from portaserve.devices import reference  # noqa: E402
from portaserve.quant import gemv_triton, registry  # noqa: E402
from portaserve.quant.fp8 import FP8Method, fp8_linear_emulated, quantize_activation  # noqa: E402
from portaserve.quant.gguf_formats import GGUFMethod  # noqa: E402
from portaserve.quant.int_formats import Int4Method  # noqa: E402


@pytest.fixture
def gen(request: pytest.FixtureRequest) -> torch.Generator:
    """Fresh inputs per test case, reproducible from the test id."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))

#: Small tiles, so the interpreter stays quick and K spans several steps: per kernel.
SMALL = {"fma": gemv_triton.GemvConfig(block_n=16, block_k=128),
         "dot": gemv_triton.GemvConfig(block_n=16, block_k=128, dot=True),
         "dot_scaled": gemv_triton.GemvConfig(block_n=16, block_k=128, dot=True, scale_tile=True)}


def packed(fmt: str, n: int, k: int, gen: torch.Generator, group: int = 128):
    """A random [n, k] weight (an offset, so asymmetric zeros matter) packed as ``fmt``."""
    w = torch.randn(n, k, generator=gen) * k**-0.5 + 0.01
    if fmt.startswith("int4"):
        return Int4Method().quantize(w, group_size=group, symmetric=fmt == "int4_sym")
    return registry.quantize(w, fmt)


def check(weight, m: int, dtype: torch.dtype, gen: torch.Generator, *, bias: bool = False,
          split_k: int | None = None, config=SMALL["fma"]) -> None:
    n, k = weight.shape
    x = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    want = reference.quant_linear(x, weight, b)
    got = gemv_triton.gemv(x.to(DEVICE), weight.to(DEVICE), None if b is None else b.to(DEVICE),
                           config=config, split_k=split_k)
    assert got is not None, f"{weight.format}: the GEMV declined {m}x{k} -> {n}"
    assert got.dtype == dtype and got.shape == (m, n)
    err = rel_err(got, want)
    assert err <= RTOL[dtype], f"{weight.format} m={m} split_k={split_k}: {err:.2e}"


WEIGHT_ONLY = [("Q4_0", 32), ("Q4_1", 32), ("Q8_0", 32), ("int8", 0), ("int4", 32),
               ("int4_sym", 64), ("int4", 128), ("int4_sym", 128), ("Q4_K", 256), ("Q5_K", 256),
               ("Q6_K", 256)]


KERNELS = [(f, g, kernel) for f, g in WEIGHT_ONLY for kernel in SMALL
           if kernel == "fma" or f.split("_sym")[0] in gemv_triton.DOT_FORMATS]


@pytest.mark.parametrize("fmt,group,kernel", KERNELS, ids=[f"{f}-g{g}-{k}" for f, g, k in KERNELS])
@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_matches_the_reference(fmt: str, group: int, kernel: str, m: int, dtype: torch.dtype,
                                    gen: torch.Generator) -> None:
    weight = packed(fmt, 40, 512, gen, group)  # 40 rows: the last 16-row tile is partial
    cfg = SMALL[kernel]
    check(weight, m, dtype, gen, config=cfg)  # the policy's split (the interpreter "has 2 SMs")
    check(weight, m, dtype, gen, split_k=1, bias=True, config=cfg)
    check(weight, m, dtype, gen, split_k=3, config=cfg)  # 4 K steps, 3 programs: 2, 2 and none


@pytest.mark.parametrize("kernel", list(SMALL))
@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q8_0", "int8", "int4", "int4_sym", "Q4_K", "Q6_K"])
def test_gemv_on_fused_qkv(fmt: str, kernel: str, gen: torch.Generator) -> None:
    parts = [packed(fmt, n, 256, gen, 64) for n in (64, 16, 16)]  # q | k | v
    fused = parts[0].method.concat_rows(parts)
    assert fused is not None and fused.shape == (96, 256)
    cfg = SMALL[kernel]
    for m in (1, 3):
        check(fused, m, torch.float32, gen, config=cfg)
    # the fused output is the three outputs side by side
    x = torch.randn(2, 256, generator=gen)
    whole = gemv_triton.gemv(x.to(DEVICE), fused.to(DEVICE), config=cfg).cpu()
    each = torch.cat([gemv_triton.gemv(x.to(DEVICE), p.to(DEVICE), config=cfg).cpu() for p in parts], 1)
    assert rel_err(whole, each) <= 1e-6


@pytest.mark.parametrize("dot", [False, True], ids=["fma", "dot"])
@pytest.mark.parametrize("scheme", ["dynamic_per_token", "dynamic_per_tensor", "static"])
@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_tensor"])
def test_fp8_gemv_matches_the_w8a8_emulation(scheme: str, m: int, per_channel: bool, dot: bool,
                                             gen: torch.Generator) -> None:
    w = torch.randn(48, 256, generator=gen) * 0.06
    method = FP8Method()
    weight = method.quantize(w, per_channel=per_channel,
                             activation="dynamic_per_token" if scheme == "static" else scheme)
    if scheme == "static":
        q = weight.data
        weight = method.from_tensors(q["weight"], q["weight_scale"], input_scale=torch.tensor(0.01))
    x = torch.randn(m, 256, generator=gen) * 2
    xq, xs = quantize_activation(x, weight)  # the fp8 activations (torch's rounding)
    want = fp8_linear_emulated(x, weight)
    for split_k in (1, 2):
        got = gemv_triton.gemv(xq.to(DEVICE), weight.to(DEVICE), x_scale=xs.reshape(-1).to(DEVICE)
                               if xs.dim() else xs.to(DEVICE), out_dtype=torch.float32,
                               config=gemv_triton.GemvConfig(16, 64, dot=dot), split_k=split_k)
        assert got is not None
        assert rel_err(got, want) <= 1e-6


@pytest.mark.parametrize("kernel", ["fma", "dot"])
def test_split_sums_unrolled_equal_the_loop(kernel: str, gen: torch.Generator,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The last program of a split row tile loads every split's partials at once
    (``SPLIT_SUM_UNROLLED``, masked past the split count) or in a run-time loop: the same sums
    in the same order, so the same bits; both near the reference. 3 and 5 splits (not powers of
    two), two rows of x, a bias."""
    weight = packed("int4", 48, 640, gen, group=32)
    x = torch.randn(2, 640, generator=gen)
    b = torch.randn(48, generator=gen)
    want = reference.quant_linear(x, weight, b)
    for split_k in (3, 5):
        outs = []
        for unrolled in (True, False):
            monkeypatch.setattr(gemv_triton, "SPLIT_SUM_UNROLLED", unrolled)
            outs.append(gemv_triton.gemv(x.to(DEVICE), weight.to(DEVICE), b.to(DEVICE), config=SMALL[kernel],
                                         split_k=split_k))
        assert outs[0] is not None and torch.equal(outs[0], outs[1]), split_k
        assert rel_err(outs[0], want) <= RTOL[torch.float32]
    with pytest.raises(ValueError, match="split_k=17"):  # past what the last program sums
        gemv_triton.gemv(x.to(DEVICE), weight.to(DEVICE), config=SMALL[kernel], split_k=17)


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q8_0", "int8", "int4", "Q4_K", "Q5_K", "Q6_K"])
def test_gemv_with_the_tuned_tiles(fmt: str, gen: torch.Generator) -> None:
    weight = packed(fmt, 72, 1024, gen)
    for m in (1, 2, 4):  # each row count's own tiles (gemv_triton.CONFIGS)
        if gemv_triton.config_for(fmt, m) is None:  # the tiled GEMM's rows: the GEMV declines
            assert gemv_triton.gemv(torch.randn(m, 1024).to(DEVICE), weight.to(DEVICE)) is None
        else:
            check(weight, m, torch.float32, gen, config=None)


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"])
def test_gemv_on_random_gguf_blocks(fmt: str, gen: torch.Generator) -> None:
    """Random bytes in every field: every bit of the packed scales and high bits is read."""
    weight = GGUFMethod(fmt).random(24, 768, device=torch.device("cpu"), generator=gen)
    for kernel in SMALL if fmt in gemv_triton.DOT_FORMATS else ["fma"]:
        for m in (1, 4):
            check(weight, m, torch.float32, gen, split_k=3, config=SMALL[kernel])


def test_dot_kernel_hands_odd_scale_rows_to_the_fma_kernel(gen: torch.Generator) -> None:
    """Q4_0 with K = 96: three fp16 scales a row are no whole 32-bit words, which the
    tensor-core kernel reads; the FMA kernel serves it instead."""
    weight = packed("Q4_0", 24, 96, gen)
    check(weight, 2, torch.float32, gen, config=SMALL["dot"])


def test_cuda_registers_every_format_the_kernels_serve() -> None:
    from portaserve.quant import builtin, kernels_triton

    assert set(builtin.TRITON_FORMATS) == set(kernels_triton.TRITON_FORMATS)
    assert set(kernels_triton.TRITON_FORMATS) | {"fp8"} == set(gemv_triton.FORMAT_IDS)


def test_gemv_declines_what_it_does_not_serve(gen: torch.Generator) -> None:
    weight = packed("Q8_0", 16, 256, gen)
    assert gemv_triton.gemv(torch.randn(5, 256).to(DEVICE), weight.to(DEVICE)) is None  # M > MAX_M
    odd = packed("int8", 16, 200, gen)  # K = 200: no whole 32-column step
    assert gemv_triton.gemv(torch.randn(1, 200).to(DEVICE), odd.to(DEVICE)) is None


def test_int4_takes_the_tensor_core_kernel_for_one_row_only_on_wide_weights() -> None:
    """Measured choice: one row of int4 streams the FMA kernel, except over vocab-sized weights."""
    assert not gemv_triton.config_for("int4", 1, 4096).dot
    assert gemv_triton.config_for("int4", 1, 128256).dot
    assert gemv_triton.config_for("int4", 2, 4096).dot
    assert not gemv_triton.config_for("Q4_0", 1, 128256).dot


@pytest.mark.parametrize("fmt,dtype,scaled", [("int4", torch.float16, True), ("Q4_1", torch.float32, True),
                                              ("Q8_0", torch.float16, True), ("Q8_0", torch.bfloat16, False),
                                              ("int8", torch.float16, False)])
def test_scale_tile_applies_where_the_dot_runs_in_x_dtype(fmt: str, dtype: torch.dtype, scaled: bool,
                                                         gen: torch.Generator) -> None:
    """Scaled tiles only where w fits the dot's dtype as x's would (bf16 x over fp16 tiles keeps
    the per-group path); int8's scale is per row, applied at the end either way."""
    weight = packed(fmt, 32, 1024, gen)
    x = torch.randn(1, 1024, generator=gen).to(dtype)
    plan = gemv_triton._dot_plan(weight, x, SMALL["dot_scaled"])
    assert plan is not None and plan["SCALE_TILE"] is scaled
    assert gemv_triton._dot_plan(weight, x, SMALL["dot"])["SCALE_TILE"] is False


@pytest.mark.parametrize("fmt,group", [("int4", 32), ("int4_sym", 64), ("int4", 128), ("Q4_0", 32),
                                       ("Q4_K", 256)])
@pytest.mark.parametrize("x_scale", [1.0, 1e5], ids=["x1", "x1e5"])
def test_4bit_one_row_of_bf16_takes_packed_bf16x2_arithmetic(fmt: str, group: int, x_scale: float,
                                                            gen: torch.Generator) -> None:
    """int4, Q4_0 and Q4_K at one row of bf16 x: each word's eight products in bf16x2 (compiled:
    inline PTX; interpreter: the same products in float32), x beyond fp16's range included. On
    the GPU the products and their per-word sums round to bf16; the float32 kernel is the
    yardstick there."""
    weight = packed(fmt, 40, 512, gen, group)
    x = (torch.randn(1, 512, generator=gen) * x_scale).to(torch.bfloat16)
    cfg, plain = SMALL["fma"], gemv_triton.GemvConfig(block_n=16, block_k=128, packed=False)
    assert gemv_triton._packed_x(x, weight, cfg) is not None
    assert gemv_triton._packed_x(x, weight, plain) is None
    assert gemv_triton._packed_x(x.float(), weight, cfg) is None  # bf16 x only
    want = reference.quant_linear(x.float(), weight, None)
    dev_w, dev_x = weight.to(DEVICE), x.to(DEVICE)
    got = gemv_triton.gemv(dev_x, dev_w, config=cfg, out_dtype=torch.float32)
    fp32 = gemv_triton.gemv(dev_x, dev_w, config=plain, out_dtype=torch.float32)
    assert rel_err(fp32, want) <= RTOL[torch.float32]
    # bf16 rounds each product and each of a word's four pair sums to 8 significant bits
    assert rel_err(got, want) <= (RTOL[torch.float32] if DEVICE.type == "cpu" else 4e-3)
    tma = gemv_triton.GemvConfig(block_n=16, block_k=128, num_stages=3, tma=True)  # int4, Q4_0
    # the words two steps ahead by hand (int4, Q4_0; 4 steps whole, or split 2 + 2 + none)
    ahead2 = gemv_triton.GemvConfig(block_n=16, block_k=128, num_stages=2)
    ahead2_f16 = gemv_triton.GemvConfig(block_n=16, block_k=128, num_stages=2, f16=True)
    for config, split_k in ((cfg, 3), (tma, None), (tma, 3), (ahead2, None), (ahead2, 3), (ahead2_f16, 1)):
        out = gemv_triton.gemv(dev_x, dev_w, config=config, split_k=split_k, out_dtype=torch.float32)
        assert rel_err(out, want) <= (RTOL[torch.float32] if DEVICE.type == "cpu" else 4e-3)


def launches(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """The constexprs of every ``_gemv_kernel`` launch from now on."""
    return launch_spy(gemv_triton._gemv_kernel, monkeypatch)


@pytest.mark.parametrize("fmt,group", [("int4", 32), ("int4_sym", 64), ("int4", 128)])
@pytest.mark.parametrize("x_scale", [1.0, 1e5], ids=["x1", "x1e5"])
def test_int4_one_row_on_the_tensor_cores(fmt: str, group: int, x_scale: float, gen: torch.Generator,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """int4 at one row of bf16 x through the ``mma`` path (compiled: ``mma.sync`` in inline PTX
    on each lane's words; interpreter: the same group sums in float32, held by every lane t as
    the MMAs leave them): row tiles of 16-64 (the last partial), 1-4 warps, K whole, split
    evenly and unevenly, the zero points before the MMAs or after (``mma_xsum``), the words one
    or two steps ahead. Exact products and float32 sums on the GPU, so the float32 bound
    (scaled for the tensor cores' accumulation) rather than the bf16x2 path's 4e-3."""
    weight = packed(fmt, 40, 1024, gen, group)
    x = (torch.randn(1, 1024, generator=gen) * x_scale).to(torch.bfloat16)
    want = reference.quant_linear(x.float(), weight, None)
    dev_w, dev_x = weight.to(DEVICE), x.to(DEVICE)
    seen = launches(monkeypatch)
    for cfg, split_k in ((gemv_triton.GemvConfig(16, 128, num_warps=1, mma=True), None),
                         (gemv_triton.GemvConfig(32, 128, num_warps=2, mma=True), 3),
                         (gemv_triton.GemvConfig(64, 128, num_warps=4, mma=True), 1),
                         (gemv_triton.GemvConfig(32, 128, num_warps=1, mma=True), 5),
                         (gemv_triton.GemvConfig(64, 128, num_warps=2, mma=True, mma_xsum=True), 3),
                         (gemv_triton.GemvConfig(32, 128, num_warps=2, num_stages=2, mma=True), 3)):
        assert gemv_triton.mma_supported(dev_x, group, cfg)
        out = gemv_triton.gemv(dev_x, dev_w, config=cfg, split_k=split_k, out_dtype=torch.float32)
        assert seen[-1]["MMA"] and seen[-1]["BLOCK_K"] == group, "the GEMV did not take the MMA path"
        assert seen[-1]["MMA_XSUM"] == cfg.mma_xsum
        assert rel_err(out, want) <= (RTOL[torch.float32] if DEVICE.type == "cpu" else 1e-4), cfg
    # not taken: without the packed path, or with fewer 16-row tiles than warps (Triton would
    # spread a tile's rows over warps)
    for cfg in (gemv_triton.GemvConfig(64, 128, mma=True, packed=False), gemv_triton.GemvConfig(16, 128, mma=True)):
        out = gemv_triton.gemv(dev_x, dev_w, config=cfg, out_dtype=torch.float32)
        assert not seen[-1]["MMA"] and rel_err(out, want) <= 4e-3


@pytest.mark.parametrize("fmt,group", [("int4", 32), ("int4_sym", 64), ("int4", 128), ("Q4_0", 32)])
@pytest.mark.parametrize("x_scale", [1.0, 1e5, 1e-6], ids=["x1", "x1e5", "x1e-6"])
def test_4bit_one_row_in_fp16x2(fmt: str, group: int, x_scale: float, gen: torch.Generator,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """int4 and Q4_0 at one row of bf16 x through the ``f16`` path (compiled: fp16x2 inline PTX,
    four words of a row to one accumulator; interpreter: x converted to fp16 the same way, the
    products in float32): x far outside fp16's range either way (each program scales it by a
    power of two) and one outlier column a million times its neighbours, row tiles of 16-64
    (the last partial), K whole and split evenly and unevenly. On the GPU each product and
    each 16-product sum rounds to fp16 (11 significant bits, 8x finer than the bf16x2 path)."""
    weight = packed(fmt, 40, 1024, gen, group)
    x = torch.randn(1, 1024, generator=gen) * x_scale
    x[0, 77] *= 1e6 if x_scale < 1 else 1.0
    x = x.to(torch.bfloat16)
    want = reference.quant_linear(x.float(), weight, None)
    dev_w, dev_x = weight.to(DEVICE), x.to(DEVICE)
    seen = launches(monkeypatch)
    for cfg, split_k in ((gemv_triton.GemvConfig(16, 128, f16=True), None),
                         (gemv_triton.GemvConfig(32, 256, f16=True), 3),
                         (gemv_triton.GemvConfig(64, 128, num_warps=2, f16=True), 5),
                         (gemv_triton.GemvConfig(16, 128, f16=True), 2)):
        out = gemv_triton.gemv(dev_x, dev_w, config=cfg, split_k=split_k, out_dtype=torch.float32)
        assert seen[-1]["F16"] and seen[-1]["PACKED"], "the GEMV did not take the fp16x2 path"
        assert rel_err(out, want) <= (RTOL[torch.float32] if DEVICE.type == "cpu" else 1.5e-3), (cfg, split_k)
    # not taken: x not bf16, more rows, the float32 path
    gemv_triton.gemv(dev_x.float(), dev_w, config=gemv_triton.GemvConfig(16, 128, f16=True))
    assert not seen[-1]["F16"]
    gemv_triton.gemv(dev_x.expand(2, -1).contiguous(), dev_w, config=gemv_triton.GemvConfig(16, 128, f16=True))
    assert not seen[-1]["F16"]
    gemv_triton.gemv(dev_x, dev_w, config=gemv_triton.GemvConfig(16, 128, f16=True, packed=False))
    assert not seen[-1]["F16"]


NORM_CASES = [("int4", 1, None, "fma"), ("int4", 3, 3, "fma"), ("Q4_0", 1, 1, "fma"), ("Q8_0", 2, 3, "fma"),
              ("Q4_K", 1, None, "fma"), ("int8", 1, 2, "fma"), ("int4", 1, None, "packed"),
              ("int4", 1, 3, "packed"), ("int4", 1, 3, "mma"), ("Q4_0", 1, None, "packed"),
              ("int4", 1, 3, "f16"), ("Q4_0", 1, None, "f16")]
#: fused norm vs the norm kernel, compiled: y's rounding after a reordered float32 sum
NORM_ORDER_RTOL = {torch.float32: 1e-6, torch.float16: RTOL[torch.float16], torch.bfloat16: RTOL[torch.bfloat16]}
NORM_CONFIGS = {"fma": SMALL["fma"], "packed": SMALL["fma"], "mma": gemv_triton.GemvConfig(32, 128, num_warps=2, mma=True),
                "f16": gemv_triton.GemvConfig(block_n=16, block_k=128, f16=True)}


@pytest.mark.parametrize("fmt,m,split_k,path", NORM_CASES, ids=[f"{f}-m{m}-split{s}-{p}" for f, m, s, p in NORM_CASES])
def test_gemv_with_the_norm_after_equals_the_two_ops(fmt: str, m: int, split_k: int | None, path: str,
                                                     gen: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    """``gemv(..., norm=(residual, weight, eps))``: the GEMV and then ``rms_norm`` with the
    residual in one launch, the last row tile's program norming every row; the GEMV followed
    by the norm kernel, bit for bit in the interpreter (compiled, y within the rounding of a
    reordered sum of squares; the residual exactly), with and
    without split K, at 1-3 rows, on the FMA, packed bf16x2 and MMA paths; twice in a row (the
    counter resets itself), and a plain split-K GEMV after it still right."""
    from portaserve.devices.cuda import norm

    monkeypatch.setattr(gemv_triton, "FUSE_NORM", True)
    n, k = 72, 512  # 72 rows: a partial last tile (16 and 32 rows a tile)
    weight = packed(fmt, n, k, gen).to(DEVICE)
    one_row_bf16 = path != "fma"
    dtype = torch.bfloat16 if one_row_bf16 else (torch.float16 if fmt == "Q8_0" else torch.float32)
    out_dtype = torch.float32 if one_row_bf16 and DEVICE.type == "cpu" else None
    res_dtype = out_dtype or dtype
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    residual = torch.randn(m, n, generator=gen).to(DEVICE, res_dtype)
    nw = (1 + 0.1 * torch.randn(n, generator=gen)).to(DEVICE, res_dtype)
    cfg = NORM_CONFIGS[path]
    if path == "mma" and not gemv_triton.mma_supported(x, 128, cfg):
        pytest.skip("the MMA path does not run here")
    seen = launches(monkeypatch)
    for _ in range(2):
        fused = gemv_triton.gemv(x, weight, config=cfg, split_k=split_k, out_dtype=out_dtype,
                                 norm=(residual, nw, 1e-5))
        assert fused is not None, "the GEMV declined the norm"
        assert seen[-1]["NORM"] and seen[-1]["PACKED"] == one_row_bf16 and seen[-1]["MMA"] == (path == "mma")
        assert seen[-1]["F16"] == (path == "f16")
        out = gemv_triton.gemv(x, weight, config=cfg, split_k=split_k, out_dtype=out_dtype)
        want_y, want_res = norm.rms_norm(out, nw, 1e-5, residual)
        assert fused[0].dtype == want_y.dtype and fused[0].shape == (m, n)
        assert torch.equal(fused[1], want_res)
        if DEVICE.type == "cpu":
            assert torch.equal(fused[0], want_y)
        else:  # compiled, the row's sum of squares may add up in another order (4 warps here,
            # the norm kernel's own count there): the rounding of y may move by an ulp
            assert rel_err(fused[0], want_y) <= NORM_ORDER_RTOL[fused[0].dtype]
    want = reference.quant_linear(x.float(), weight.to("cpu") if DEVICE.type == "cpu" else weight, None)
    again = gemv_triton.gemv(x, weight, config=cfg, split_k=3, out_dtype=torch.float32)
    assert rel_err(again, want.to(again.device)) <= (RTOL[torch.float32] if not one_row_bf16 or DEVICE.type == "cpu" else 4e-3)


SILU_CASES = [("int4", 1, None, "fma"), ("int4", 2, 3, "fma"), ("Q4_0", 1, 3, "fma"), ("Q8_0", 1, None, "fma"),
              ("Q6_K", 1, 2, "fma"), ("int8", 3, None, "fma"), ("int4", 1, None, "packed"),
              ("int4", 1, 3, "packed"), ("int4", 1, 3, "mma"), ("int4", 1, None, "mma"), ("int4", 1, 3, "f16")]


@pytest.mark.parametrize("fmt,m,split_k,path", SILU_CASES, ids=[f"{f}-m{m}-split{s}-{p}" for f, m, s, p in SILU_CASES])
def test_gemv_with_silu_and_mul_equals_the_two_ops(fmt: str, m: int, split_k: int | None, path: str,
                                                   gen: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    """``gemv(..., silu_and_mul=True)`` over a gate|up weight: each tile takes half its rows
    from the gate half and the same rows of the up half, and stores ``silu(gate) * up``; bit
    for bit the GEMV followed by the silu kernel, with and without split K, on the FMA,
    packed and MMA paths, with a partial last tile (I = 40)."""
    from portaserve.devices.cuda.activation import silu_and_mul

    monkeypatch.setattr(gemv_triton, "FUSE_SILU", True)
    inter, k = 40, 512
    weight = packed(fmt, 2 * inter, k, gen).to(DEVICE)
    one_row_bf16 = path != "fma"
    dtype = torch.bfloat16 if one_row_bf16 else (torch.float16 if fmt == "Q8_0" else torch.float32)
    out_dtype = torch.float32 if one_row_bf16 and DEVICE.type == "cpu" else None
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    cfg = NORM_CONFIGS[path]
    seen = launches(monkeypatch)
    fused = gemv_triton.gemv(x, weight, config=cfg, split_k=split_k, out_dtype=out_dtype, silu_and_mul=True)
    assert fused is not None, "the GEMV declined silu_and_mul"
    assert seen[-1]["ACT"] and seen[-1]["MMA"] == (path == "mma") and seen[-1]["PACKED"] == one_row_bf16
    assert seen[-1]["F16"] == (path == "f16")
    out = gemv_triton.gemv(x, weight, config=cfg, split_k=split_k, out_dtype=out_dtype)
    want = silu_and_mul(out)
    assert fused.shape == (m, inter) and fused.dtype == want.dtype
    assert torch.equal(fused, want)
    assert rel_err(fused.float(), reference.silu_and_mul(out.float())) <= RTOL[fused.dtype]
    # declined: the flag off, the tensor-core tiles, MMA halves of 8 rows
    monkeypatch.setattr(gemv_triton, "FUSE_SILU", False)
    assert gemv_triton.gemv(x, weight, config=cfg, silu_and_mul=True) is None
    monkeypatch.setattr(gemv_triton, "FUSE_SILU", True)
    if fmt in gemv_triton.DOT_FORMATS:
        assert gemv_triton.gemv(x, weight, config=SMALL["dot"], silu_and_mul=True) is None
    if path == "mma":
        small = gemv_triton.GemvConfig(16, 128, num_warps=1, mma=True)
        assert gemv_triton.gemv(x, weight, config=small, silu_and_mul=True) is None


def test_gemv_declines_a_norm_it_does_not_fuse(gen: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    """``gemv(..., norm=)`` answers None (the caller runs the two ops) while ``FUSE_NORM`` is
    off, for the tensor-core kernel's tiles, rows wider than one norm tile, and a residual of
    another shape or dtype."""
    weight = packed("int4", 48, 256, gen).to(DEVICE)
    x = torch.randn(1, 256, generator=gen).to(DEVICE)
    residual, nw = torch.randn(1, 48).to(DEVICE), torch.ones(48).to(DEVICE)
    monkeypatch.setattr(gemv_triton, "FUSE_NORM", False)
    assert gemv_triton.gemv(x, weight, config=SMALL["fma"], norm=(residual, nw, 1e-5)) is None
    monkeypatch.setattr(gemv_triton, "FUSE_NORM", True)
    assert gemv_triton.gemv(x, weight, config=SMALL["fma"], norm=(residual, nw, 1e-5)) is not None
    assert gemv_triton.gemv(x, weight, config=SMALL["dot"], norm=(residual, nw, 1e-5)) is None
    assert gemv_triton.gemv(x, weight, config=SMALL["fma"], norm=(residual[:, :40], nw, 1e-5)) is None
    assert gemv_triton.gemv(x, weight, config=SMALL["fma"], norm=(residual.half(), nw, 1e-5)) is None
    assert gemv_triton.gemv(x, weight, config=SMALL["fma"], norm=(residual, nw[:40], 1e-5)) is None
    monkeypatch.setattr(gemv_triton, "_NORM_MAX_N", 32)
    assert gemv_triton.gemv(x, weight, config=SMALL["fma"], norm=(residual, nw, 1e-5)) is None


def test_int4_mma_path_checks_the_compiled_kernel_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU the MMA path runs only where a first GEMV through it matched the dequantized
    weight (it relies on the lane layout Triton picks); a wrong answer keeps the FMA path."""
    calls = []
    monkeypatch.setattr(gemv_triton, "_MMA_CHECKED", {})
    monkeypatch.setattr(gemv_triton, "packed_supported", lambda x: True)
    monkeypatch.setattr(gemv_triton, "_mma_matches", lambda dev, group, cfg: calls.append(group) or group == 64)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    on_gpu = types.SimpleNamespace(device=torch.device("cuda", 0))
    cfg = gemv_triton.GemvConfig(64, 128, mma=True)
    assert gemv_triton.mma_supported(on_gpu, 64, cfg) and gemv_triton.mma_supported(on_gpu, 64, cfg)
    assert not gemv_triton.mma_supported(on_gpu, 128, cfg)
    assert calls == [64, 128]  # once per (GPU, group, tiles)
    assert gemv_triton.mma_supported(torch.zeros(1), 128, cfg)  # CPU: the interpreter


@pytest.mark.parametrize("fmt", sorted(gemv_triton.PACKED_FORMATS))
def test_one_row_tiles_follow_whether_the_packed_path_runs(fmt: str, gen: torch.Generator) -> None:
    """bf16 x takes the packed path's tuned tiles; other dtypes keep the float32 path's."""
    weight = packed(fmt, 32, 1024, gen)
    bf16 = gemv_triton.tuned_config(weight, torch.randn(1, 1024, generator=gen).to(torch.bfloat16))
    fp16 = gemv_triton.tuned_config(weight, torch.randn(1, 1024, generator=gen).to(torch.float16))
    assert bf16 == gemv_triton.config_for(fmt, 1, 32) and bf16.packed
    assert fp16 == gemv_triton.UNPACKED_ONE_ROW[fmt]
    two = torch.randn(2, 1024, generator=gen).to(torch.bfloat16)  # more rows: unchanged
    assert gemv_triton.tuned_config(weight, two) == gemv_triton.config_for(fmt, 2, 32)


def test_packed_path_needs_an_nvidia_gpu_of_compute_capability_8(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its inline PTX (bf16x2 FMA) compiles for NVIDIA sm_80+ only: not on ROCm (the same
    Triton kernels serve the rocm device), not on older NVIDIA GPUs."""
    from types import SimpleNamespace

    on_gpu = SimpleNamespace(device=torch.device("cuda", 0))
    forget = gemv_triton._has_bf16x2_fma.cache_clear  # (the answer is cached per GPU)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    forget()
    assert gemv_triton.packed_supported(on_gpu)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    forget()
    assert not gemv_triton.packed_supported(on_gpu)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 4))
    monkeypatch.setattr(torch.version, "hip", "6.2")
    forget()
    assert not gemv_triton.packed_supported(on_gpu)
    forget()  # (the real GPU's answer next time)
    assert gemv_triton.packed_supported(torch.zeros(1))  # CPU: the interpreter's stand-in


@pytest.mark.parametrize("late", [False, True])
def test_gemv_launch_options_under_pdl(monkeypatch: pytest.MonkeyPatch, late: bool) -> None:
    """Where PDL is on (``GEMV_PDL``, ``launch.pdl``: compiled, sm_90+) the GEMVs launch with it;
    triggering at their start (``PDL_LATE`` off) each program prefetches lines of its rows, but
    formats whose rows are not in K order (the K formats) prefetch nothing; triggering late, no
    program prefetches into L2 (its first words go to registers); the interpreter never takes it."""
    monkeypatch.setattr(gemv_triton, "PDL_LATE", late)
    words = torch.zeros(4, 8, dtype=torch.int32)
    assert gemv_triton._pdl(torch.zeros(1), words) == {"PDL": False, "PREFETCH_LINES": 0, "Q_BYTES": 4,
                                                       "PDL_LATE": 3 if late else 0}
    monkeypatch.setattr(gemv_triton, "pdl_options", lambda x: ({"PDL": True}, {"launch_pdl": True}))
    monkeypatch.setattr(gemv_triton, "GEMV_PDL", False)  # (off: plain launches)
    assert gemv_triton._pdl(torch.zeros(1), words)["PDL"] is False
    monkeypatch.setattr(gemv_triton, "GEMV_PDL", True)
    assert gemv_triton._pdl(torch.zeros(1), words.view(torch.uint8)) == {
        "PDL": True, "launch_pdl": True, "PREFETCH_LINES": 0 if late else gemv_triton.PDL_PREFETCH_LINES,
        "Q_BYTES": 1, "PDL_LATE": 3 if late else 0}
    assert gemv_triton._pdl(torch.zeros(1), words, prefetch=False)["PREFETCH_LINES"] == 0


PDL_CASES = [("int4", 1, None), ("int4", 1, gemv_triton.GemvConfig(128, 128, mma=True)), ("int4", 3, None),
             ("Q4_0", 1, None), ("Q4_K", 1, None), ("int8", 2, None)]


@pytest.mark.skipif(DEVICE.type != "cuda", reason="programmatic dependent launch needs a GPU")
@pytest.mark.parametrize("late", [False, True], ids=["trigger_first", "trigger_late"])
@pytest.mark.parametrize("n", [1024, 8192], ids=["split_k", "wide"])
@pytest.mark.parametrize("fmt,m,cfg", PDL_CASES, ids=[f"{f}-m{m}{'-mma' if c else ''}" for f, m, c in PDL_CASES])
def test_gemv_under_pdl_gives_the_same_sums(fmt: str, m: int, cfg, n: int, late: bool, gen: torch.Generator,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A norm, the GEMV on its output, a second GEMV on the first's output (back to back, the
    split-K counters shared) and a norm of that, each launched with programmatic dependent
    launch (each GEMV prefetching its rows, or loading its first words (``PDL_LATE``), while
    the kernel before runs, then waiting for it), give the very same numbers as plain
    launches, op by op and replayed from a CUDA graph."""
    from portaserve.devices.cuda import launch, norm

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs compute capability 9.0+")
    monkeypatch.setattr(gemv_triton, "GEMV_PDL", True)
    monkeypatch.setattr(gemv_triton, "PDL_LATE", late)
    weight = packed(fmt, n, 2048, gen).to(DEVICE)
    weight2 = packed(fmt, 2048, n, gen).to(DEVICE)
    h = torch.randn(m, 2048, generator=gen).to(DEVICE, torch.bfloat16)
    w_in = (1 + 0.1 * torch.randn(2048, generator=gen)).to(DEVICE, torch.bfloat16)
    w_out = (1 + 0.1 * torch.randn(2048, generator=gen)).to(DEVICE, torch.bfloat16)
    seen = launches(monkeypatch)

    def chain() -> torch.Tensor:
        out = gemv_triton.gemv(norm.rms_norm(h, w_in, 1e-5), weight, config=cfg)
        assert out is not None
        out = gemv_triton.gemv(out, weight2, config=cfg)
        assert out is not None
        return norm.rms_norm(out, w_out, 1e-5)

    results = {}
    for on in (False, True):
        monkeypatch.setenv("PORTASERVE_CUDA_PDL", "1" if on else "0")
        monkeypatch.setattr(launch, "_PDL", {})
        eager = chain()  # (also compiles, and allocates the split counters, before the capture)
        assert all(k["PDL"] is on for k in seen[-1:]) or not seen
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = chain()
        graph.replay()
        torch.cuda.synchronize()
        results[on] = (eager.clone(), captured.clone())
    assert torch.equal(results[True][0], results[False][0])
    assert torch.equal(results[True][1], results[False][0]) and torch.equal(results[False][1], results[False][0])


ROTARY_CASES = [("int4", 1, None, "packed"), ("int4", 2, 3, "fma"), ("int4", 1, 3, "f16"), ("Q4_0", 1, 2, "packed"),
                ("Q8_0", 3, None, "fma"), ("Q4_K", 1, 3, "fma")]


@pytest.mark.parametrize("fmt,m,split_k,path", ROTARY_CASES, ids=[f"{f}-m{m}-split{s}-{p}" for f, m, s, p in ROTARY_CASES])
def test_gemv_with_rotary_write_kv_equals_the_two_ops(fmt: str, m: int, split_k: int | None, path: str,
                                                      gen: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    """``gemv(..., rotary=...)`` over a q|k|v weight (4 query heads, 2 KV heads of 64 dims):
    each tile takes dims of a head's first half and the same of its second, and the completing
    program rotates them, stores q and writes k and v to the paged cache; bit for bit the GEMV
    followed by the ``rotary_write_kv`` kernel in the interpreter (q and the whole cache; a
    padding slot skipped), with and without split K, at 1-3 rows, on the FMA, packed and fp16x2
    paths, with a bias, into a 16-bit and an fp8 cache; declined for tiles that split a head's
    half unevenly, the tensor-core and MMA tiles, and an int8 cache."""
    from portaserve.devices.cuda import kv, rotary

    monkeypatch.setattr(gemv_triton, "FUSE_ROTARY", True)
    hq, hk, d, k, block_size = 4, 2, 64, 512, 16
    weight = packed(fmt, (hq + 2 * hk) * d, k, gen).to(DEVICE)
    one_row_bf16 = path != "fma"
    dtype = torch.bfloat16 if one_row_bf16 else (torch.float16 if fmt == "Q8_0" else torch.float32)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    bias = (0.1 * torch.randn(weight.shape[0], generator=gen)).to(DEVICE, dtype)
    angles = torch.outer(torch.arange(64).float(), 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d))
    cos_sin = torch.cat((angles.cos(), angles.sin()), dim=-1).to(DEVICE, dtype)
    positions = torch.randint(0, 64, (m,), generator=gen).to(DEVICE)
    slots = torch.randperm(4 * block_size, generator=gen)[:m].to(DEVICE)
    if m > 1:
        slots[1] = -1  # a padding row
    cache = torch.randn(2, 4, hk, block_size, d, generator=gen).to(DEVICE, dtype)
    want_cache = cache.clone()
    cfg = {"f16": gemv_triton.GemvConfig(block_n=16, block_k=128, f16=True)}.get(path, SMALL["fma"])
    seen = launches(monkeypatch)
    q = gemv_triton.gemv(x, weight, bias, config=cfg, split_k=split_k,
                         rotary=(positions, cos_sin, cache, slots, hq, kv.KV_LAYOUT))
    assert q is not None, "the GEMV declined the rotary"
    assert seen[-1]["ROPE"] and seen[-1]["PACKED"] == one_row_bf16 and seen[-1]["F16"] == (path == "f16")
    out = gemv_triton.gemv(x, weight, bias, config=cfg, split_k=split_k)
    want_q = rotary.rotary_write_kv(positions, out[:, :hq * d].view(m, hq, d), out[:, hq * d:(hq + hk) * d].view(m, hk, d),
                                    out[:, (hq + hk) * d:].view(m, hk, d), cos_sin, want_cache, slots)
    assert q.shape == (m, hq * d) and q.dtype == dtype
    if DEVICE.type == "cpu":
        assert torch.equal(q.view(m, hq, d), want_q) and torch.equal(cache, want_cache)
    else:  # compiled, the two kernels may contract the rotation's products into FMAs apart
        assert rel_err(q.view(m, hq, d), want_q) <= RTOL[dtype] and rel_err(cache, want_cache) <= RTOL[dtype]
    # an fp8 cache: the bytes rotary_write_kv (write_kv's encoder) stores
    fp8_cache = torch.randint(0, 120, cache.shape, generator=gen, dtype=torch.uint8).to(DEVICE).view(torch.float8_e4m3fn)
    want_fp8 = fp8_cache.clone()
    q8 = gemv_triton.gemv(x, weight, bias, config=cfg, split_k=split_k,
                          rotary=(positions, cos_sin, fp8_cache, slots, hq, kv.KV_LAYOUT))
    assert q8 is not None, "the GEMV declined the rotary into an fp8 cache"
    rotary.rotary_write_kv(positions, out[:, :hq * d].view(m, hq, d), out[:, hq * d:(hq + hk) * d].view(m, hk, d),
                           out[:, (hq + hk) * d:].view(m, hk, d), cos_sin, want_fp8, slots)
    if DEVICE.type == "cpu":
        assert torch.equal(q8, q) and torch.equal(fp8_cache.view(torch.uint8), want_fp8.view(torch.uint8))
    else:  # (a rounding apart moves an fp8 code by one step)
        assert rel_err(fp8_cache.float(), want_fp8.float()) <= 1e-2
    # declined: tiles of 256 rows (half of 128 > 32 dims), the tensor-core tiles, an 8-bit cache
    # that is not fp8
    args = (positions, cos_sin, cache, slots, hq, kv.KV_LAYOUT)
    assert gemv_triton.gemv(x, weight, config=gemv_triton.GemvConfig(256, 128), rotary=args) is None
    if fmt in gemv_triton.DOT_FORMATS:
        assert gemv_triton.gemv(x, weight, config=SMALL["dot"], rotary=args) is None
    int8_cache = torch.zeros(cache.shape, dtype=torch.int8, device=DEVICE)
    assert gemv_triton.gemv(x, weight, config=cfg, rotary=(positions, cos_sin, int8_cache, slots, hq, kv.KV_LAYOUT)) is None
    monkeypatch.setattr(gemv_triton, "FUSE_ROTARY", False)
    assert gemv_triton.gemv(x, weight, config=cfg, rotary=args) is None
