"""The tokenizer and chat template, built from the model itself; incremental detokenization.

``Tokenizer`` wraps a Hugging Face ``tokenizers.Tokenizer`` (the Rust library) built either from
a GGUF file's ``tokenizer.ggml.*`` metadata or from a folder's ``tokenizer.json`` +
``tokenizer_config.json``. It owns encode/decode, the special token ids (BOS, the EOS set,
every special id) and the chat template, rendered in a sandboxed jinja2 environment with the
variables Hugging Face templates expect.

GGUF vocabularies supported: ``gpt2`` (byte-level BPE with merges; the pre-tokenizer split is
chosen from ``tokenizer.ggml.pre``) and ``llama`` (SentencePiece BPE with byte fallback, merges
rebuilt from the token scores). Others raise ``ModelError``.

``IncrementalDetokenizer`` turns generated ids into text deltas as they arrive, holding back
bytes of a UTF-8 character split over several tokens (``tokenizers.decoders.DecodeStream``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from portaserve.errors import ModelError, RequestError

logger = logging.getLogger(__name__)

# llama.cpp token types (tokenizer.ggml.token_type)
_TYPE_NORMAL, _TYPE_UNKNOWN, _TYPE_CONTROL, _TYPE_USER_DEFINED, _TYPE_UNUSED, _TYPE_BYTE = (
    1, 2, 3, 4, 5, 6)

# Pre-tokenizer split regexes by ``tokenizer.ggml.pre`` (the patterns these vocabularies were
# trained with, as llama.cpp's llama-vocab lists them).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_BY_PRE = {
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}
# Byte-level vocabularies that split digits one by one before the GPT-2 pattern.
_DIGIT_PRES = {"smollm", "starcoder", "refact"}
_GPT2_PRES = {"default", "gpt2", "gpt-2", "olmo", "jais", "poro-chat"}

_FALLBACK_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n\n"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


class Tokenizer:
    """A model's tokenizer. Build with ``from_gguf_metadata``, ``from_hf_folder`` or
    ``load_tokenizer(path)``."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: Iterable[int],
        chat_template: str | None = None,
        name: str = "",
    ) -> None:
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos_token_ids))
        self.chat_template = chat_template
        self.name = name
        added = backend.get_added_tokens_decoder()  # id -> AddedToken
        self.all_special_ids: tuple[int, ...] = tuple(
            sorted(i for i, tok in added.items() if tok.special))
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], name: str = "") -> Tokenizer:
        """From a GGUF header's ``tokenizer.*`` keys (values as plain Python objects)."""
        kind = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if not tokens:
            raise ModelError(f"GGUF {name!r} has no tokenizer.ggml.tokens; cannot build a tokenizer",
                             field="model")
        types = list(meta.get("tokenizer.ggml.token_type") or [_TYPE_NORMAL] * len(tokens))
        if kind == "gpt2":
            backend = _gguf_byte_level_bpe(tokens, meta.get("tokenizer.ggml.merges") or [],
                                           meta.get("tokenizer.ggml.pre", "default"))
            add_bos_default = False
        elif kind == "llama":
            backend = _gguf_sentencepiece_bpe(tokens, meta.get("tokenizer.ggml.scores"), types,
                                              meta.get("tokenizer.ggml.add_space_prefix", True))
            add_bos_default = True
        else:
            raise ModelError(
                f"GGUF {name!r} has tokenizer model {kind!r}; supported tokenizer models are "
                "'gpt2' (byte-level BPE) and 'llama' (SentencePiece BPE)", field="model")
        _add_gguf_special_tokens(backend, tokens, types)
        bos = meta.get("tokenizer.ggml.bos_token_id")
        eos_ids = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                     "tokenizer.ggml.eom_token_id") if meta.get(k) is not None]
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default))
        add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
        _set_post_processor(backend, tokens, bos if add_bos else None,
                            eos_ids[0] if add_eos and eos_ids else None)
        return cls(backend, bos_token_id=bos, eos_token_ids=eos_ids,
                   chat_template=meta.get("tokenizer.chat_template"), name=name)

    @classmethod
    def from_hf_folder(cls, path: Path) -> Tokenizer:
        """From ``tokenizer.json`` + ``tokenizer_config.json`` (+ ``generation_config.json``)."""
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise ModelError(
                f"model folder {str(path)!r} has no tokenizer.json (a tokenizer.model-only "
                "SentencePiece folder is not supported; save it with a fast tokenizer first)",
                field="model")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as e:  # the Rust library raises a bare Exception on a bad file
            raise ModelError(f"cannot read {tok_file}: {e}", field="model") from e
        tok_config = _read_json(path / "tokenizer_config.json")
        config = _read_json(path / "config.json")
        gen_config = _read_json(path / "generation_config.json")

        def token_id(value: Any) -> int | None:
            if isinstance(value, dict):  # {"content": "<s>", ...}
                value = value.get("content")
            return backend.token_to_id(value) if isinstance(value, str) else None

        bos = token_id(tok_config.get("bos_token"))
        if bos is None:
            bos = gen_config.get("bos_token_id", config.get("bos_token_id"))
        eos_ids: list[int] = []
        for source in (gen_config.get("eos_token_id"), config.get("eos_token_id")):
            if isinstance(source, int):
                eos_ids.append(source)
            elif isinstance(source, list):
                eos_ids.extend(int(i) for i in source)
        eos_tok = token_id(tok_config.get("eos_token"))
        if eos_tok is not None:
            eos_ids.insert(0, eos_tok)
        template = tok_config.get("chat_template")
        jinja_file = path / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        return cls(backend, bos_token_id=bos, eos_token_ids=eos_ids, chat_template=template,
                   name=path.name)

    # -- text <-> ids -----------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        # A chat prompt already starts with the BOS text; do not add a second BOS.
        bos = self.bos_token_id
        if add_special_tokens and bos is not None and len(ids) > 1 and ids[0] == ids[1] == bos:
            ids = ids[1:]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    # -- chat -------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """Render a conversation with the model's template (a plain one if it has none).

        Extra keyword arguments (``tools``, ``documents``, ...) are passed to the template.
        Messages the template refuses raise ``RequestError(param="messages")``.
        """
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise RequestError("messages must be a list of {'role': ..., 'content': ...} dicts",
                               param="messages")
        template = _compile_template(self.chat_template or _FALLBACK_TEMPLATE)
        special = {
            "bos_token": self._token_text(self.bos_token_id),
            "eos_token": self._token_text(self.eos_token_ids[0] if self.eos_token_ids else None),
        }
        try:
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   **{**special, **kwargs})
        except (_TemplateError, jinja2.TemplateError) as e:
            raise RequestError(f"the chat template of {self.name or 'the model'} refused the "
                               f"messages: {e}", param="messages") from e

    def _token_text(self, token_id: int | None) -> str:
        if token_id is None:
            return ""
        return self.backend.id_to_token(token_id) or ""


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a local GGUF file or Hugging Face folder."""
    path = Path(path)
    if path.is_file():
        from portaserve.core.loaders.gguf import read_gguf_metadata

        return Tokenizer.from_gguf_metadata(read_gguf_metadata(path), name=path.name)
    return Tokenizer.from_hf_folder(path)


class IncrementalDetokenizer:
    """Text of generated tokens, delta by delta, never cutting a UTF-8 character in two.

    The prompt ids seed the decoder so the first generated token gets the right leading space.
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._stream = decoders.DecodeStream(ids=list(prompt_ids[-8:]),
                                             skip_special_tokens=skip_special_tokens)
        self.token_ids: list[int] = []
        self.text = ""

    def add(self, token_id: int) -> str:
        """Feed one generated id; returns the text it completes ("" while a character is open)."""
        self.token_ids.append(token_id)
        delta = self._stream.step(self.tokenizer.backend, token_id) or ""
        self.text += delta
        return delta


# --------------------------------------------------------------------------------------------
# GGUF vocabularies -> tokenizers.Tokenizer


def _gguf_byte_level_bpe(tokens: list[str], merges: list[str], pre: str) -> tokenizers.Tokenizer:
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = tokenizers.Tokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False))
    if pre in _SPLIT_BY_PRE:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT_BY_PRE[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    elif pre in _DIGIT_PRES:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    else:
        if pre not in _GPT2_PRES:
            logger.warning("unknown GGUF pre-tokenizer %r: splitting text as GPT-2 does", pre)
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return backend


def _gguf_sentencepiece_bpe(
    tokens: list[str], scores: list[float] | None, types: list[int], add_space_prefix: bool
) -> tokenizers.Tokenizer:
    vocab = {tok: i for i, tok in enumerate(tokens)}
    scores = list(scores) if scores is not None else [-float(i) for i in range(len(tokens))]
    # SentencePiece BPE stores no merges: every split of a normal token into two vocabulary
    # pieces is a merge, ranked by the merged token's score (best first).
    ranked: list[tuple[float, int, int, str, str]] = []
    for tok, i in vocab.items():
        if types[i] != _TYPE_NORMAL or len(tok) < 2:
            continue
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], vocab[left], vocab[right], left, right))
    ranked.sort()
    merges = [(left, right) for *_, left, right in ranked]
    unk_ids = [i for i, t in enumerate(types) if t == _TYPE_UNKNOWN]
    unk = tokens[unk_ids[0]] if unk_ids else None
    backend = tokenizers.Tokenizer(
        models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    steps = [normalizers.Replace(" ", "\u2581")]
    if add_space_prefix:
        steps.insert(0, normalizers.Prepend("\u2581"))
    backend.normalizer = normalizers.Sequence(steps)
    decode_steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        decode_steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(decode_steps)
    return backend


def _add_gguf_special_tokens(backend: tokenizers.Tokenizer, tokens: list[str],
                             types: list[int]) -> None:
    """Control and unknown tokens become special added tokens; user-defined ones plain added
    tokens (matched whole in text, as llama.cpp does)."""
    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i, t in enumerate(types) if t in (_TYPE_CONTROL, _TYPE_UNKNOWN)]
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(types) if t == _TYPE_USER_DEFINED]
    if special:
        backend.add_special_tokens(special)
    if user:
        backend.add_tokens(user)


def _set_post_processor(backend: tokenizers.Tokenizer, tokens: list[str], bos: int | None,
                        eos: int | None) -> None:
    if bos is None and eos is None:
        return
    pre = [tokens[bos]] if bos is not None else []
    post = [tokens[eos]] if eos is not None else []
    specials = [(tokens[i], i) for i in (bos, eos) if i is not None]
    backend.post_processor = processors.TemplateProcessing(
        single=" ".join([*pre, "$A", *post]),
        pair=" ".join([*pre, "$A", *post, "$B", *post]),
        special_tokens=list(dict.fromkeys(specials)),
    )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read {path}: {e}", field="model") from e


# --------------------------------------------------------------------------------------------
# Chat templates (sandboxed jinja2)


class _TemplateError(Exception):
    pass


def _raise_exception(message: str) -> None:
    raise _TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile_template(source: str) -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    globals_: dict[str, Callable[..., Any]] = {
        "raise_exception": _raise_exception, "strftime_now": _strftime_now}
    env.globals.update(globals_)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ModelError(f"the model's chat template does not compile: {e}",
                         field="chat_template") from e
