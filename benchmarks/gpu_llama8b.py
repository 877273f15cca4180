"""H200 benchmark of the cuda device on a Llama-3-8B-shaped model with random bf16 weights.

One run prints, side by side: the measured copy-bandwidth roofline, Hugging Face transformers'
``generate`` on the same weights, and portaserve (``random:llama3-8b`` on ``cuda``):

  1. batch-1 decode ms/token (128-token prompt, 512 new tokens)
  2. time to first token of a 1000-token prompt
  3. offline throughput, fixed 1000 in / 1000 out, --num-prompts prompts, ignore EOS
  4. shared-prefix throughput with prefix caching on vs off

    PYTHONPATH=. python3 benchmarks/gpu_llama8b.py            # about 6-8 minutes on an H200

Speed does not depend on the weights' values (see DESIGN.md), so the weights are random.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import time

import torch

from portaserve import LLM, SamplingParams, __version__, envs
from portaserve.core.loaders.synthetic import PRESETS, synthetic_weights
from portaserve.serve.engine_args import int_or_none

PRESET = "llama3-8b"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (the roofline's ceiling)."""
    x = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / 10
    del x, y
    return 2 * 2 * 2**30 / seconds


#: Bytes a linear layer's weight element takes per ``--quantization`` (int4: 4 bits and a bf16
#: scale and zero per group of 128); embeddings, lm_head and norms stay bf16.
LINEAR_BYTES = {None: 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5 + 4 / 128}


def weight_bytes(quantization: str | None = None) -> int:
    """Bytes a batch-1 decode step reads: every layer's weights, the final norm and the
    lm_head, and one row of the embedding table."""
    c = PRESETS[PRESET]
    h, i, q, kv = c.hidden_size, c.intermediate_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    linear = c.num_layers * (h * (q + 2 * kv) + q * h + 3 * h * i)
    bf16 = c.num_layers * 2 * h + c.vocab_size * h + 2 * h
    return int(LINEAR_BYTES.get(quantization, 2.0) * linear + 2 * bf16)


def bench_hf(args: argparse.Namespace) -> dict[str, float]:
    from transformers import LlamaConfig, LlamaForCausalLM

    c = PRESETS[PRESET]
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                      intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
                      num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                      head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
                      max_position_embeddings=c.max_position_embeddings,
                      tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    weights = synthetic_weights(c, dtype=torch.bfloat16, device=torch.device("cuda"))
    model.load_state_dict(weights, assign=True, strict=False)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg, device="cuda")
    model.eval()
    ids = torch.randint(100, c.vocab_size, (1, 128), device="cuda")
    gen = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, **gen)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **gen)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        model.generate(ids, max_new_tokens=args.decode_tokens, min_new_tokens=args.decode_tokens, **gen)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        ms_per_token = ((t2 - t1) - (t1 - t0)) / (args.decode_tokens - 1) * 1e3
        long = torch.randint(100, c.vocab_size, (1, 1000), device="cuda")
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        model.generate(long, max_new_tokens=1, min_new_tokens=1, **gen)
        torch.cuda.synchronize()
        ttft = (time.perf_counter() - t3) * 1e3
        batch = torch.randint(100, c.vocab_size, (args.hf_batch, args.hf_input_len), device="cuda")
        torch.cuda.synchronize()
        t4 = time.perf_counter()
        model.generate(batch, max_new_tokens=args.hf_output_len, min_new_tokens=args.hf_output_len, **gen)
        torch.cuda.synchronize()
        tput = args.hf_batch * args.hf_output_len / (time.perf_counter() - t4)
    del model, weights
    gc.collect()
    torch.cuda.empty_cache()
    return {"decode_ms": ms_per_token, "ttft_ms": ttft, "throughput": tput}


def _fast_accum() -> bool:
    from portaserve.quant import fp8

    return fp8.FAST_ACCUM


def _varlen_state() -> str:
    from portaserve.devices.cuda import attention

    c = attention.VARLEN_CONFIG
    return (f"BM={c['BLOCK_M']} BN={c['BLOCK_N']} w={c['num_warps']} s={c['num_stages']}"
            f"{', fp8 q k^T over an e4m3 cache' if attention.VARLEN_FP8_QK else ''}")


def _fp8_mma_state() -> str:
    from portaserve.devices.cuda import attention

    ahead = ("K words + block ids" if attention.DECODE_FP8_MMA_K_AHEAD else
             "block ids" if attention.DECODE_FP8_MMA_IDS_AHEAD else "nothing")
    return f"on (where it fits and its check holds; a step ahead: {ahead})" if attention.DECODE_FP8_MMA else "off"


def make_llm(args: argparse.Namespace, **kw: object) -> LLM:
    return LLM(f"random:{PRESET}", device="cuda", dtype="bfloat16",
               async_scheduling=args.async_scheduling, max_num_seqs=args.max_num_seqs,
               max_num_batched_tokens=args.max_batched_tokens,
               kv_cache_dtype=args.kv_cache_dtype, quantization=args.quantization,
               expected_output_tokens=args.expected_output_tokens,
               memory_utilization=args.memory_utilization, **kw)


def random_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(100, vocab) for _ in range(n)]


def run_all(llm: LLM, prompts: list[list[int]], params: SamplingParams, deadline: float) -> tuple[int, float, int]:
    """Generate; returns (output tokens, seconds, finished requests). Stops at the deadline."""
    engine = llm.llm_engine
    for i, p in enumerate(prompts):
        engine.add_request(f"b{time.monotonic_ns()}-{i}", p, params)
    torch.cuda.synchronize()
    start = time.perf_counter()
    tokens = finished = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished += 1
                tokens += sum(len(c.token_ids) for c in out.outputs)
        if time.perf_counter() > deadline:
            break
    elapsed = time.perf_counter() - start
    if engine.has_unfinished_requests():  # out of time: count what was generated, then abort
        for rid in list(engine._parents):
            parent = engine._parents[rid]
            tokens += sum(len(c.request.output_token_ids) for c in parent.children)
            engine.abort_request(rid)
    return tokens, elapsed, finished


def bench_portaserve(args: argparse.Namespace, deadline: float) -> dict[str, float]:
    rng = random.Random(0)
    vocab = PRESETS[PRESET].vocab_size
    res: dict[str, float] = {}
    llm = make_llm(args)
    engine = llm.llm_engine
    log(f"portaserve engine ready: {engine.device_description}, KV {engine.kv_capacity_tokens} tokens, "
        f"executor {type(engine.runner.executor).__name__ if engine.runner.executor else 'none'}, "
        f"async scheduling {'on' if engine.async_scheduling else 'off'}, "
        f"PDL {'on' if envs.cuda_pdl() else 'off'}, admission reserve "
        f"{'off' if args.expected_output_tokens is None else f'{args.expected_output_tokens} tokens'}")
    res["async_scheduling"] = engine.async_scheduling
    parts = set(args.parts.split(","))
    greedy = SamplingParams(temperature=0, max_tokens=args.decode_tokens, ignore_eos=True)
    llm.generate(random_ids(rng, 128, vocab), SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    # 1. batch-1 decode: the window holds the decode_tokens - 1 forward passes after the
    # prefill (with async scheduling it also reads the prefill's token, computed before it)
    engine.add_request("lat", random_ids(rng, 128, vocab), greedy)
    engine.step()  # prefill + first token (async: launched; its token is read next step)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    torch.cuda.synchronize()
    res["decode_ms"] = (time.perf_counter() - t0) / (args.decode_tokens - 1) * 1e3
    res["gpu_step_ms"] = gpu_step_ms(engine, 128 + args.decode_tokens // 2)
    # 2. TTFT, 1000-token prompt (fresh tokens: no prefix-cache hit)
    ttfts = []
    for _ in range(3 if "ttft" in parts else 0):
        prompt = random_ids(rng, 1000, vocab)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        llm.generate(prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        ttfts.append((time.perf_counter() - t0) * 1e3)
    res["ttft_ms"] = min(ttfts) if ttfts else float("nan")
    res["throughput"] = res["prefix_on"] = res["prefix_off"] = res["prefix_hit_rate"] = float("nan")
    res["throughput_done"] = res["throughput_s"] = 0
    if "throughput" in parts:
        bench_throughput(args, llm, rng, res, deadline)
    if "prefix" not in parts:
        return res
    sp_prompts, sp_params = bench_prefix_on(args, llm, rng, res, deadline)
    del llm, engine
    gc.collect()
    torch.cuda.empty_cache()
    log("shared prefix, caching off")
    off = make_llm(args, enable_prefix_caching=False)
    tokens, secs, _ = run_all(off, sp_prompts, sp_params, deadline)
    res["prefix_off"] = tokens / secs
    del off
    gc.collect()
    torch.cuda.empty_cache()
    return res


def gpu_step_ms(engine: object, context: int, iters: int = 100) -> float:
    """The device's time for one batch-1 decode step (forward + logits + argmax) when steps are
    queued back to back with no host work between them: the floor for ``decode_ms``."""
    from portaserve.core.batch import build_batch

    block_size = engine.kv_spec.block_size
    blocks = list(range(1, context // block_size + 2))  # free blocks after the decode above
    batch = build_batch([("gpu-step", [100], context, blocks, True)], block_size)

    def step() -> None:
        engine.runner.execute(batch).argmax(dim=-1)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    engine.scheduler.block_pool.reset_prefix_cache()  # the blocks' contents were overwritten
    return (time.perf_counter() - t0) / iters * 1e3


def bench_throughput(args: argparse.Namespace, llm: LLM, rng: random.Random, res: dict[str, float],
                     deadline: float) -> None:
    vocab = PRESETS[PRESET].vocab_size
    log(f"throughput: {args.num_prompts} prompts x {args.input_len} in / {args.output_len} out")
    prompts = [random_ids(rng, args.input_len, vocab) for _ in range(args.num_prompts)]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True,
                            output_kind="final_only")
    reserve = 150 if "prefix" in args.parts.split(",") else 0  # time left for the prefix part
    preempted_before = llm.llm_engine.stats().num_preemptions
    tokens, secs, done = run_all(llm, prompts, params, deadline - reserve)
    res["throughput"] = tokens / secs
    res["throughput_done"] = done
    res["throughput_s"] = secs
    res["throughput_preemptions"] = llm.llm_engine.stats().num_preemptions - preempted_before
    log(f"throughput: {tokens / secs:,.0f} output tok/s, {done} finished in {secs:.1f} s, "
        f"{res['throughput_preemptions']} preemptions")


def bench_prefix_on(args: argparse.Namespace, llm: LLM, rng: random.Random, res: dict[str, float],
                    deadline: float) -> tuple[list[list[int]], SamplingParams]:
    vocab = PRESETS[PRESET].vocab_size
    engine = llm.llm_engine
    shared = random_ids(rng, args.prefix_len, vocab)
    sp_prompts = [shared + random_ids(rng, args.suffix_len, vocab) for _ in range(args.prefix_prompts)]
    sp_params = SamplingParams(temperature=0, max_tokens=args.prefix_output_len, ignore_eos=True,
                               output_kind="final_only")
    log("shared prefix, caching on")
    tokens, secs, _ = run_all(llm, sp_prompts, sp_params, deadline - 60)
    res["prefix_on"] = tokens / secs
    res["prefix_hit_rate"] = engine.stats().prefix_cache_hits / max(engine.stats().prefix_cache_queries, 1)
    return sp_prompts, sp_params


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=1000)
    p.add_argument("--output-len", type=int, default=1000)
    p.add_argument("--decode-tokens", type=int, default=512)
    p.add_argument("--max-num-seqs", type=int, default=512)
    p.add_argument("--max-batched-tokens", type=int, default=8192)
    p.add_argument("--prefix-len", type=int, default=900)
    p.add_argument("--suffix-len", type=int, default=100)
    p.add_argument("--prefix-prompts", type=int, default=256)
    p.add_argument("--prefix-output-len", type=int, default=100)
    p.add_argument("--hf-batch", type=int, default=32)
    p.add_argument("--hf-input-len", type=int, default=1000)
    p.add_argument("--hf-output-len", type=int, default=256)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--async-scheduling", default=None, action=argparse.BooleanOptionalAction,
                   help="force async scheduling on or off (default: the device's choice)")
    p.add_argument("--kv-cache-dtype", default="auto", help="auto (bf16) or fp8 (e4m3)")
    p.add_argument("--fp8-fast-accum", action=argparse.BooleanOptionalAction, default=None,
                   help="fp8 W8A8 matmuls with _scaled_mm's use_fast_accum (quant.fp8.FAST_ACCUM; default: "
                        "PORTASERVE_FP8_FAST_ACCUM)")
    p.add_argument("--fp8-mma-decode", default=None, action=argparse.BooleanOptionalAction,
                   help="decode over an fp8 cache through the hand-built MMA kernel "
                        "(attention.DECODE_FP8_MMA; default: as the module says)")
    p.add_argument("--fp8-mma-ahead", default=None, choices=("none", "ids", "k"),
                   help="what the MMA fp8 decode loads a step ahead: nothing, the block ids "
                        "(attention.DECODE_FP8_MMA_IDS_AHEAD) or the K words too (DECODE_FP8_MMA_K_AHEAD); "
                        "default: as the module says")
    p.add_argument("--fp8-qk-prefill", default=None, action=argparse.BooleanOptionalAction,
                   help="prompt attention over an e4m3 cache with q k^T as an fp8 dot "
                        "(attention.VARLEN_FP8_QK; default: as the module says)")
    p.add_argument("--varlen-config", default=None, metavar="BM,BN,WARPS,STAGES",
                   help="the prompt attention's tiles (attention.VARLEN_CONFIG; default: as the module says)")
    p.add_argument("--upcast-logits", action="store_true",
                   help="the runner's logits in float32 again (models.llama.UPCAST_LOGITS; the greedy "
                        "argmax otherwise runs on the lm_head's bf16 output)")
    p.add_argument("--memory-utilization", type=float, default=None,
                   help="share of GPU memory for weights + KV cache (default: the engine's 0.9); "
                        "TensorRT-LLM's published runs give the KV cache 0.95 of what is free")
    p.add_argument("--quantization", default=None,
                   help="online weight format of the decoder's linears (fp8, int8, int4, ...)")
    p.add_argument("--expected-output-tokens", default=None,
                   type=int_or_none,
                   help="the scheduler's admission reserve (none: off, vLLM's admission)")
    p.add_argument("--parts", default="decode,ttft,throughput,prefix",
                   help="which portaserve measurements to run (batch-1 decode always runs)")
    p.add_argument("--budget-s", type=float, default=540, help="stop measuring after this long")
    p.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "gpu_llama8b.json"))
    args = p.parse_args()
    deadline = time.perf_counter() + args.budget_s
    if args.fp8_fast_accum is not None:
        from portaserve.quant import fp8

        fp8.FAST_ACCUM = args.fp8_fast_accum
    if args.fp8_mma_decode is not None:
        from portaserve.devices.cuda import attention

        attention.DECODE_FP8_MMA = args.fp8_mma_decode
    if args.fp8_mma_ahead is not None:
        from portaserve.devices.cuda import attention

        attention.DECODE_FP8_MMA_IDS_AHEAD = args.fp8_mma_ahead == "ids"
        attention.DECODE_FP8_MMA_K_AHEAD = args.fp8_mma_ahead == "k"
    if args.fp8_qk_prefill is not None or args.varlen_config:
        from portaserve.devices.cuda import attention

        if args.fp8_qk_prefill is not None:
            attention.VARLEN_FP8_QK = args.fp8_qk_prefill
        if args.varlen_config:
            bm, bn, warps, stages = (int(v) for v in args.varlen_config.split(","))
            attention.VARLEN_CONFIG.update(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    if args.upcast_logits:
        from portaserve.core.models import llama

        llama.UPCAST_LOGITS = True

    import transformers
    import triton

    props = torch.cuda.get_device_properties(0)
    log(f"GPU {props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs; "
        f"torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__}, "
        f"portaserve {__version__}, python {platform.python_version()}; "
        f"CUDA graphs {'off' if os.environ.get('PORTASERVE_CUDA_GRAPHS') == '0' else 'on'}")
    c = PRESETS[PRESET]
    log(f"model: {c.name}: hidden {c.hidden_size}, {c.num_layers} layers, {c.num_heads} heads / "
        f"{c.num_kv_heads} KV heads, MLP {c.intermediate_size}, vocab {c.vocab_size}, bf16; "
        f"linears {args.quantization or 'bf16'}, KV cache {args.kv_cache_dtype}, memory utilization "
        f"{args.memory_utilization or 'default'}, max_num_seqs {args.max_num_seqs}, fp8 MMA decode "
        f"{_fp8_mma_state()}, fp8 fast accumulation {'on' if _fast_accum() else 'off'}, prompt attention "
        f"{_varlen_state()}, logits "
        f"{'float32' if args.upcast_logits else 'as the lm_head gives them'}")
    bw = copy_bandwidth()
    wb = weight_bytes(args.quantization)
    roof_ms = wb / bw * 1e3
    log(f"copy bandwidth {bw / 1e12:.2f} TB/s; a batch-1 step reads {wb / 1e9:.2f} GB of weights "
        f"(linears {args.quantization or 'bf16'}) -> batch-1 roofline {roof_ms:.2f} ms/token")
    hf = {} if args.skip_hf else bench_hf(args)
    if hf:
        log(f"transformers: {hf}")
    ps = bench_portaserve(args, deadline)
    log(f"portaserve: {ps}")

    def fmt(v: float | None, f: str) -> str:
        return "-" if v is None else format(v, f)

    rows = [
        ("batch-1 decode ms/token (128 in, 512 out)", fmt(roof_ms, ".2f"), fmt(hf.get("decode_ms"), ".2f"),
         fmt(ps["decode_ms"], ".2f"), f"{roof_ms / ps['decode_ms'] * 100:.0f}% of roofline; "
         f"device-only step {ps['gpu_step_ms']:.2f} ms"),
        ("TTFT ms, 1000-token prompt", "-", fmt(hf.get("ttft_ms"), ".1f"), fmt(ps["ttft_ms"], ".1f"), ""),
        (f"offline output tok/s ({args.input_len}/{args.output_len}, {args.num_prompts} prompts)", "-",
         fmt(hf.get("throughput"), ".0f") + (f" (HF batch {args.hf_batch}, {args.hf_input_len}/{args.hf_output_len})" if hf else ""),
         fmt(ps["throughput"], ".0f"), f"{ps['throughput_done']} finished in {ps['throughput_s']:.0f} s"),
        (f"shared prefix {args.prefix_len}+{args.suffix_len}, {args.prefix_output_len} out, tok/s", "-", "-",
         f"on {ps['prefix_on']:.0f} / off {ps['prefix_off']:.0f}", f"hit rate {ps['prefix_hit_rate']:.2f}"),
    ]
    print()
    print(f"| metric | roofline | transformers {transformers.__version__} | portaserve cuda | note |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    with open(args.json, "w") as f:
        json.dump({"roofline_ms": roof_ms, "copy_bw": bw, "hf": hf, "portaserve": ps, "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
    main()
