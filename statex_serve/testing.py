"""Run a real ``statex-serve`` in a subprocess on a free loopback port (tests,
the bench, examples)::

    with ServerProcess(model_dir, "--max-num-seqs", "8") as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none")

Several servers start faster together: ``start_all([a, b])`` launches all,
then waits for each. ``penalized_greedy`` is the oracle of vLLM's sampling
penalties that both engines are tested against.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model_dir: str | Path, *args: str, env: dict[str, str] | None = None,
                 startup_timeout: float = 180.0):
        self.model_dir = str(model_dir)
        self.args = list(args)
        self.env = env
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = Path(tempfile.mkstemp(prefix="statex-serve-", suffix=".log")[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def launch(self) -> ServerProcess:
        cmd = [sys.executable, "-m", "statex_serve", "--model", self.model_dir, "--host", "127.0.0.1",
               "--port", str(self.port), *self.args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(self.env or {})}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        return self

    def wait_ready(self) -> ServerProcess:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"statex-serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"statex-serve did not become ready in {self.startup_timeout}s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self.launch().wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()
        self.log_path.unlink(missing_ok=True)


def start_all(servers: list[ServerProcess]) -> list[ServerProcess]:
    for s in servers:
        s.launch()
    try:
        for s in servers:
            s.wait_ready()
    except BaseException:
        for s in servers:
            s.stop()
        raise
    return servers


def penalized_greedy(model, prompt: list[int], max_tokens: int, presence=0.0, frequency=0.0, repetition=1.0):
    """Greedy decoding with vLLM's penalties written out per token (the oracle)."""
    import torch

    dev = model.device
    pools = model.allocate_state_pools(1)
    slots = torch.tensor([0], device=dev, dtype=torch.int32)
    logits = model.prefill(torch.tensor(prompt, device=dev), torch.tensor([0, len(prompt)], device=dev,
                                                                           dtype=torch.int32),
                           slots, torch.tensor([False], device=dev), pools)
    out: list[int] = []
    while True:
        row = logits[0].double().tolist()
        for t in range(len(row)):
            if t in prompt or t in out:
                row[t] = row[t] / repetition if row[t] > 0 else row[t] * repetition
            row[t] -= frequency * out.count(t) + presence * (t in out)
        out.append(max(range(len(row)), key=row.__getitem__))
        if len(out) == max_tokens:
            return out
        logits = model.decode(torch.tensor([out[-1]], device=dev), slots, pools)
