"""Drive a Llama model directly (no scheduler): greedy decode and teacher-forced log-likelihood.

Used by the quant model tests: one request, a block table covering the whole sequence.
"""

from __future__ import annotations

import torch

from portaserve.core.batch import build_batch
from portaserve.plugins.device import KVCacheSpec

BLOCK_SIZE = 16


def _caches(model, device, num_tokens: int, cache_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    cfg = model.config
    num_blocks = -(-num_tokens // BLOCK_SIZE) + 1
    spec = KVCacheSpec(cfg.num_layers, num_blocks, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim,
                       cache_dtype or model.dtype)
    return device.allocate_kv_cache(spec)


def _step(model, caches, ids: list[int], num_computed: int, block_ids: list[int], all_logits: bool):
    batch = build_batch([("r", ids, num_computed, block_ids, True)], BLOCK_SIZE)
    attn = batch.attention_metadata(model.device)
    hidden = model.forward(batch.token_ids, batch.positions, attn, caches)  # [T, H]
    rows = hidden if all_logits else hidden[batch.logits_indices]
    return model.compute_logits(rows)  # [L, V]


def greedy(model, device, prompt_ids: list[int], max_tokens: int) -> list[int]:
    total = len(prompt_ids) + max_tokens
    caches = _caches(model, device, total)
    block_ids = list(range(-(-total // BLOCK_SIZE)))
    logits = _step(model, caches, prompt_ids, 0, block_ids, False)
    out = [int(logits[-1].argmax())]
    while len(out) < max_tokens:
        computed = len(prompt_ids) + len(out) - 1
        logits = _step(model, caches, [out[-1]], computed, block_ids, False)
        out.append(int(logits[-1].argmax()))
    return out


def prefill_logits(model, device, ids: list[int], cache_dtype: torch.dtype | None = None) -> torch.Tensor:
    """float32 logits [len(ids), V] of one prefill over ``ids`` (KV cache in ``cache_dtype``,
    by default the model's)."""
    caches = _caches(model, device, len(ids), cache_dtype)
    block_ids = list(range(-(-len(ids) // BLOCK_SIZE)))
    return _step(model, caches, ids, 0, block_ids, True)


def perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    """exp(mean NLL) of ids[1:] under logits[:-1]."""
    targets = torch.tensor(ids[1:])
    nll = torch.nn.functional.cross_entropy(logits[:-1].float(), targets)
    return float(torch.exp(nll))


def weight_bytes(model) -> int:
    """Bytes of every weight the model holds (packed or dense), each tensor counted once."""
    from portaserve.quant.base import QuantizedWeight

    seen: set[int] = set()
    total = 0

    def add(w) -> None:
        nonlocal total
        if w is None:
            return
        tensors = w.data.values() if isinstance(w, QuantizedWeight) else [w]
        for t in tensors:
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()

    add(model.embed_tokens)
    add(model.lm_head)
    add(model.norm)
    for layer in model.layers:
        for name in ("input_norm", "post_norm", "q_norm", "k_norm"):
            add(getattr(layer, name))
        for proj in (layer.qkv, layer.o, layer.gate_up, layer.down):
            for w, b in proj:
                add(w)
                add(b)
    return total


def decode_tokens_per_s(model, device, batch_size: int, prompt_ids: list[int], steps: int) -> float:
    """Greedy decode of ``batch_size`` copies of a prompt: output tokens per second over
    ``steps`` decode steps (the prefill is not timed)."""
    import time

    total = len(prompt_ids) + steps + 1
    blocks_per_seq = -(-total // BLOCK_SIZE)
    cfg = model.config
    spec = KVCacheSpec(cfg.num_layers, batch_size * blocks_per_seq, BLOCK_SIZE, cfg.num_kv_heads,
                       cfg.head_dim, model.dtype)
    caches = device.allocate_kv_cache(spec)
    tables = [list(range(r * blocks_per_seq, (r + 1) * blocks_per_seq)) for r in range(batch_size)]
    items = [(str(r), prompt_ids, 0, tables[r], True) for r in range(batch_size)]
    last = _run(model, caches, items).argmax(-1).tolist()
    start = time.perf_counter()
    for step in range(steps):
        computed = len(prompt_ids) + step
        items = [(str(r), [last[r]], computed, tables[r], True) for r in range(batch_size)]
        last = _run(model, caches, items).argmax(-1).tolist()
    return batch_size * steps / (time.perf_counter() - start)


def _run(model, caches, items) -> torch.Tensor:
    batch = build_batch(items, BLOCK_SIZE)
    attn = batch.attention_metadata(model.device)
    hidden = model.forward(batch.token_ids, batch.positions, attn, caches)
    return model.compute_logits(hidden[batch.logits_indices])  # [R, V]
