"""Fixtures of the benchmark tests."""

from __future__ import annotations

import pytest

from portaserve.bench.datasets import load_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    """The real SmolLM2 tokenizer, via portaserve's fetch (cached for the session: the CLI
    test asks ``load_tokenizer("smollm2-135m")`` again and gets this one)."""
    return load_tokenizer("smollm2-135m")
