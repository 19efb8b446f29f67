"""A server process a benchmark starts: launched on a free local port, waited for until its health check
answers 200, its memory read from /proc, stopped at the end."""
from __future__ import annotations

import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from fromage.runtime.errors import FromageError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(name: str, url: str, timeout: float, health: str = "/health", exited=lambda: None) -> None:
    """Polls url + health until it answers 200 (connection refused while starting, 503 while loading);
    `exited` returns an error message once the process behind it is gone."""
    deadline = time.time() + timeout
    while True:
        if (gone := exited()) is not None:
            raise FromageError(gone)
        try:
            with urllib.request.urlopen(url + health, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.time() > deadline:
            raise FromageError(f"{name} at {url} did not answer 200 on {health} within {timeout:.0f} s")
        time.sleep(0.25)


class Server:
    def __init__(self, name: str, argv: list, port: int, log: Path | None = None, health: str = "/health",
                 timeout: float = 300):
        self.name, self.url = name, f"http://127.0.0.1:{port}"
        self.log = open(log, "w+b") if log else tempfile.TemporaryFile()
        self.proc = subprocess.Popen([str(a) for a in argv], stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_healthy(name, self.url, timeout, health, self._exited)
        except FromageError:
            self.close()
            raise

    def _exited(self) -> str | None:
        if self.proc.poll() is None:
            return None
        self.log.seek(0)
        return f"{self.name} exited (code {self.proc.returncode}): {self.log.read().decode(errors='replace')[-1500:]}"

    def memory_mb(self, field: str = "VmRSS") -> float | None:
        """Resident memory now (VmRSS) or at its peak (VmHWM)."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
