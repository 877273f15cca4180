"""Start portaserve servers on 127.0.0.1 (a free port) in a subprocess, for the serve tests.

``start_server("fake", ...)`` runs ``run_server`` over the fake engine
(``run_fake_server.py``); ``start_server("real", ...)`` runs ``python -m portaserve.serve.cli
serve`` on the real engine and the embedded SmolLM2-135M model.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
API_KEY = "sk-portaserve-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    kind: str
    proc: subprocess.Popen
    port: int
    log_path: Path
    api_key: str | None
    model: str

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.kind} server exited with {self.proc.returncode}:\n{self.log()[-4000:]}"
                )
            try:
                if httpx.get(f"{self.base_url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.kind} server not ready in {timeout} s:\n{self.log()[-4000:]}")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(
    kind: str, *extra: str, api_key: str | None = API_KEY, timeout: float | None = None
) -> ServerProcess:
    port = free_port()
    log_path = Path(tempfile.mkstemp(prefix=f"portaserve-{kind}-", suffix=".log")[1])
    key_args = ["--api-key", api_key] if api_key else []
    if kind == "fake":
        cmd = [
            sys.executable,
            str(HERE / "run_fake_server.py"),
            "--port",
            str(port),
            *key_args,
            *extra,
        ]
        model = "fake-model"
    else:
        cmd = [
            sys.executable,
            "-m",
            "portaserve.serve.cli",
            "serve",
            "--device",
            "cpu",
            "--port",
            str(port),
            "--served-model-name",
            "smollm2",
            *key_args,
            *extra,
        ]
        model = "smollm2"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("PORTASERVE_API_KEY", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = ServerProcess(kind, proc, port, log_path, api_key, model)
    server.wait_ready(timeout or (30.0 if kind == "fake" else 240.0))
    return server


#: Engine flags of the shared real server: enough context and batch for the tests.
REAL_ARGS = (
    "--max-model-len",
    "1024",
    "--max-num-seqs",
    "40",
    "--num-kv-blocks",
    "256",
)
