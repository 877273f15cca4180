#!/usr/bin/env python
"""portaserve's CPU devices against OpenVINO GenAI and transformers: same GGUF, same threads.

Engines, each in a fresh subprocess (thread settings and memory do not leak between them):

- ``portaserve openvino`` in the modes of the device: precision ``f32`` (exact) or ``auto``
  (the plugin's defaults: u8 KV cache), with f32 weights, the GGUF's own Q4_1 blocks, or int4;
- ``portaserve cpu`` (torch plus the native kernels and decode step of ``devices/cpu_native``;
  ``cpu-torch`` is the same device with ``PORTASERVE_CPU_NATIVE=0``);
- ``openvino_genai.LLMPipeline`` loading the same GGUF file;
- Hugging Face ``transformers`` (``from_pretrained(gguf_file=...)``, float32, greedy
  ``generate``).

Per engine: batch-1 decode tokens/s (128 greedy tokens after a 16-token prompt; the time of a
1-token run, i.e. the prefill, is subtracted) and batch-8 aggregate tokens/s (8 different
16-token prompts, 128 new tokens each, submitted together; total new tokens / wall time). EOS
is ignored everywhere, so every run produces exactly the tokens asked for.

    python benchmarks/openvino_vs_genai.py --threads 2 [--engines cpu,ov-f32,genai,hf] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "OV_BENCH_RESULT "
NEW_TOKENS = int(os.environ.get("OV_BENCH_NEW_TOKENS", "128"))
BATCH = 8
PROMPTS = [
    "Write a story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how photosynthesis works to a ten year old child, step by step.",
    "List the main causes of the French Revolution and explain each of them.",
    "Describe the water cycle and why it matters for farming in dry regions.",
    "What are the differences between a violin, a viola and a cello today?",
    "Give advice to someone who is starting to learn programming in Python.",
    "Summarize the history of the printing press and its effect on Europe.",
    "Describe a walk through a busy market in the morning, with the smells.",
]

#: engine key -> (label, portaserve device or None, environment for the device)
ENGINES: dict[str, tuple[str, str | None, dict[str, str]]] = {
    "ov": ("portaserve openvino, defaults (f32, GGUF blocks)", "openvino", {}),
    "ov-f32": ("portaserve openvino f32, f32 weights", "openvino",
               {"PORTASERVE_OPENVINO_PRECISION": "f32", "PORTASERVE_OPENVINO_WEIGHTS": "f32"}),
    "ov-f32-gguf": ("portaserve openvino f32, GGUF blocks", "openvino",
                    {"PORTASERVE_OPENVINO_PRECISION": "f32", "PORTASERVE_OPENVINO_WEIGHTS": "gguf"}),
    "ov-auto-gguf": ("portaserve openvino auto (u8 KV), GGUF blocks", "openvino",
                     {"PORTASERVE_OPENVINO_PRECISION": "auto", "PORTASERVE_OPENVINO_WEIGHTS": "gguf"}),
    "ov-auto-int4": ("portaserve openvino auto (u8 KV), int4 weights", "openvino",
                     {"PORTASERVE_OPENVINO_PRECISION": "auto", "PORTASERVE_OPENVINO_WEIGHTS": "int4"}),
    "cpu": ("portaserve cpu", "cpu", {}),
    "cpu-torch": ("portaserve cpu, torch only", "cpu", {"PORTASERVE_CPU_NATIVE": "0"}),
    "genai": ("openvino_genai.LLMPipeline (GGUF)", None, {}),
    "hf": ("transformers float32 generate (GGUF)", None, {}),
}


def _portaserve_worker(model: str, device: str, threads: int) -> dict[str, Any]:
    sys.path.insert(0, str(REPO))
    from portaserve.core.llm import LLM
    from portaserve.core.sampling import SamplingParams

    t0 = time.perf_counter()
    packed = os.environ.get("PORTASERVE_OPENVINO_WEIGHTS") == "gguf"  # keep Q4_1 blocks packed
    llm = LLM(model, device=device, dtype="float32", keep_packed_weights=packed or None,
              num_kv_blocks=4096 // (32 if device == "openvino" else 16) * 4)
    load_s = time.perf_counter() - t0
    tok = llm.get_tokenizer()
    prompt_ids = [tok.encode(p)[:16] for p in PROMPTS]

    def run(prompts: list[list[int]], n: int) -> float:
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        elapsed = time.perf_counter() - start
        if any(len(o.outputs[0].token_ids) != n for o in outs):
            raise RuntimeError("an output has the wrong length")
        return elapsed

    run(prompt_ids[:1], 8)  # warm-up
    prefill = min(run(prompt_ids[:1], 1) for _ in range(3))
    decode = run(prompt_ids[:1], NEW_TOKENS + 1) - prefill
    batch = run(prompt_ids, NEW_TOKENS)
    return {"load_s": load_s, "batch1_tok_s": NEW_TOKENS / decode,
            "batch8_tok_s": BATCH * NEW_TOKENS / batch}


def _genai_worker(model: str, threads: int) -> dict[str, Any]:
    import openvino_genai as genai

    t0 = time.perf_counter()
    pipe = genai.LLMPipeline(model, "CPU", INFERENCE_NUM_THREADS=threads)
    load_s = time.perf_counter() - t0
    tok = pipe.get_tokenizer()
    # the same 16-token prompts as portaserve's, as text without the chat template
    ids = [tok.encode(p, add_special_tokens=False).input_ids.data[0][:16].tolist() for p in PROMPTS]
    texts = [tok.decode(i) for i in ids]

    def run(prompts: list[str], n: int) -> float:
        config = genai.GenerationConfig(max_new_tokens=n, min_new_tokens=n, ignore_eos=True,
                                        do_sample=False, apply_chat_template=False)
        start = time.perf_counter()
        pipe.generate(prompts if len(prompts) > 1 else prompts[0], config)
        return time.perf_counter() - start

    run(texts[:1], 8)
    prefill = min(run(texts[:1], 1) for _ in range(3))
    decode = run(texts[:1], NEW_TOKENS + 1) - prefill
    batch = run(texts, NEW_TOKENS)
    return {"load_s": load_s, "batch1_tok_s": NEW_TOKENS / decode,
            "batch8_tok_s": BATCH * NEW_TOKENS / batch}


def _hf_worker(model: str, threads: int) -> dict[str, Any]:
    import torch
    import transformers

    torch.set_num_threads(threads)
    sys.path.insert(0, str(REPO))
    from portaserve.core.tokenizer import load_tokenizer  # the same prompts as portaserve's

    gguf = Path(model)
    t0 = time.perf_counter()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                           dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    tok = load_tokenizer(gguf)
    prompts = [tok.encode(p)[:16] for p in PROMPTS]
    width = max(len(p) for p in prompts)  # left-padded batch, as generate expects
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def run(rows: slice, n: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(ids[rows], attention_mask=mask[rows], do_sample=False,
                              max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
        if out.shape[1] != width + n:
            raise RuntimeError("an output has the wrong length")
        return time.perf_counter() - start

    run(slice(0, 1), 8)
    prefill = min(run(slice(0, 1), 1) for _ in range(3))
    decode = run(slice(0, 1), NEW_TOKENS + 1) - prefill
    batch = run(slice(0, BATCH), NEW_TOKENS)
    return {"load_s": load_s, "batch1_tok_s": NEW_TOKENS / decode,
            "batch8_tok_s": BATCH * NEW_TOKENS / batch,
            "version": f"transformers {transformers.__version__}"}


def _worker(args: argparse.Namespace) -> None:
    label, device, _ = ENGINES[args.worker]
    if args.worker == "hf":
        result = _hf_worker(args.model, args.threads)
    elif device is None:
        result = _genai_worker(args.model, args.threads)
    else:
        result = _portaserve_worker(args.model, device, args.threads)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def _run_engine(key: str, model: str, threads: int) -> dict[str, Any]:
    env = dict(os.environ, PORTASERVE_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               OV_BENCH_NEW_TOKENS=str(NEW_TOKENS),
               PORTASERVE_LOG_LEVEL="WARNING", **ENGINES[key][2])
    cmd = [sys.executable, __file__, "--worker", key, "--model", model, "--threads", str(threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]}


def main() -> None:
    global NEW_TOKENS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="GGUF path (default: the fetched SmolLM2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--json", default=None)
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS,
                        help="new tokens per sequence (default 128)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        sys.path.insert(0, str(REPO))
        from portaserve.core.loaders.fetch import resolve_model

        args.model = str(resolve_model("smollm2-135m"))
    NEW_TOKENS = args.new_tokens
    if args.worker:
        _worker(args)
        return

    import openvino as ov

    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    print(f"model {Path(args.model).name}; {args.threads} threads; {os.cpu_count()} CPUs "
          f"({platform.processor() or platform.machine()}); openvino {ov.__version__}; "
          f"load average at start {load:.1f}")
    print(f"batch 1: {NEW_TOKENS} greedy tokens after a 16-token prompt, prefill subtracted; "
          f"batch {BATCH}: {BATCH} prompts x {NEW_TOKENS} tokens together; EOS ignored")
    results = {}
    for key in args.engines.split(","):
        results[key] = _run_engine(key, args.model, args.threads)
        r = results[key]
        if "error" in r:
            print(f"{ENGINES[key][0]:44s} failed: {r['error']}")
        else:
            print(f"{ENGINES[key][0]:44s} batch-1 {r['batch1_tok_s']:7.1f} tok/s   "
                  f"batch-{BATCH} {r['batch8_tok_s']:7.1f} tok/s   (load {r['load_s']:.1f} s)",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
