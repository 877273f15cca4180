"""The tokenizer built from the GGUF against transformers' tokenizer of the same file, chat
templates, and incremental detokenization across multi-byte characters."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from portaserve.core.tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer
from portaserve.errors import ModelError, RequestError

TEXTS = [
    "Hello, world!",
    "  leading spaces and trailing   ",
    "The year 2024 had 366 days; 3.14159 is pi.",
    "naïve café déjà vu — «quotes» and ‘curly’ ones",
    "日本語のテキストと中文文本，还有한국어도 있습니다.",
    "emoji: 🎉🚀👩‍👩‍👧‍👦 🇫🇷 and 🤗!",
    "code:\n\tdef f(x):\n\t\treturn x ** 2  # square\n",
    "<|im_start|>user\nhi<|im_end|>\n",
    "mixed\r\nline\rendings\n\n\nend",
    "Ünïcödé ⅓ ∑ ∞ ≈ ≠ ½ x² ⁿ",
]


@pytest.fixture(scope="module")
def tok(smollm_loaded: Any) -> Tokenizer:
    return smollm_loaded.tokenizer


def _digit_pieces(text: str) -> list[str]:
    """The text cut before and after every numeric character (tokenizers' Digits split)."""
    from tokenizers.pre_tokenizers import Digits

    return [piece for piece, _ in Digits(individual_digits=True).pre_tokenize_str(text)]


def test_encode_matches_transformers_on_the_same_gguf(tok: Tokenizer, hf_tokenizer: Any) -> None:
    for text in TEXTS:
        ours = tok.encode(text)
        if all(ch.isascii() or not ch.isnumeric() for ch in text):
            assert ours == hf_tokenizer.encode(text), text
        # The GGUF says pre-tokenizer "smollm": every numeric character is its own piece (as in
        # llama.cpp and the model's original tokenizer.json). transformers' GGUF conversion
        # skips that split, which only shows on non-ASCII numerals such as "⅓" (the vocabulary
        # has no multi-digit tokens); against transformers on each piece, all texts agree.
        expected = [i for piece in _digit_pieces(text) for i in hf_tokenizer.encode(piece)]
        assert ours == expected, text
        assert tok.decode(ours) == hf_tokenizer.decode(ours, skip_special_tokens=True), text
        assert tok.decode(ours, skip_special_tokens=False) == hf_tokenizer.decode(ours), text


def test_special_tokens_and_sizes_match_transformers(tok: Tokenizer, hf_tokenizer: Any) -> None:
    assert tok.bos_token_id == hf_tokenizer.bos_token_id == 1
    assert tok.eos_token_ids == (hf_tokenizer.eos_token_id,) == (2,)
    assert tok.vocab_size == len(hf_tokenizer) == 49152
    assert set(tok.all_special_ids) >= set(hf_tokenizer.all_special_ids)
    assert tok.encode("<|im_end|>") == [2]  # a control token stays whole
    assert tok.decode([1, 28, 2]) == tok.decode([28])  # special ids skipped by default


def test_chat_template_matches_transformers(tok: Tokenizer, hf_tokenizer: Any) -> None:
    conversations = [
        [{"role": "user", "content": "What is 2+2?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "日本?"}],
    ]
    for messages in conversations:
        for gen in (True, False):
            ours = tok.apply_chat_template(messages, add_generation_prompt=gen)
            theirs = hf_tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=gen)
            assert ours == theirs
    rendered = tok.apply_chat_template(conversations[0])
    assert rendered.endswith("<|im_start|>assistant\n")
    assert "What is 2+2?" in rendered


def test_plain_chat_template_when_the_model_has_none(tok: Tokenizer) -> None:
    bare = Tokenizer(tok.backend, bos_token_id=None, eos_token_ids=(2,), chat_template=None)
    text = bare.apply_chat_template([{"role": "user", "content": "hey there"}])
    assert text == "user: hey there\n\nassistant: "
    assert bare.apply_chat_template([{"role": "user", "content": "x"}],
                                    add_generation_prompt=False) == "user: x\n\n"


def test_chat_template_errors_are_request_errors(tok: Tokenizer) -> None:
    strict = Tokenizer(tok.backend, bos_token_id=None, eos_token_ids=(2,),
                       chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(RequestError, match="roles must alternate") as info:
        strict.apply_chat_template([{"role": "user", "content": "x"}])
    assert info.value.param == "messages"
    with pytest.raises(RequestError, match="messages"):
        tok.apply_chat_template("not a list")  # type: ignore[arg-type]
    # the sandbox refuses to reach into Python internals
    nosy = Tokenizer(tok.backend, bos_token_id=None, eos_token_ids=(2,),
                     chat_template="{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(RequestError, match="unsafe|not safely"):
        nosy.apply_chat_template([{"role": "user", "content": "x"}])
    broken = Tokenizer(tok.backend, bos_token_id=None, eos_token_ids=(2,),
                       chat_template="{% for m in messages %}")
    with pytest.raises(ModelError, match="does not compile"):
        broken.apply_chat_template([{"role": "user", "content": "x"}])


def _stream(tok: Tokenizer, prompt: list[int], ids: list[int], skip: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    deltas = [detok.add(i) for i in ids]
    assert detok.text == "".join(deltas)
    assert detok.token_ids == ids
    return deltas


def test_incremental_detokenization_equals_full_decoding(tok: Tokenizer) -> None:
    prompt = tok.encode("Answer:")
    for text in TEXTS:
        ids = tok.encode(text)
        deltas = _stream(tok, prompt, ids)
        assert "".join(deltas) == tok.decode(ids), text
        assert not any("\ufffd" in d for d in deltas), (text, deltas)


def test_incremental_detokenization_holds_back_split_characters(tok: Tokenizer) -> None:
    ids = tok.encode("🎉")
    assert len(ids) > 1  # the emoji's four bytes span several byte-level tokens
    deltas = _stream(tok, [], ids)
    assert deltas[:-1] == [""] * (len(ids) - 1)
    assert deltas[-1] == "🎉"


def test_incremental_detokenization_on_random_tokens(tok: Tokenizer) -> None:
    rng = random.Random(7)
    prompt = tok.encode("Start")
    normal = [i for i in range(200, tok.vocab_size)]
    for _ in range(5):
        ids = [rng.choice(normal) for _ in range(60)]
        deltas = _stream(tok, prompt, ids)
        text = "".join(deltas)
        full = tok.decode(ids)
        # random bytes may leave a character open at the end: everything before it matches
        assert full.startswith(text) and len(full) - len(text) <= 4


def test_incremental_detokenization_special_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("Hi") + [2]
    assert "".join(_stream(tok, [], ids, skip=True)) == "Hi"
    assert "".join(_stream(tok, [], ids, skip=False)) == "Hi<|im_end|>"


def test_load_tokenizer_from_gguf_and_from_folder(smollm_path: Path, hf_folder: Path,
                                                  tok: Tokenizer) -> None:
    from_gguf = load_tokenizer(smollm_path)
    from_folder = load_tokenizer(hf_folder)
    for other in (from_gguf, from_folder):
        assert other.encode(TEXTS[5]) == tok.encode(TEXTS[5])
        assert other.eos_token_ids == tok.eos_token_ids
        assert other.bos_token_id == tok.bos_token_id
        assert other.chat_template == tok.chat_template


def test_gguf_metadata_for_a_sentencepiece_vocabulary() -> None:
    # A small SentencePiece-style vocabulary: byte fallback, scores, BOS added by default.
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    words = ["\u2581", "h", "e", "l", "o", "w", "r", "d", "ll", "\u2581h", "\u2581w", "llo",
             "\u2581hello", "\u2581world", "or", "\u2581wor", "el", "\u2581he", "\u2581hel", "ld"]
    tokens = pieces + words
    types = [2, 3, 3] + [6] * 256 + [1] * len(words)
    scores = [0.0] * len(pieces) + [-float(i) for i in range(len(words))]
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    spm = Tokenizer.from_gguf_metadata(meta, name="tiny-spm")
    ids = spm.encode("hello world")
    assert ids[0] == 1
    assert [spm.id_to_token(i) for i in ids[1:]] == ["\u2581hello", "\u2581world"]
    assert spm.decode(ids) == "hello world"
    ids = spm.encode("hello é", add_special_tokens=False)  # é is not in the vocabulary
    assert spm.id_to_token(ids[-1]) == "<0xA9>" and spm.id_to_token(ids[-2]) == "<0xC3>"
    assert spm.decode(ids) == "hello é"
    deltas = _stream(spm, [1], ids)
    assert "".join(deltas) == "hello é" and "\ufffd" not in "".join(deltas)


def test_unsupported_gguf_tokenizer_model_is_named() -> None:
    meta = {"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["[PAD]", "a"]}
    with pytest.raises(ModelError, match=r"'bert'.*gpt2.*llama"):
        Tokenizer.from_gguf_metadata(meta, name="x.gguf")
