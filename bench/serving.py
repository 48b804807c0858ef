"""Start `capguard serve` for a benchmark: a free loopback port and a wait for /readyz (bench_server, stress).

    port = free_port()
    process = subprocess.Popen([..., "serve", "--port", str(port), ...], stdout=log, ...)
    seconds = wait_ready(f"http://127.0.0.1:{port}", process, timeout_s=300, log_tail=lambda: "...")
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float = 300.0,
               log_tail: Callable[[], str] = lambda: "(see the server log)", poll_s: float = 0.25) -> float:
    """Poll {url}/readyz until it answers 200; the seconds it took. SystemExit (with the log's tail) when the
    process exits first or is not ready in timeout_s, in which case it is killed."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if process.poll() is not None:
            raise SystemExit(f"capguard serve exited ({process.returncode}); log:\n{log_tail()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        time.sleep(poll_s)
    process.kill()
    raise SystemExit(f"capguard serve not ready in {timeout_s:.0f} s; log:\n{log_tail()}")
