"""Benchmark prompt sets: ``random``, ``prefix-repetition`` and ShareGPT-format JSON files.

Lengths follow ``vllm bench serve`` semantics: with ``--random-range-ratio r`` a length ``L``
is drawn uniformly from ``[L*(1-r), L*(1+r)]``, so ``r = 0`` gives fixed lengths. Synthetic
prompts are built from random non-special token ids, decoded to text and re-encoded until the
text encodes to exactly the requested number of tokens (the recorded ``prompt_len`` is the
measured one, never assumed).

The tokenizer is anything with ``encode(text) -> list[int]`` and ``decode(ids) -> str``
wrapped in :class:`BenchTokenizer`; :func:`load_tokenizer` finds the model's own.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from portaserve.errors import ConfigError

logger = logging.getLogger(__name__)

DATASET_NAMES = ("random", "prefix-repetition", "sharegpt")

#: ShareGPT filter of vLLM's benchmark (prompt and output token limits).
SHAREGPT_MIN_LEN = 4
SHAREGPT_MAX_PROMPT_LEN = 1024
SHAREGPT_MAX_TOTAL_LEN = 2048


@dataclass(slots=True)
class SampleRequest:
    """One benchmark request: the prompt text, its token count and the output length asked."""

    prompt: str
    prompt_len: int
    expected_output_len: int


class BenchTokenizer:
    """A thin adapter: ``encode`` without special tokens, ``decode``, and the usable id range.

    ``impl`` is a Hugging Face ``PreTrainedTokenizer``, a ``tokenizers.Tokenizer`` or
    portaserve's own tokenizer; all expose ``encode``/``decode`` with small differences that
    this class hides.
    """

    def __init__(self, impl: Any, name: str = "") -> None:
        self.impl = impl
        self.name = name or type(impl).__name__
        self.vocab_size = int(_vocab_size(impl))
        self.special_ids = frozenset(_special_ids(impl))

    def encode(self, text: str) -> list[int]:
        out = _call_encode(self.impl, text)
        ids = getattr(out, "ids", out)  # tokenizers.Encoding has .ids
        return [int(t) for t in ids]

    def decode(self, ids: list[int]) -> str:
        try:
            return self.impl.decode(list(ids), skip_special_tokens=True)
        except TypeError:
            return self.impl.decode(list(ids))

    def allowed_ids(self) -> np.ndarray:
        """Token ids usable in synthetic prompts: every id that is not special."""
        ids = np.arange(self.vocab_size, dtype=np.int64)
        if self.special_ids:
            ids = ids[~np.isin(ids, np.fromiter(self.special_ids, dtype=np.int64))]
        return ids


def _call_encode(impl: Any, text: str) -> Any:
    for kwargs in ({"add_special_tokens": False}, {"add_bos": False}):
        try:
            return impl.encode(text, **kwargs)
        except TypeError:
            continue
    return impl.encode(text)


def _vocab_size(impl: Any) -> int:
    for attr in ("vocab_size", "get_vocab_size"):
        value = getattr(impl, attr, None)
        if callable(value):
            value = value()
        if isinstance(value, int) and value > 0:
            return value
    return len(impl.get_vocab())


def _special_ids(impl: Any) -> set[int]:
    ids: set[int] = set()
    for attr in ("all_special_ids", "special_token_ids", "eos_token_ids"):
        value = getattr(impl, attr, None)
        if value:
            ids.update(int(i) for i in value)
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(impl, attr, None)
        if isinstance(value, int):
            ids.add(value)
    added = getattr(impl, "get_added_tokens_decoder", None)
    if callable(added):  # tokenizers.Tokenizer: ids of added (mostly special) tokens
        ids.update(int(i) for i, tok in added().items() if getattr(tok, "special", True))
    return ids


@functools.lru_cache(maxsize=8)
def load_tokenizer(spec: str) -> BenchTokenizer:
    """Load the tokenizer named by ``spec``: a ``tokenizer.json``, a folder, a ``.gguf`` file
    or a model name portaserve can resolve. Raises :class:`ConfigError` naming ``tokenizer``.
    Cached per ``spec`` (a tokenizer does not change once loaded).
    """
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".json":
        from tokenizers import Tokenizer

        return BenchTokenizer(Tokenizer.from_file(str(path)), name=str(path))
    if not path.exists():
        path = _resolve_model(spec)
    if path.is_dir() and (path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        return BenchTokenizer(Tokenizer.from_file(str(path / "tokenizer.json")), name=spec)
    own = _portaserve_tokenizer(path)
    if own is not None:
        return BenchTokenizer(own, name=spec)
    return BenchTokenizer(_hf_tokenizer(path), name=spec)


def _resolve_model(spec: str) -> Path:
    try:
        from portaserve.core.loaders.fetch import resolve_model
    except ImportError as e:
        raise ConfigError(
            f"tokenizer {spec!r} is not a local path and model fetching is unavailable",
            field="tokenizer",
        ) from e
    return Path(resolve_model(spec))


def _portaserve_tokenizer(path: Path) -> Any | None:
    try:
        from portaserve.core import tokenizer as tokenizer_module
    except ImportError:
        return None
    for factory in ("load_tokenizer", "from_path"):
        fn = getattr(tokenizer_module, factory, None) or getattr(
            getattr(tokenizer_module, "Tokenizer", None), factory, None
        )
        if callable(fn):
            return fn(path)
    return None


def _hf_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        if path.is_file() and path.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load a tokenizer from {path}: {e}", field="tokenizer") from e


# --------------------------------------------------------------------------- lengths and text


def sample_lengths(rng: np.random.Generator, length: int, range_ratio: float, n: int) -> np.ndarray:
    """``n`` lengths uniform on ``[L*(1-r), L*(1+r)]`` (vLLM semantics; ``r = 0`` is fixed)."""
    if not 0.0 <= range_ratio < 1.0:
        raise ConfigError(
            f"--random-range-ratio must be in [0, 1); got {range_ratio}", field="random_range_ratio"
        )
    if length < 1:
        raise ConfigError(f"length must be >= 1; got {length}", field="length")
    low = max(1, math.floor(length * (1.0 - range_ratio)))
    high = max(low, math.ceil(length * (1.0 + range_ratio)))
    return rng.integers(low, high + 1, size=n)  # [n]


def exact_length_text(
    tokenizer: BenchTokenizer, rng: np.random.Generator, allowed: np.ndarray, length: int
) -> tuple[str, int]:
    """Text of random tokens that re-encodes to ``length`` tokens (or as close as it gets).

    Returns the text and its measured token count.
    """
    ids = [int(t) for t in rng.choice(allowed, size=length)]
    text = tokenizer.decode(ids)
    for _ in range(16):
        ids = tokenizer.encode(text)
        if len(ids) == length:
            return text, length
        if len(ids) > length:
            ids = ids[:length]
        else:
            ids = ids + [int(t) for t in rng.choice(allowed, size=length - len(ids))]
        text = tokenizer.decode(ids)
    measured = len(tokenizer.encode(text))
    logger.debug("synthetic prompt has %d tokens instead of %d", measured, length)
    return text, measured


# --------------------------------------------------------------------------- datasets


def random_dataset(
    tokenizer: BenchTokenizer,
    *,
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float = 0.0,
    seed: int = 0,
) -> list[SampleRequest]:
    """``num_prompts`` prompts of random tokens with lengths as ``vllm bench serve`` draws them."""
    rng = np.random.default_rng(seed)
    input_lens = sample_lengths(rng, input_len, range_ratio, num_prompts)
    output_lens = sample_lengths(rng, output_len, range_ratio, num_prompts)
    allowed = tokenizer.allowed_ids()
    requests = []
    for in_len, out_len in zip(input_lens, output_lens, strict=True):
        text, measured = exact_length_text(tokenizer, rng, allowed, int(in_len))
        requests.append(SampleRequest(text, measured, int(out_len)))
    return requests


def prefix_repetition_dataset(
    tokenizer: BenchTokenizer,
    *,
    num_prompts: int,
    prefix_len: int,
    suffix_len: int,
    num_prefixes: int,
    output_len: int,
    seed: int = 0,
) -> list[SampleRequest]:
    """Prompts sharing ``num_prefixes`` random prefixes, each followed by its own suffix.

    ``num_prompts // num_prefixes`` prompts use each prefix; the list is shuffled with ``seed``.
    After the first request per prefix, a prefix cache can serve ``prefix/(prefix+suffix)``.
    """
    if num_prefixes < 1 or num_prompts < num_prefixes:
        raise ConfigError(
            f"--prefix-repetition-num-prefixes must be in [1, num_prompts={num_prompts}]; "
            f"got {num_prefixes}",
            field="prefix_repetition_num_prefixes",
        )
    rng = np.random.default_rng(seed)
    allowed = tokenizer.allowed_ids()
    requests = []
    for _ in range(num_prefixes):
        prefix, _ = exact_length_text(tokenizer, rng, allowed, prefix_len)
        for _ in range(num_prompts // num_prefixes):
            # tokens can merge across the seam: draw suffixes until prefix + suffix re-encodes
            # to exactly prefix_len + suffix_len tokens (or keep the closest of a few draws)
            best: tuple[int, str] | None = None
            for _ in range(8):
                suffix, _ = exact_length_text(tokenizer, rng, allowed, suffix_len)
                n = len(tokenizer.encode(prefix + suffix))
                if best is None or abs(n - prefix_len - suffix_len) < abs(best[0] - prefix_len - suffix_len):
                    best = (n, prefix + suffix)
                if n == prefix_len + suffix_len:
                    break
            assert best is not None
            requests.append(SampleRequest(best[1], best[0], output_len))
    order = rng.permutation(len(requests))
    return [requests[i] for i in order]


def sharegpt_dataset(
    tokenizer: BenchTokenizer,
    path: str | Path,
    *,
    num_prompts: int,
    output_len: int | None = None,
    seed: int = 0,
) -> list[SampleRequest]:
    """The first two turns of ShareGPT-format conversations, filtered as vLLM filters them.

    Output length is the token count of the recorded reply unless ``output_len`` is given.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read ShareGPT file {path}: {e}", field="dataset_path") from e
    if not isinstance(data, list):
        raise ConfigError(f"{path} must hold a JSON list of conversations", field="dataset_path")
    pairs = [
        (c["conversations"][0]["value"], c["conversations"][1]["value"])
        for c in data
        if isinstance(c, dict) and len(c.get("conversations") or []) >= 2
    ]
    order = np.random.default_rng(seed).permutation(len(pairs))
    requests: list[SampleRequest] = []
    for i in order:
        prompt, completion = pairs[i]
        prompt_len = len(tokenizer.encode(prompt))
        out_len = output_len if output_len is not None else len(tokenizer.encode(completion))
        if not _valid_sharegpt(prompt_len, out_len, fixed_output=output_len is not None):
            continue
        requests.append(SampleRequest(prompt, prompt_len, out_len))
        if len(requests) == num_prompts:
            break
    if len(requests) < num_prompts:
        logger.warning("%s gave only %d usable prompts of %d", path, len(requests), num_prompts)
    return requests


def _valid_sharegpt(prompt_len: int, output_len: int, *, fixed_output: bool) -> bool:
    if prompt_len < SHAREGPT_MIN_LEN or (not fixed_output and output_len < SHAREGPT_MIN_LEN):
        return False
    return (
        prompt_len <= SHAREGPT_MAX_PROMPT_LEN and prompt_len + output_len <= SHAREGPT_MAX_TOTAL_LEN
    )


def build_dataset(args: Any, tokenizer: BenchTokenizer | None) -> list[SampleRequest]:
    """The requests that the parsed ``bench serve`` arguments ask for."""
    if tokenizer is None:
        raise ConfigError(
            f"dataset {args.dataset_name!r} needs a tokenizer; pass --tokenizer", field="tokenizer"
        )
    name = args.dataset_name.replace("_", "-")
    if name == "random":
        return random_dataset(
            tokenizer,
            num_prompts=args.num_prompts,
            input_len=args.random_input_len,
            output_len=args.random_output_len,
            range_ratio=args.random_range_ratio,
            seed=args.seed,
        )
    if name == "prefix-repetition":
        return prefix_repetition_dataset(
            tokenizer,
            num_prompts=args.num_prompts,
            prefix_len=args.prefix_repetition_prefix_len,
            suffix_len=args.prefix_repetition_suffix_len,
            num_prefixes=args.prefix_repetition_num_prefixes,
            output_len=args.prefix_repetition_output_len,
            seed=args.seed,
        )
    if name == "sharegpt":
        if not args.dataset_path:
            raise ConfigError("--dataset-name sharegpt needs --dataset-path", field="dataset_path")
        return sharegpt_dataset(
            tokenizer,
            args.dataset_path,
            num_prompts=args.num_prompts,
            output_len=args.sharegpt_output_len,
            seed=args.seed,
        )
    raise ConfigError(
        f"--dataset-name must be one of {', '.join(DATASET_NAMES)}; got {args.dataset_name!r}",
        field="dataset_name",
    )
