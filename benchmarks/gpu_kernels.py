"""Benchmark of the cuda device's Triton kernels on a GPU, against torch, and one decode step.

Run from the repository root on a machine with an NVIDIA GPU (about 2-3 minutes on an H200):

    PYTHONPATH=. python3 benchmarks/gpu_kernels.py [--skip-model] [--tune] [--json PATH]
    PYTHONPATH=. python3 benchmarks/gpu_kernels.py --dry-run     # tiny shapes, CPU interpreter

What it prints (a table at the end; logs go to stdout):

1. the measured device-to-device copy bandwidth (read + write bytes / time), the ceiling every
   memory-bound row is compared with (an H200 measured about 4.26-4.3 TB/s here);
2. per kernel on Llama-3-8B shapes (hidden 4096, 32 q / 8 KV heads, head dim 128, MLP 14336,
   bf16, KV block 16): median time of the Triton kernel and of its torch counterpart
   (``devices/reference.py`` eager, and torch SDPA on contiguous KV for attention), the bytes
   each must move at least, achieved GB/s and % of the copy bandwidth; prefill attention also in
   TFLOP/s. Every row is also checked against the reference (relative error column);
3. unless ``--skip-model``: one decode step of a Llama-3-8B-shaped model with random bf16
   weights (32 layers), op by op vs replayed from a CUDA graph, at batch 1/16/64 with 1024
   tokens of context each: ms/step and the weight bytes read per step over that time;
4. with ``--tune``: prefill and decode attention under alternative tile configs
   (``attention.VARLEN_CONFIG`` / ``DECODE_CONFIG``) and decode split counts (about a minute).

Timing: CUDA events around each call, warm-up first, median of many calls; inputs rotate over
several buffers when one set would fit in the L2 cache. Random inputs, never zeros.
"""

# ruff: noqa: B023  (the timed lambdas run inside the loop iteration that defines them)
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from portaserve.core.batch import build_batch
from portaserve.devices import reference as ref
from portaserve.devices.cuda import activation, attention, kv, norm, rotary
from portaserve.plugins.device import KVCacheSpec
from portaserve.quant.fp8 import quantize_per_token

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB, LAYERS = 4096, 32, 8, 128, 14336, 128256, 32
DTYPE = torch.bfloat16
BLOCK = 16
DEV = "cuda"
#: Sizes of each section (scaled down by --dry-run).
TOKENS = 8192
DECODE_CASES = ((1, 8192), (1, 32768), (32, 2048), (128, 1024), (256, 1024), (512, 1536))
PREFILL_CASES = (([(0, 2048)] * 4, "4 x 2048 new"), ([(6144, 2048)], "2048 new over 6144 cached"))
MODEL_BATCHES, MODEL_CTX, MODEL_MAX_POS = (1, 16, 64), 1024, 8192
#: Batch-1 decode contexts whose split counts ``--sections tune`` times (1, 2, 4, 8 splits).
SHORT_DECODE_CTX = (144, 1024)


def dry_run_sizes() -> None:
    """Tiny shapes on CPU tensors (Triton interpreter, float32): checks the script, not speed."""
    global HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB, LAYERS, DTYPE, DEV, TOKENS
    global DECODE_CASES, PREFILL_CASES, PREFILL_FP8_CASE, TUNE_FP8_CASES, MODEL_BATCHES, MODEL_CTX, MODEL_MAX_POS, OVERLAP_CASES, SHORT_DECODE_CTX
    HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB, LAYERS = 64, 4, 2, 32, 96, 256, 2
    DTYPE, DEV, TOKENS = torch.float32, "cpu", 16
    DECODE_CASES = ((1, 40), (3, 20))
    PREFILL_CASES = (([(0, 20)] * 2, "2 x 20 new"), ([(30, 10)], "10 new over 30 cached"))
    PREFILL_FP8_CASE = ([(0, 20)] * 2, "2 x 20 new")
    TUNE_FP8_CASES = ((3, 20),)
    MODEL_BATCHES, MODEL_CTX, MODEL_MAX_POS = (1, 3), 20, 64
    OVERLAP_CASES = ((4, 40),)
    SHORT_DECODE_CTX = (20,)


class _HostEvent:
    """torch.cuda.Event's timing subset on the host clock (dry runs)."""

    def __init__(self, enable_timing: bool = True) -> None:
        self.t = 0.0

    def record(self) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: _HostEvent) -> float:
        return (end.t - self.t) * 1e3


def _event() -> object:
    return torch.cuda.Event(enable_timing=True) if DEV == "cuda" else _HostEvent()


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def _num_sms() -> int:
    return torch.cuda.get_device_properties(0).multi_processor_count if DEV == "cuda" else 4


@dataclass
class Row:
    name: str
    impl: str
    ms: float
    bytes: float
    flops: float = 0.0
    rel_err: float | None = None

    def gbps(self) -> float:
        return self.bytes / (self.ms * 1e-3) / 1e9

    def tflops(self) -> float:
        return self.flops / (self.ms * 1e-3) / 1e12


def bench(fn: Callable[[int], object], *, warmup: int = 5, iters: int = 50, budget_s: float = 2.0) -> float:
    """Median milliseconds of ``fn(i)`` (i cycles the input sets), timed with CUDA events."""
    for i in range(warmup):
        fn(i)
    _sync()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    for i in range(iters):
        start, end = _event(), _event()
        start.record()
        fn(i)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        if time.perf_counter() > deadline and len(times) >= 5:
            break
    return statistics.median(times)


def rel_err(out: torch.Tensor, expected: torch.Tensor) -> float:
    out, expected = out.double(), expected.double()
    return ((out - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy (bytes read + bytes written)."""
    src = torch.randn(1 << 29 if DEV == "cuda" else 1 << 20, dtype=torch.bfloat16, device=DEV)  # 1 GiB
    dst = torch.empty_like(src)
    ms = bench(lambda i: dst.copy_(src), iters=30)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def matmul_rate() -> float:
    """FLOP/s of a bf16 8192^3 matrix product on random data (the arithmetic ceiling)."""
    n = 8192 if DEV == "cuda" else 256
    a, b = (torch.randn(n, n, dtype=torch.bfloat16, device=DEV) for _ in range(2))
    ms = bench(lambda i: a @ b, iters=20)
    return 2.0 * n**3 / (ms * 1e-3)


def sets(n: int, make: Callable[[], object]) -> list:
    return [make() for _ in range(n)]


def elementwise_rows() -> list[Row]:
    rows: list[Row] = []
    tokens = TOKENS
    e = torch.empty((), dtype=DTYPE).element_size()

    xs = sets(3, lambda: (torch.randn(tokens, HIDDEN, dtype=DTYPE, device=DEV),
                          torch.randn(tokens, HIDDEN, dtype=DTYPE, device=DEV)))
    w = 1 + 0.1 * torch.randn(HIDDEN, dtype=DTYPE, device=DEV)
    nbytes = 4 * tokens * HIDDEN * e + HIDDEN * e
    got, want = norm.rms_norm(xs[0][0], w, 1e-5, xs[0][1]), ref.rms_norm(xs[0][0], w, 1e-5, xs[0][1])
    err = max(rel_err(got[0], want[0]), rel_err(got[1], want[1]))
    name = f"rms_norm+residual T={tokens} H={HIDDEN}"
    rows.append(Row(name, "triton", bench(lambda i: norm.rms_norm(xs[i % 3][0], w, 1e-5, xs[i % 3][1])), nbytes, rel_err=err))
    rows.append(Row(name, "torch reference", bench(lambda i: ref.rms_norm(xs[i % 3][0], w, 1e-5, xs[i % 3][1])), nbytes))

    width = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    qkvs = sets(3, lambda: torch.randn(tokens, width, dtype=DTYPE, device=DEV))
    inv_freq = 1.0 / (500000 ** (torch.arange(0, HEAD_DIM, 2, device=DEV).float() / HEAD_DIM))
    angles = torch.outer(torch.arange(MODEL_MAX_POS, device=DEV).float(), inv_freq)
    cos_sin = torch.cat((angles.cos(), angles.sin()), -1).to(DTYPE)
    pos = torch.randint(0, MODEL_MAX_POS, (tokens,), device=DEV)

    def qk(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = qkvs[i % 3]
        return (t[:, : HEADS * HEAD_DIM].view(tokens, HEADS, HEAD_DIM),
                t[:, HEADS * HEAD_DIM : (HEADS + KV_HEADS) * HEAD_DIM].view(tokens, KV_HEADS, HEAD_DIM))

    nbytes = 2 * tokens * (HEADS + KV_HEADS) * HEAD_DIM * e + tokens * HEAD_DIM * e
    got, want = rotary.rotary(pos, *qk(0), cos_sin), ref.rotary(pos, *qk(0), cos_sin)
    err = max(rel_err(got[0], want[0]), rel_err(got[1], want[1]))
    name = f"rotary T={tokens} Hq={HEADS} Hk={KV_HEADS} D={HEAD_DIM}"
    rows.append(Row(name, "triton", bench(lambda i: rotary.rotary(pos, *qk(i), cos_sin)), nbytes, rel_err=err))
    rows.append(Row(name, "torch reference", bench(lambda i: ref.rotary(pos, *qk(i), cos_sin)), nbytes))

    gus = sets(2, lambda: torch.randn(tokens, 2 * INTER, dtype=DTYPE, device=DEV))
    nbytes = 3 * tokens * INTER * e
    err = rel_err(activation.silu_and_mul(gus[0]), ref.silu_and_mul(gus[0]))
    name = f"silu_and_mul T={tokens} I={INTER}"
    rows.append(Row(name, "triton", bench(lambda i: activation.silu_and_mul(gus[i % 2])), nbytes, rel_err=err))
    rows.append(Row(name, "torch F.silu*up", bench(lambda i: F.silu(gus[i % 2][:, :INTER]) * gus[i % 2][:, INTER:]), nbytes))
    # Fused with the per-token fp8 quantization of W8A8 (the down projection's input): a prompt
    # chunk's rows and a decode batch's, the row held in registers (one read) or two passes.
    for t in (tokens, min(tokens, 512)):
        nbytes = 2 * t * INTER * e + t * INTER + 4 * t
        want_q = quantize_per_token(ref.silu_and_mul(gus[0][:t]))  # rel err: against its dequantized values
        want = want_q.data.float() * want_q.scale
        for label, widest in (("triton, one pass", activation.ONE_PASS_MAX_INTER), ("triton, two passes", 0)):
            saved, activation.ONE_PASS_MAX_INTER = activation.ONE_PASS_MAX_INTER, widest
            try:
                qa = activation.silu_and_mul_fp8(gus[0][:t])
                err = rel_err(qa.data.float() * qa.scale, want)
                ms = bench(lambda i: activation.silu_and_mul_fp8(gus[i % 2][:t]))
            finally:
                activation.ONE_PASS_MAX_INTER = saved
            rows.append(Row(f"silu_and_mul_fp8 T={t} I={INTER}", label, ms, nbytes, rel_err=err))

    num_blocks = 4 * tokens // BLOCK
    cache = torch.randn(2, num_blocks, KV_HEADS, BLOCK, HEAD_DIM, dtype=DTYPE, device=DEV)
    kvs = sets(3, lambda: (torch.randn(tokens, KV_HEADS, HEAD_DIM, dtype=DTYPE, device=DEV),
                           torch.randn(tokens, KV_HEADS, HEAD_DIM, dtype=DTYPE, device=DEV)))
    slots = torch.randperm(num_blocks * BLOCK, device=DEV)[:tokens]
    nbytes = 4 * tokens * KV_HEADS * HEAD_DIM * e
    kv.write_kv(*kvs[0], cache, slots)
    expected = cache.clone()
    ref.write_kv(*kvs[0], expected, slots, kv_layout="blocks_hnd")
    err = rel_err(cache, expected)
    name = f"write_kv T={tokens} Hk={KV_HEADS} D={HEAD_DIM}"
    rows.append(Row(name, "triton", bench(lambda i: kv.write_kv(*kvs[i % 3], cache, slots)), nbytes, rel_err=err))
    rows.append(Row(name, "torch reference", bench(lambda i: ref.write_kv(*kvs[i % 3], cache, slots, kv_layout="blocks_hnd")), nbytes))
    return rows


def paged_setup(lens: list[tuple[int, int]], gen_seed: int = 0):
    """Random cache + metadata for requests (cached, new); blocks shuffled over the pool."""
    g = torch.Generator().manual_seed(gen_seed)
    need = sum(-(-(c + q) // BLOCK) for c, q in lens)
    pool = torch.randperm(need + 8, generator=g).tolist()
    items = []
    for i, (c, q) in enumerate(lens):
        blocks = [pool.pop() for _ in range(-(-(c + q) // BLOCK))]
        items.append((f"r{i}", [1] * q, c, blocks, True))
    batch = build_batch(items, BLOCK)
    cache = torch.randn(2, need + 8, KV_HEADS, BLOCK, HEAD_DIM, dtype=DTYPE, device=DEV)
    attn = batch.attention_metadata(torch.device(DEV))
    query = torch.randn(batch.num_tokens, HEADS, HEAD_DIM, dtype=DTYPE, device=DEV)
    return query, cache, attn, batch


def prefill_work(lens: list[tuple[int, int]], kv_elem: int, q_elem: int) -> tuple[float, int]:
    """FLOPs and bytes of a prompt attention over requests (cached, new): q k^T and p v over the
    keys each query sees (causal); K and V read once (``kv_elem`` bytes a value), q read and the
    output written (``q_elem``)."""
    flops = 4.0 * HEADS * HEAD_DIM * sum(q * c + q * (q + 1) // 2 for c, q in lens)
    nbytes = sum(2 * (c + q) * KV_HEADS * HEAD_DIM * kv_elem + 2 * q * HEADS * HEAD_DIM * q_elem for c, q in lens)
    return flops, nbytes


def attention_rows() -> list[Row]:
    rows: list[Row] = []
    e = torch.empty((), dtype=DTYPE).element_size()
    scale = HEAD_DIM**-0.5
    for num_reqs, ctx in DECODE_CASES:
        nbytes = 2 * num_reqs * ctx * KV_HEADS * HEAD_DIM * e
        # Several caches in rotation so that small ones are not served from the L2 cache.
        setups = [paged_setup([(ctx - 1, 1)] * num_reqs, seed) for seed in range(min(8, 1 + (256 << 20) // nbytes))]
        query, cache, attn, _ = setups[0]
        want = ref.paged_attention(query, cache, attn, scale, kv_layout="blocks_hnd")
        err = rel_err(attention.paged_attention(query, cache, attn, scale), want)
        name = f"decode attention B={num_reqs} ctx={ctx}"
        splits = attention.decode_num_splits(num_reqs, KV_HEADS, ctx, _num_sms())
        n = len(setups)
        rows.append(Row(name, f"triton (splits={splits})", bench(lambda i: attention.paged_attention(*setups[i % n][:3], scale)), nbytes, rel_err=err))
        if DEV != "cpu" and num_reqs >= 32:  # the same step over an fp8 (e4m3) cache: half the bytes
            fp8 = [(q_, c_.to(torch.float8_e4m3fn), a_) for q_, c_, a_, _ in setups]
            want8 = ref.paged_attention(fp8[0][0], fp8[0][1], fp8[0][2], scale, kv_layout="blocks_hnd")
            err8 = rel_err(attention.paged_attention(*fp8[0], scale), want8)
            rows.append(Row(name, "triton, fp8 e4m3 cache", bench(lambda i: attention.paged_attention(*fp8[i % n], scale)), nbytes // 2, rel_err=err8))
            del fp8
        if num_reqs * ctx <= 64 * 1024:
            rows.append(Row(name, "torch reference", bench(lambda i: ref.paged_attention(query, cache, attn, scale, kv_layout="blocks_hnd"), iters=5), nbytes))
        k = torch.randn(num_reqs, KV_HEADS, ctx, HEAD_DIM, dtype=DTYPE, device=DEV)
        v = torch.randn_like(k)
        q = query.view(num_reqs, HEADS, 1, HEAD_DIM)
        rows.append(Row(name, "torch SDPA contiguous KV", bench(lambda i: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)), nbytes))
        del k, v

    for lens, label in PREFILL_CASES:
        query, cache, attn, _ = paged_setup(lens)
        flops, nbytes = prefill_work(lens, e, e)
        want = ref.paged_attention(query, cache, attn, scale, kv_layout="blocks_hnd")
        err = rel_err(attention.paged_attention(query, cache, attn, scale), want)
        name = f"prefill attention {label}"
        rows.append(Row(name, "triton", bench(lambda i: attention.paged_attention(query, cache, attn, scale)), nbytes, flops, err))
        if lens[0][0] == 0:
            q = query.view(len(lens), -1, HEADS, HEAD_DIM).transpose(1, 2)
            k = torch.randn(len(lens), KV_HEADS, lens[0][1], HEAD_DIM, dtype=DTYPE, device=DEV)
            v = torch.randn_like(k)
            rows.append(Row(name, "torch SDPA causal contiguous", bench(lambda i: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)), nbytes, flops))
    return rows


def model_rows() -> list[Row]:
    """One decode step of a Llama-3-8B-shaped model with random bf16 weights."""
    batch_sizes, ctx = MODEL_BATCHES, MODEL_CTX
    from portaserve.core.config import ModelConfig
    from portaserve.core.models.llama import LlamaForCausalLM
    from portaserve.devices.cuda.graphs import GraphExecutor
    from portaserve.plugins.manager import get_registry

    registry = get_registry()
    device, _ = registry.select_device("cuda" if DEV == "cuda" else "triton-interpret")
    config = ModelConfig(architecture="llama", vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                         num_layers=LAYERS, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                         rope_theta=500000.0, max_position_embeddings=MODEL_MAX_POS)

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=DTYPE, device=DEV) * shape[-1] ** -0.5

    weights = {"model.embed_tokens.weight": w(VOCAB, HIDDEN), "model.norm.weight": 1 + 0.1 * w(HIDDEN),
               "lm_head.weight": w(VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        weights |= {f"{p}.input_layernorm.weight": 1 + 0.1 * w(HIDDEN),
                    f"{p}.post_attention_layernorm.weight": 1 + 0.1 * w(HIDDEN),
                    f"{p}.self_attn.q_proj.weight": w(HEADS * HEAD_DIM, HIDDEN),
                    f"{p}.self_attn.k_proj.weight": w(KV_HEADS * HEAD_DIM, HIDDEN),
                    f"{p}.self_attn.v_proj.weight": w(KV_HEADS * HEAD_DIM, HIDDEN),
                    f"{p}.self_attn.o_proj.weight": w(HIDDEN, HEADS * HEAD_DIM),
                    f"{p}.mlp.gate_proj.weight": w(INTER, HIDDEN), f"{p}.mlp.up_proj.weight": w(INTER, HIDDEN),
                    f"{p}.mlp.down_proj.weight": w(HIDDEN, INTER)}
    weight_bytes = sum(t.numel() * t.element_size() for n, t in weights.items() if n != "model.embed_tokens.weight")
    model = LlamaForCausalLM(config, weights, registry.kernel_table(device), dtype=DTYPE, device=device.torch_device)
    del weights
    if DEV == "cuda":
        torch.cuda.empty_cache()
    max_batch = max(batch_sizes)
    blocks_per_seq = -(-(ctx + 64) // BLOCK)
    spec = KVCacheSpec(LAYERS, max_batch * blocks_per_seq, BLOCK, KV_HEADS, HEAD_DIM, DTYPE)
    caches = device.allocate_kv_cache(spec)
    for c in caches:
        c.normal_()
    executor = GraphExecutor(model, caches, device.torch_device, max_batch=max_batch,
                             max_blocks_per_seq=config.max_position_embeddings // BLOCK, block_size=BLOCK,
                             eager_replay=DEV != "cuda")
    start = time.perf_counter()
    executor.capture()
    print(f"captured decode graphs for sizes {executor.sizes} in {time.perf_counter() - start:.1f} s", flush=True)
    rows = []
    for b in batch_sizes:
        items = [(f"r{i}", [7], ctx, list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)), True)
                 for i in range(b)]
        batch = build_batch(items, BLOCK)
        kv_bytes = 2 * LAYERS * b * (ctx + 1) * KV_HEADS * HEAD_DIM * 2
        nbytes = weight_bytes + kv_bytes
        eager_logits = executor._execute_eager(batch)
        graph_logits = executor.execute(batch)
        err = rel_err(graph_logits, eager_logits)
        name = f"decode step 8B-shape B={b} ctx={ctx}"
        rows.append(Row(name, "op by op", bench(lambda i: executor._execute_eager(batch), iters=20), nbytes))
        rows.append(Row(name, "cuda graph", bench(lambda i: executor.execute(batch), iters=30), nbytes, rel_err=err))
    return rows


VARLEN_TRIALS = [(64, 64, 4, 3), (64, 32, 4, 3), (64, 128, 4, 2), (64, 64, 8, 3), (64, 64, 4, 2),
                 (128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3)]
#: Trials of the decode over an fp8 cache (tune_fp8): (BLOCK_N, warps, stages) of the Triton
#: kernel; "mma": ``attention._decode_fp8_mma_kernel`` as the module sets it (K words a step
#: ahead since stop 26), with words for what a trial changes: "r128" ptxas's own register count
#: (128) instead of ``DECODE_FP8_MMA_MAXNREG``; "ids ahead" only the block ids loaded a step
#: ahead (``DECODE_FP8_MMA_IDS_AHEAD``), "k ahead" the K words too (``DECODE_FP8_MMA_K_AHEAD``),
#: "in step" neither; "splits2" twice the splits ``decode_num_splits`` gives (slower at every
#: case on an H100, stop 26).
DECODE_TRIALS_FP8 = [(64, 2, 3), "mma", "mma r128", "mma in step", "mma ids ahead", "mma splits2",
                     (64, 2, 4), (64, 4, 3)]
#: (requests, keys) of tune_fp8: DECODE_CASES' last two and the 1000/1000 run at 1024 sequences.
TUNE_FP8_CASES = ((256, 1024), (512, 1536), (1024, 1536))
DECODE_TRIALS = [(64, 4, 2), (32, 4, 2), (128, 4, 2), (64, 2, 2), (64, 8, 2), (64, 4, 3), (64, 4, 4),
                 (128, 8, 3), (32, 2, 3), (64, 2, 3), (64, 2, 4), (128, 2, 2), (128, 4, 3), (32, 2, 4)]


def flag_turns(module: object, name: str, fn: Callable[[int], object], rounds: int = 3) -> dict[bool, float]:
    """Median ms of ``fn`` with ``module.name`` True and False, the two taking turns for
    ``rounds`` rounds (a lent GPU drifts over a minute); the flag is put back after."""
    saved = getattr(module, name)
    times: dict[bool, list[float]] = {True: [], False: []}
    try:
        for _ in range(rounds):
            for value in times:
                setattr(module, name, value)
                times[value].append(bench(fn, budget_s=0.5))
    finally:
        setattr(module, name, saved)
    return {value: statistics.median(ms) for value, ms in times.items()}


def tune_rows() -> list[Row]:
    """Time the attention kernels under alternative tile configs (attention.*_CONFIG) and
    decode split counts; the defaults come first in each group."""
    rows: list[Row] = []
    e = torch.empty((), dtype=DTYPE).element_size()
    scale = HEAD_DIM**-0.5
    lens = PREFILL_CASES[0][0]
    query, cache, attn, _ = paged_setup(lens)
    flops, nbytes = prefill_work(lens, e, e)
    saved = dict(attention.VARLEN_CONFIG)
    for bm, bn, warps, stages in VARLEN_TRIALS:
        attention.VARLEN_CONFIG.update(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
        label = f"BM={bm} BN={bn} w={warps} s={stages}"
        try:
            ms = bench(lambda i: attention.paged_attention(query, cache, attn, scale), budget_s=1.0)
        except Exception as e:  # a config may not fit (shared memory); report it and go on
            print(f"tune prefill {label}: {type(e).__name__}: {str(e)[:120]}")
            continue
        rows.append(Row(f"tune prefill {PREFILL_CASES[0][1]}", label, ms, nbytes, flops))
    attention.VARLEN_CONFIG.update(saved)
    for case, name in PREFILL_CASES:  # the causal mask on every key tile (as before) vs where it cuts
        query_, cache_, attn_, _ = paged_setup(case)
        flops_, bytes_ = prefill_work(case, e, e)
        times = flag_turns(attention, "VARLEN_UNMASKED_TILES",
                           lambda i, a=(query_, cache_, attn_): attention.paged_attention(*a, scale))
        for unmasked, ms in times.items():
            rows.append(Row(f"tune prefill {name}", "unmasked whole tiles" if unmasked else "mask on every tile",
                            ms, bytes_, flops_))

    saved, saved_fp8 = dict(attention.DECODE_CONFIG), dict(attention.DECODE_CONFIG_FP8)
    for num_reqs, ctx in (DECODE_CASES[1], DECODE_CASES[-1]):
        nbytes = 2 * num_reqs * ctx * KV_HEADS * HEAD_DIM * e
        setups = [paged_setup([(ctx - 1, 1)] * num_reqs, seed) for seed in range(min(8, 1 + (256 << 20) // nbytes))]
        n = len(setups)
        name = f"tune decode B={num_reqs} ctx={ctx}"
        for bn, warps, stages in DECODE_TRIALS:
            attention.DECODE_CONFIG.update(BLOCK_N=bn, num_warps=warps, num_stages=stages)
            attention.DECODE_CONFIG_FP8.update(BLOCK_N=bn, num_warps=warps, num_stages=stages)
            label = f"BN={bn} w={warps} s={stages}"
            try:
                ms = bench(lambda i: attention.paged_attention(*setups[i % n][:3], scale), budget_s=1.0)
            except Exception as e:  # a config may not fit; report it and go on
                print(f"{name} {label}: {type(e).__name__}: {str(e)[:120]}")
                continue
            rows.append(Row(name, label, ms, nbytes))
            if num_reqs >= 32:  # and over an fp8 cache (the throughput setting)
                fp8 = [(q_, c_.to(torch.float8_e4m3fn), a_) for q_, c_, a_, _ in setups]
                ms = bench(lambda i: attention.paged_attention(*fp8[i % n], scale), budget_s=1.0)
                rows.append(Row(name, label + " fp8 cache", ms, nbytes // 2))
                del fp8
        attention.DECODE_CONFIG.update(saved)
        attention.DECODE_CONFIG_FP8.update(saved_fp8)
        for splits in (1, 2, 4, 8, 16, 32):
            if splits * 64 > ctx:
                break
            ms = bench(lambda i: attention.paged_attention(*setups[i % n][:3], scale, num_splits=splits), budget_s=1.0)
            rows.append(Row(name, f"splits={splits} (default config)", ms, nbytes))
        if num_reqs == 1:  # the split merge unrolled (attention.MERGE_UNROLLED) vs a loop
            times = flag_turns(attention, "MERGE_UNROLLED",
                               lambda i: attention.paged_attention(*setups[i % n][:3], scale))
            for unrolled, ms in times.items():
                rows.append(Row(name, "merge unrolled" if unrolled else "merge in a loop", ms, nbytes))
    for ctx in SHORT_DECODE_CTX:  # batch 1 over short contexts: one split (the default below 256
        # keys a split, _MIN_KEYS_PER_SPLIT) walks its tiles alone; more splits cost a merge
        nbytes = 2 * ctx * KV_HEADS * HEAD_DIM * e
        setups = [paged_setup([(ctx - 1, 1)], seed) for seed in range(8)]
        default = attention.decode_num_splits(1, KV_HEADS, ctx, _num_sms())
        for splits in (1, 2, 4, 8):
            ms = bench(lambda i: attention.paged_attention(*setups[i % 8][:3], scale, num_splits=splits),
                       budget_s=0.5)
            rows.append(Row(f"tune decode B=1 ctx={ctx}", f"splits={splits}" + (" (default)" if splits == default
                                                                                 else ""), ms, nbytes))
    return rows


def tune_fp8_rows(rounds: int = 3) -> list[Row]:
    """The decode over an fp8 e4m3 cache under ``DECODE_TRIALS_FP8`` at the throughput run's
    batch sizes. The trials take turns for ``rounds`` rounds and each row is the median of its
    rounds: a lent GPU's timings drift by several percent over a
    minute, which one pass per trial would read as a difference between trials."""
    rows: list[Row] = []
    scale = HEAD_DIM**-0.5
    saved, saved_mma = dict(attention.DECODE_CONFIG_FP8), attention.DECODE_FP8_MMA
    saved_regs = attention.DECODE_FP8_MMA_MAXNREG
    saved_ahead = attention.DECODE_FP8_MMA_IDS_AHEAD, attention.DECODE_FP8_MMA_K_AHEAD
    for num_reqs, ctx in TUNE_FP8_CASES:
        nbytes = num_reqs * ctx * KV_HEADS * HEAD_DIM * 2  # K and V, one byte each
        setups = [paged_setup([(ctx - 1, 1)] * num_reqs, seed) for seed in range(min(8, 1 + (256 << 20) // nbytes))]
        fp8 = [(q_, c_.to(torch.float8_e4m3fn), a_) for q_, c_, a_, _ in setups]
        del setups
        n = len(fp8)
        times: dict[tuple, list[float]] = {}
        errors: dict[tuple, float] = {}
        for _ in range(rounds):
            for trial in DECODE_TRIALS_FP8:
                mma = isinstance(trial, str)
                attention.DECODE_FP8_MMA = mma
                words = trial.split() if mma else []
                attention.DECODE_FP8_MMA_MAXNREG = None if "r128" in words else saved_regs
                ids, k = saved_ahead
                if "step" in words or "ahead" in words:
                    ids, k = "ids" in words, "k" in words
                attention.DECODE_FP8_MMA_IDS_AHEAD, attention.DECODE_FP8_MMA_K_AHEAD = ids, k
                splits = {"num_splits": 2 * attention.decode_num_splits(num_reqs, KV_HEADS, ctx, _num_sms())
                          } if "splits2" in words else {}
                if not mma:
                    bn, warps, stages = trial
                    attention.DECODE_CONFIG_FP8.update(BLOCK_N=bn, num_warps=warps, num_stages=stages)
                try:
                    if trial not in errors:
                        want = ref.paged_attention(*fp8[0], scale, kv_layout="blocks_hnd")
                        errors[trial] = rel_err(attention.paged_attention(*fp8[0], scale, **splits), want)
                    times.setdefault(trial, []).append(bench(
                        lambda i: attention.paged_attention(*fp8[i % n], scale, **splits), budget_s=0.5))
                except Exception as e:  # a config may not fit; report it and go on
                    print(f"tune fp8 {trial}: {type(e).__name__}: {str(e)[:120]}")
                    errors[trial] = float("nan")
        attention.DECODE_FP8_MMA, attention.DECODE_FP8_MMA_MAXNREG = saved_mma, saved_regs
        attention.DECODE_FP8_MMA_IDS_AHEAD, attention.DECODE_FP8_MMA_K_AHEAD = saved_ahead
        for trial, ms in times.items():
            label = (f"{trial} kernel (1 warp, 32 keys a step)" if isinstance(trial, str) else
                     "BN={} w={} s={}".format(*trial))
            if isinstance(trial, str) and (HEAD_DIM != 128 or not attention.fp8_mma_supported(fp8[0][0])):
                label += " [NOT RUN: the check failed, the Triton kernel ran]"
            rows.append(Row(f"tune fp8 decode B={num_reqs} ctx={ctx}", label, statistics.median(ms), nbytes,
                            rel_err=errors[trial]))
        attention.DECODE_CONFIG_FP8.update(saved)
    return rows


#: The prompt chunk of the fp8 1000/1000 run's mixed steps: 8 fresh prompts of 1024 tokens.
PREFILL_FP8_CASE = ([(0, 1024)] * 8, "8 x 1024 new")


def tune_prefill_fp8_rows(rounds: int = 3) -> list[Row]:
    """The prompt (varlen) attention over an fp8 e4m3 cache under ``VARLEN_TRIALS``, each with
    q k^T in fp16 (the key tile converted) and as an fp8 dot (``attention.VARLEN_FP8_QK``), the
    trials taking turns for ``rounds`` rounds (median): ``tune`` sweeps them over a bf16 cache
    only, while the fp8 1000/1000 run's prompt steps read an fp8 one (~150 TFLOP/s there, stop
    20). The error is against the float32 reference with the unquantized queries."""
    rows: list[Row] = []
    scale = HEAD_DIM**-0.5
    lens, label = PREFILL_FP8_CASE
    query, cache, attn, _ = paged_setup(lens)
    cache = cache.to(torch.float8_e4m3fn)
    flops, nbytes = prefill_work(lens, 1, 2)
    want = ref.paged_attention(query.float(), cache.float(), attn, scale, kv_layout="blocks_hnd")
    saved, saved_qk = dict(attention.VARLEN_CONFIG), attention.VARLEN_FP8_QK
    times: dict[tuple, list[float]] = {}
    errors: dict[tuple, float] = {}
    try:
        for _ in range(rounds):
            for trial in [(*config, fp8_qk) for fp8_qk in (False, True) for config in VARLEN_TRIALS]:
                bm, bn, warps, stages, attention.VARLEN_FP8_QK = trial
                attention.VARLEN_CONFIG.update(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
                try:
                    if trial not in errors:
                        errors[trial] = rel_err(attention.paged_attention(query, cache, attn, scale), want)
                    times.setdefault(trial, []).append(bench(
                        lambda i: attention.paged_attention(query, cache, attn, scale), budget_s=0.5))
                except Exception as e:  # a config may not fit (shared memory); report it and go on
                    print(f"tune prefill fp8 {trial}: {type(e).__name__}: {str(e)[:120]}")
                    errors[trial] = float("nan")
    finally:
        attention.VARLEN_CONFIG.update(saved)
        attention.VARLEN_FP8_QK = saved_qk
    for trial, ms in times.items():
        rows.append(Row(f"tune prefill fp8 cache {label}", "BM={} BN={} w={} s={}{}".format(
            *trial[:4], ", fp8 qk" if trial[4] else ""),
                        statistics.median(ms), nbytes, flops, errors[trial]))
    return rows


#: Rows of x for the fp8 GEMM section: a decode batch and a prompt chunk of the 1000/1000 run.
FP8_GEMM_MS = (512, 8192)


def fp8_gemm_rows() -> list[Row]:
    """``torch._scaled_mm`` on the Llama-3-8B layer shapes (q|k|v, o, gate|up, down): the
    W8A8 scales portaserve uses (per token x per channel, "rowwise") against one scale each
    ("tensorwise") and bf16 ``torch.matmul``. rel err: against float32 on the fp8 values."""
    rows: list[Row] = []
    fp8 = torch.float8_e4m3fn
    shapes = {"qkv": (HEADS * HEAD_DIM + 2 * KV_HEADS * HEAD_DIM, HIDDEN), "o": (HIDDEN, HEADS * HEAD_DIM),
              "gate_up": (2 * INTER, HIDDEN), "down": (HIDDEN, INTER)}
    for m in FP8_GEMM_MS if DEV == "cuda" else (16,):
        for name, (n, k) in shapes.items():
            x = torch.randn(m, k, device=DEV, dtype=DTYPE)
            w = torch.randn(n, k, device=DEV, dtype=DTYPE) * k**-0.5
            xq, wq = (x * 0.5).to(fp8), (w * 100).to(fp8)
            sx_row = torch.rand(m, 1, device=DEV) + 0.5
            sw_row = torch.rand(1, n, device=DEV) * 0.01 + 0.005
            one = torch.ones((), device=DEV)
            want = (xq.float() * sx_row) @ (wq.float() * sw_row.T).T
            label, flops = f"fp8 GEMM {name} {m}x{k} -> {n}", 2.0 * m * n * k
            nbytes = m * k + n * k + 2 * m * n
            row = torch._scaled_mm(xq, wq.t(), sx_row, sw_row, out_dtype=torch.bfloat16)
            rows.append(Row(label, "_scaled_mm rowwise", bench(
                lambda i: torch._scaled_mm(xq, wq.t(), sx_row, sw_row, out_dtype=torch.bfloat16), iters=30),
                nbytes, flops, rel_err(row.float(), want)))
            if DEV == "cuda":  # the sums kept in the tensor cores' own precision (fp8.FAST_ACCUM)
                fast = torch._scaled_mm(xq, wq.t(), sx_row, sw_row, out_dtype=torch.bfloat16, use_fast_accum=True)
                rows.append(Row(label, "_scaled_mm rowwise, fast accum", bench(
                    lambda i: torch._scaled_mm(xq, wq.t(), sx_row, sw_row, out_dtype=torch.bfloat16,
                                               use_fast_accum=True), iters=30),
                    nbytes, flops, rel_err(fast.float(), want)))
            rows.append(Row(label, "_scaled_mm tensorwise", bench(
                lambda i: torch._scaled_mm(xq, wq.t(), one, one, out_dtype=torch.bfloat16), iters=30), nbytes, flops))
            rows.append(Row(label, "bf16 matmul", bench(lambda i: x @ w.T, iters=30), 2 * nbytes, flops))
    return rows


#: (decode rows, context) for the overlap section: the throughput run's steady decode batch.
OVERLAP_CASES = ((512, 1536), (256, 1024))


def overlap_rows(rounds: int = 3) -> list[Row]:
    """Whether one layer's decode attention (bandwidth-bound, over an fp8 cache) and its four
    fp8 GEMMs (compute-bound at these rows) gain from running at once on two streams, the
    premise of splitting a decode step into two halves whose attention and GEMMs interleave.
    Rows: each alone, one after the other, both at once (all rows), and two halves where each
    half's attention runs beside the other half's GEMMs (twice the time of one such pair).
    The variants take turns for ``rounds`` rounds; each row is the median of its rounds."""
    rows: list[Row] = []
    scale, fp8 = HEAD_DIM**-0.5, torch.float8_e4m3fn
    shapes = ((HEADS * HEAD_DIM + 2 * KV_HEADS * HEAD_DIM, HIDDEN), (HIDDEN, HEADS * HEAD_DIM),
              (2 * INTER, HIDDEN), (HIDDEN, INTER))
    weights = [((torch.randn(n, k, device=DEV) * 0.05).to(fp8), torch.rand(1, n, device=DEV) * 0.01 + 0.005)
               for n, k in shapes]
    gemm_flops_row = sum(2.0 * n * k for n, k in shapes)
    main = torch.cuda.current_stream() if DEV == "cuda" else None
    side = [torch.cuda.Stream() for _ in range(2)] if DEV == "cuda" else []
    for num_reqs, ctx in OVERLAP_CASES:
        half = num_reqs // 2
        setups = {b: [paged_setup([(ctx - 1, 1)] * b, seed) for seed in range(2)] for b in (num_reqs, half)}
        caches = {b: [(q, c.to(fp8), a) for q, c, a, _ in s] for b, s in setups.items()}
        del setups
        xs = {b: [((torch.randn(b, k, device=DEV) * 0.5).to(fp8), torch.rand(b, 1, device=DEV) + 0.5)
                  for _, k in shapes] for b in (num_reqs, half)}

        def attn(b: int, i: int) -> None:
            attention.paged_attention(*caches[b][i % 2], scale)

        def gemms(b: int) -> None:
            for (xq, sx), (wq, sw) in zip(xs[b], weights, strict=True):
                torch._scaled_mm(xq, wq.t(), sx, sw, out_dtype=torch.bfloat16)

        def together(b: int, i: int) -> None:
            if main is None:
                attn(b, i), gemms(b)
                return
            for s in side:
                s.wait_stream(main)
            with torch.cuda.stream(side[0]):
                attn(b, i)
            with torch.cuda.stream(side[1]):
                gemms(b)
            for s in side:
                main.wait_stream(s)

        variants = {"attention alone": lambda i: attn(num_reqs, i), "GEMMs alone": lambda i: gemms(num_reqs),
                    "attention then GEMMs": lambda i: (attn(num_reqs, i), gemms(num_reqs)),
                    "both at once, two streams": lambda i: together(num_reqs, i),
                    f"2 halves of {half}, each at once": lambda i: (together(half, i), together(half, i + 1))}
        times: dict[str, list[float]] = {}
        for _ in range(rounds):
            for label, fn in variants.items():
                times.setdefault(label, []).append(bench(fn, iters=30, budget_s=0.5))
        kv_bytes = num_reqs * ctx * KV_HEADS * HEAD_DIM * 2
        for label, ms in times.items():
            nbytes = 0 if label == "GEMMs alone" else kv_bytes
            flops = 0.0 if label == "attention alone" else gemm_flops_row * num_reqs
            rows.append(Row(f"overlap B={num_reqs} ctx={ctx} (1 layer)", label, statistics.median(ms), nbytes, flops))
    return rows


def print_table(rows: list[Row], copy_bps: float, flop_rate: float) -> None:
    """One line per row; ``floor`` is max(bytes / copy bandwidth, flops / matmul rate), and
    ``x floor`` how far the measured time is above it."""
    print()
    print(f"ceilings: copy {copy_bps / 1e12:.2f} TB/s (read+write), bf16 matmul {flop_rate / 1e12:.0f} TFLOP/s")
    head = (f"{'case':44s} {'impl':28s} {'ms':>9s} {'floor ms':>9s} {'x floor':>7s} {'GB/s':>7s} "
            f"{'%copy':>6s} {'TFLOP/s':>8s} {'rel err':>8s}")
    print(head)
    print("-" * len(head))
    for r in rows:
        floor = max(r.bytes / copy_bps, r.flops / flop_rate) * 1e3
        pct = 100 * r.bytes / (r.ms * 1e-3) / copy_bps
        tf = f"{r.tflops():8.1f}" if r.flops else " " * 8
        err = f"{r.rel_err:8.1e}" if r.rel_err is not None else " " * 8
        print(f"{r.name:44s} {r.impl:28s} {r.ms:9.4f} {floor:9.4f} {r.ms / floor:7.2f} {r.gbps():7.0f} "
              f"{pct:6.1f} {tf} {err}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-model", action="store_true", help="skip the 8B-shaped decode step")
    parser.add_argument("--tune", action="store_true",
                        help="also time alternative attention tile configs and split counts")
    parser.add_argument("--sections", default=None,
                        help="comma list of elementwise, attention, model, tune, tune_fp8, tune_prefill_fp8, fp8_gemm, overlap (default: "
                             "all but the tune sections; --tune adds tune)")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes on the CPU through the Triton interpreter (checks the script)")
    args = parser.parse_args(argv)
    if args.dry_run:
        dry_run_sizes()
    elif not torch.cuda.is_available():
        print("no CUDA GPU visible: this benchmark needs one", file=sys.stderr)
        return 2
    import triton

    if DEV == "cuda":
        props = torch.cuda.get_device_properties(0)
        print(f"{props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB; "
              f"torch {torch.__version__}, triton {triton.__version__}", flush=True)
    copy_bps, flop_rate = copy_bandwidth(), matmul_rate()
    rows: list[Row] = []
    sections = [elementwise_rows, attention_rows] + ([] if args.skip_model else [model_rows])
    sections += [tune_rows] if args.tune else []
    if args.sections:
        named = {"elementwise": elementwise_rows, "attention": attention_rows, "model": model_rows,
                 "tune": tune_rows, "tune_fp8": tune_fp8_rows, "tune_prefill_fp8": tune_prefill_fp8_rows, "fp8_gemm": fp8_gemm_rows,
                 "overlap": overlap_rows}
        sections = [named[name] for name in args.sections.split(",")]
    for section in sections:
        start = time.perf_counter()
        rows += section()
        print(f"{section.__name__}: {time.perf_counter() - start:.1f} s", flush=True)
        if DEV == "cuda":
            torch.cuda.empty_cache()
    print_table(rows, copy_bps, flop_rate)
    bad = [r for r in rows if r.rel_err is not None and not (r.rel_err < 2e-2 and math.isfinite(r.rel_err))]
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"copy_bytes_per_s": copy_bps, "matmul_flops_per_s": flop_rate, "rows": [asdict(r) for r in rows]}, f, indent=1)
    if bad:
        print("WRONG RESULTS:", ", ".join(f"{r.name} [{r.impl}] rel err {r.rel_err:.2e}" for r in bad))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
