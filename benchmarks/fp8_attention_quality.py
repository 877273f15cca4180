#!/usr/bin/env python
"""What fp8 attention costs in model quality: SmolLM2 on cpu, teacher-forced over a fixed text.

Variants of the attention's inputs, each against the model with a cache in its own dtype:

- ``fp8 e4m3 cache``: K and V stored as e4m3 (``--kv-cache-dtype fp8``);
- ``+ fp8 q (per row)``: also each query row (token x head) quantized to e4m3 with its own
  scale, the numerics of ``quant.fp8.quantize_per_token``, which is what the cuda prompt
  attention computes with ``attention.VARLEN_FP8_QK`` on (tests/devices/test_triton_kernels.py
  checks the kernel against exactly this). Teacher forcing runs every position as a prompt
  token, so every attention call here is the path that option changes;
- ``fp8 e5m2 cache``: for scale.

Printed per variant: perplexity over the text, mean KL divergence of the next-token
distributions from the baseline's, and how often the argmax agrees. The weights are the
SmolLM2 Q4_1 GGUF dequantized to float32 (fetched and cached by the project's own loader).

    python benchmarks/fp8_attention_quality.py --tokens 1024
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "quant"))  # the model driver shared with the tests

import quant_driver as qd  # noqa: E402

from portaserve.core.loaders import load_model  # noqa: E402
from portaserve.core.models.llama import LlamaForCausalLM  # noqa: E402
from portaserve.plugins.manager import get_registry  # noqa: E402
from portaserve.quant.base import QuantizedWeight  # noqa: E402
from portaserve.quant.fp8 import quantize_per_token  # noqa: E402

TEXT = REPO / "tests" / "data" / "perplexity_en.txt"


def fp8_queries(paged_attention):
    """``paged_attention`` whose queries are first rounded to e4m3 a row at a time."""
    def op(query, kv_cache, attn, scale, **kw):
        rows = quantize_per_token(query.reshape(-1, query.shape[-1]).float())
        q = (rows.data.float() * rows.scale).view(query.shape).to(query.dtype)
        return paged_attention(q, kv_cache, attn, scale, **kw)
    return op


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024, help="tokens of the text (it has ~700)")
    args = parser.parse_args(argv)
    registry = get_registry()
    device, _ = registry.select_device("cpu")
    table = registry.kernel_table(device)
    packed = load_model("smollm2-135m", dtype=torch.float32, device=torch.device("cpu"), progress=False)
    weights = {k: (w.dequantize(torch.float32) if isinstance(w, QuantizedWeight) else w)
               for k, w in packed.weights.items()}
    ids = packed.tokenizer.encode(TEXT.read_text())[: args.tokens]
    print(f"SmolLM2-135M (Q4_1 GGUF dequantized to float32) on cpu, {len(ids)} tokens of {TEXT.name} "
          f"teacher-forced in one prefill; torch {torch.__version__}, python {platform.python_version()}")

    def model(paged_attention=None):
        t = table if paged_attention is None else dataclasses.replace(
            table, ops={**table.ops, "paged_attention": paged_attention})
        return LlamaForCausalLM(packed.config, weights, t, dtype=torch.float32, device=torch.device("cpu"))

    variants = {
        "float32 cache (baseline)": (model(), None),
        "fp8 e4m3 cache": (model(), torch.float8_e4m3fn),
        "fp8 e4m3 cache + fp8 q (per row)": (model(fp8_queries(table.paged_attention)), torch.float8_e4m3fn),
        "fp8 e5m2 cache": (model(), torch.float8_e5m2),
    }
    base = None
    print("| variant | perplexity | x baseline | mean KL from baseline (nats) | argmax agrees | s |")
    print("|---|---|---|---|---|---|")
    for name, (m, cache_dtype) in variants.items():
        start = time.perf_counter()
        logits = qd.prefill_logits(m, device, ids, cache_dtype).float()
        ppl = qd.perplexity(logits, ids)
        logp = torch.log_softmax(logits[:-1], dim=-1)  # (the rows that predict a token of the text)
        if base is None:
            base, base_ppl = logp, ppl
        kl = float((base.exp() * (base - logp)).sum(-1).mean())
        agree = float((logp.argmax(-1) == base.argmax(-1)).float().mean())
        print(f"| {name} | {ppl:.4f} | {ppl / base_ppl:.4f} | {kl:.2e} | {100 * agree:.1f}% | "
              f"{time.perf_counter() - start:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
