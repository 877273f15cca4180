"""The conditions a benchmark ran under (machine, device, model, dtype, versions, threads), and
the random token-id prompts the offline benchmarks share.

Every number portaserve prints about speed is printed next to these, so that a result can be
reproduced or compared with the right peer.
"""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np


def cpu_model_name() -> str:
    """``lscpu``'s model name (from /proc/cpuinfo), else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_conditions() -> dict[str, Any]:
    import torch

    from portaserve import __version__

    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "portaserve": __version__,
    }


def engine_conditions(llm: Any) -> dict[str, Any]:
    """Device, model and dtype of a :class:`portaserve.LLM`."""
    engine = llm.llm_engine
    mc = engine.model_config
    return {
        "device": engine.device_description,
        "model": engine.config.model,
        "architecture": mc.architecture,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "kv_cache_dtype": str(engine.kv_cache_dtype).removeprefix("torch."),
        "max_num_seqs": engine.scheduler.config.max_num_seqs
        if hasattr(engine.scheduler, "config")
        else engine.config.max_num_seqs,
        "kv_capacity_tokens": engine.kv_capacity_tokens,
    }


def print_conditions(title: str, conditions: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column("condition")
    table.add_column("value")
    for key, value in conditions.items():
        table.add_row(key, str(value))
    Console().print(table)


def random_token_prompts(llm: Any, num_prompts: int, input_len: int, seed: int) -> list[list[int]]:
    """``num_prompts`` lists of ``input_len`` random token ids (no special ids).

    Token ids skip tokenization, so lengths are exact; fresh seeds give prompts that share no
    prefix, so a prefix cache cannot shorten the work.
    """
    engine = llm.llm_engine
    vocab = engine.model_config.vocab_size
    special = set(getattr(engine.tokenizer, "eos_token_ids", ()) or ())
    bos = engine.model_config.bos_token_id
    if bos is not None:
        special.add(bos)
    rng = np.random.default_rng(seed)
    low = min(256, vocab // 2)  # stay clear of the control/byte tokens at the start
    prompts = []
    for _ in range(num_prompts):
        prompt: list[int] = []
        while len(prompt) < input_len:
            ids = rng.integers(low, vocab, size=input_len - len(prompt))  # [missing]
            prompt.extend(int(t) for t in ids if int(t) not in special)
        prompts.append(prompt)
    return prompts
