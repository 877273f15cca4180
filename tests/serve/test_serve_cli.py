"""`portaserve serve` flags: parsing, the EngineConfig they make, the API key's source."""

from __future__ import annotations

import random

import pytest

from portaserve.core.config import EngineConfig
from portaserve.errors import ConfigError
from portaserve.serve import cli, cmd_serve


def _parse(*argv: str):
    return cli.build_parser().parse_args(["serve", *argv])


def test_defaults_serve_the_embedded_model():
    args = _parse()
    assert args.func is cmd_serve.run
    assert (args.host, args.port, args.shutdown_timeout) == ("127.0.0.1", 8000, 30.0)
    config = cmd_serve.engine_config(args)
    assert config.model == "smollm2-135m" and config.enable_prefix_caching
    assert config.max_model_len is None and config.num_kv_blocks is None


def test_every_engine_flag_reaches_the_config():
    rng = random.Random()
    n = {k: rng.randint(1, 4096) for k in ("len", "seqs", "tokens", "blocks", "bs", "wait", "eo")}
    util = round(rng.uniform(0.1, 0.95), 3)
    args = _parse(
        "/models/x.gguf",
        "--device",
        "cpu",
        "--dtype",
        "bfloat16",
        "--max-model-len",
        str(n["len"]),
        "--max-num-seqs",
        str(n["seqs"]),
        "--max-num-batched-tokens",
        str(n["tokens"]),
        "--num-kv-blocks",
        str(n["blocks"]),
        "--block-size",
        str(n["bs"]),
        "--gpu-memory-utilization",
        str(util),
        "--no-enable-prefix-caching",
        "--scheduling-policy",
        "priority",
        "--expected-output-tokens",
        str(n["eo"]),
        "--max-waiting-requests",
        str(n["wait"]),
        "--seed",
        "7",
        "--port",
        "9123",
        "--served-model-name",
        "a",
        "b",
        "--shutdown-timeout",
        "2.5",
    )
    assert cmd_serve.engine_config(args) == EngineConfig(
        model="/models/x.gguf",
        device="cpu",
        dtype="bfloat16",
        max_model_len=n["len"],
        max_num_seqs=n["seqs"],
        max_num_batched_tokens=n["tokens"],
        num_kv_blocks=n["blocks"],
        block_size=n["bs"],
        memory_utilization=util,
        enable_prefix_caching=False,
        scheduling_policy="priority",
        expected_output_tokens=n["eo"],
        max_waiting_requests=n["wait"],
        seed=7,
    )
    assert (args.port, args.served_model_name, args.shutdown_timeout) == (9123, ["a", "b"], 2.5)
    assert cmd_serve.engine_config(_parse("--memory-utilization", "0.5")).memory_utilization == 0.5
    assert cmd_serve.engine_config(_parse()).expected_output_tokens is None  # vLLM's admission
    assert cmd_serve.engine_config(_parse("--expected-output-tokens", "1024")).expected_output_tokens == 1024
    assert cmd_serve.engine_config(_parse("--expected-output-tokens", "none")).expected_output_tokens is None
    with pytest.raises(SystemExit):
        _parse("--expected-output-tokens", "lots")
    with pytest.raises(ConfigError, match="expected_output_tokens.*-5") as err:
        cmd_serve.engine_config(_parse("--expected-output-tokens", "-5"))
    assert err.value.field == "expected_output_tokens"


def test_device_left_to_the_registry_unless_given(monkeypatch):
    monkeypatch.setenv("PORTASERVE_DEVICE", "cpu")  # read by the registry, which logs it
    assert cmd_serve.engine_config(_parse()).device is None
    assert cmd_serve.engine_config(_parse("--device", "cuda:1")).device == "cuda:1"


def test_api_key_flag_then_environment(monkeypatch):
    monkeypatch.delenv("PORTASERVE_API_KEY", raising=False)
    assert cmd_serve.api_key(_parse()) is None
    monkeypatch.setenv("PORTASERVE_API_KEY", "from-env")
    assert cmd_serve.api_key(_parse()) == "from-env"
    assert cmd_serve.api_key(_parse("--api-key", "from-flag")) == "from-flag"


@pytest.mark.parametrize(
    "flag,value",
    [("--max-num-seqs", "0"), ("--gpu-memory-utilization", "1.5"), ("--num-kv-blocks", "-3")],
)
def test_bad_flag_is_a_clear_error_before_loading(flag, value, capsys):
    assert cli.main(["serve", flag, value]) == 2
    err = capsys.readouterr().err
    assert "portaserve: error:" in err and value in err
