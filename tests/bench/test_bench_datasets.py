"""Benchmark datasets give the requested lengths, measured with the model's real tokenizer."""

from __future__ import annotations

import argparse
import json
from collections import Counter

import numpy as np
import pytest

from portaserve.bench.datasets import (
    build_dataset,
    prefix_repetition_dataset,
    random_dataset,
    sample_lengths,
    sharegpt_dataset,
)
from portaserve.errors import ConfigError


def test_random_fixed_lengths_are_exact(tokenizer):
    rng = np.random.default_rng()
    in_len, out_len, n = int(rng.integers(20, 200)), int(rng.integers(4, 64)), 6
    reqs = random_dataset(
        tokenizer,
        num_prompts=n,
        input_len=in_len,
        output_len=out_len,
        seed=int(rng.integers(1 << 30)),
    )
    assert len(reqs) == n
    assert len({r.prompt for r in reqs}) == n  # all different
    for r in reqs:
        assert r.prompt_len == in_len == len(tokenizer.encode(r.prompt))
        assert r.expected_output_len == out_len
        assert not set(tokenizer.encode(r.prompt)) & tokenizer.special_ids


def test_random_range_ratio_spreads_lengths(tokenizer):
    rng = np.random.default_rng()
    in_len, n = int(rng.integers(40, 120)), 12
    reqs = random_dataset(
        tokenizer,
        num_prompts=n,
        input_len=in_len,
        output_len=32,
        range_ratio=0.5,
        seed=int(rng.integers(1 << 30)),
    )
    lens = [r.prompt_len for r in reqs]
    assert all(in_len // 2 <= x <= in_len * 3 // 2 + 1 for x in lens)
    assert len(set(lens)) > 1
    assert all(r.prompt_len == len(tokenizer.encode(r.prompt)) for r in reqs)
    assert all(16 <= r.expected_output_len <= 48 for r in reqs)


def test_sample_lengths_semantics():
    rng = np.random.default_rng()
    lens = sample_lengths(rng, 1000, 0.2, 5000)
    assert lens.min() >= 800 and lens.max() <= 1200
    assert lens.mean() == pytest.approx(1000, rel=0.02)
    assert (sample_lengths(rng, 77, 0.0, 10) == 77).all()
    with pytest.raises(ConfigError, match="range-ratio"):
        sample_lengths(rng, 10, 1.0, 3)


def test_prefix_repetition_shares_prefixes(tokenizer):
    rng = np.random.default_rng()
    prefix_len, suffix_len, num_prefixes = int(rng.integers(30, 60)), int(rng.integers(8, 20)), 3
    reqs = prefix_repetition_dataset(
        tokenizer,
        num_prompts=9,
        prefix_len=prefix_len,
        suffix_len=suffix_len,
        num_prefixes=num_prefixes,
        output_len=7,
        seed=int(rng.integers(1 << 30)),
    )
    assert len(reqs) == 9
    ids = [tokenizer.encode(r.prompt) for r in reqs]
    heads = Counter(tuple(x[: prefix_len - 2]) for x in ids)
    assert sorted(heads.values()) == [3, 3, 3]
    for r, x in zip(reqs, ids, strict=True):
        assert r.prompt_len == len(x)
        assert abs(r.prompt_len - (prefix_len + suffix_len)) <= 2  # merges at the seam
        assert r.expected_output_len == 7


def test_sharegpt_filters_and_counts(tokenizer, tmp_path):
    rng = np.random.default_rng()
    words = ["apple", "river", "stone", "cloud", "music", "light", "paper", "green"]

    def text(n):
        return " ".join(rng.choice(words, size=n))

    convs = [
        {
            "conversations": [
                {"from": "human", "value": text(int(rng.integers(6, 30)))},
                {"from": "gpt", "value": text(int(rng.integers(6, 30)))},
            ]
        }
        for _ in range(5)
    ]
    convs.append(
        {
            "conversations": [
                {"from": "human", "value": "hi"},  # prompt < 4 tokens
                {"from": "gpt", "value": text(10)},
            ]
        }
    )
    convs.append(
        {
            "conversations": [
                {"from": "human", "value": text(1100)},  # prompt > 1024
                {"from": "gpt", "value": text(10)},
            ]
        }
    )
    convs.append({"conversations": [{"from": "human", "value": text(8)}]})  # one turn
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(convs))
    reqs = sharegpt_dataset(tokenizer, path, num_prompts=100, seed=1)
    assert len(reqs) == 5
    expected = {c["conversations"][0]["value"]: c["conversations"][1]["value"] for c in convs[:5]}
    for r in reqs:
        assert r.prompt_len == len(tokenizer.encode(r.prompt))
        assert r.expected_output_len == len(tokenizer.encode(expected[r.prompt]))
    fixed = sharegpt_dataset(tokenizer, path, num_prompts=3, output_len=11, seed=2)
    assert len(fixed) == 3 and {r.expected_output_len for r in fixed} == {11}


def test_build_dataset_needs_a_tokenizer():
    args = argparse.Namespace(dataset_name="random")
    with pytest.raises(ConfigError, match="tokenizer") as e:
        build_dataset(args, None)
    assert e.value.field == "tokenizer"
