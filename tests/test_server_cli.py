"""`capguard serve` as a real process on a real port: an HTTP upload, and a caption that outlives kill -9."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from capguard.server.storage import CaptionLog


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def capguard_command() -> list[str]:
    script = Path(sys.executable).with_name("capguard")
    return [str(script)] if script.exists() else [sys.executable, "-m", "capguard.server.cli"]


def wait_ready(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"capguard serve exited with {process.returncode}:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"capguard serve was not ready within {timeout_s} s")


def start_serve(checkpoint: str, data_dir: Path, log: Path, **env: str) -> tuple[str, subprocess.Popen]:
    """`capguard serve --checkpoint CHECKPOINT` on a free port (CPU, one decoder, data in data_dir, output in
    log); extra CAPGUARD_* variables as keywords. Returns (url, process); callers wait_ready and stop it."""
    port = free_port()
    full_env = {**os.environ, "CAPGUARD_DATA_DIR": str(data_dir), "CAPGUARD_DEVICE": "cpu",
                "CAPGUARD_DECODE_WORKERS": "1", "HF_HUB_OFFLINE": "1", **env}
    with log.open("wb") as log_file:
        process = subprocess.Popen([*capguard_command(), "serve", "--port", str(port), "--checkpoint", checkpoint],
                                   env=full_env, stdout=log_file, stderr=subprocess.STDOUT)
    return f"http://127.0.0.1:{port}", process


@pytest.mark.slow
def test_serve_answers_a_real_upload_and_its_caption_survives_kill_9(checkpoints_root, video_files, tmp_path):
    server_log = tmp_path / "serve.log"
    url, process = start_serve(str(checkpoints_root / "demo"), tmp_path / "data", server_log)
    try:
        wait_ready(url, process, server_log)
        clip = video_files[4]
        with clip.open("rb") as f:
            r = httpx.post(f"{url}/caption", files={"video": (clip.name, f, "video/mp4")},
                           data={"max_new_tokens": "4"}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["checkpoint"] == "demo" and body["frames"]["count"] == 8
        assert httpx.get(f"{url}/checkpoints").json()["checkpoints"][0]["name"] == "demo"
        assert "capguard_captions_total" in httpx.get(f"{url}/metrics").text
        process.send_signal(signal.SIGKILL)       # no shutdown hook runs: the caption must already be on disk
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    log = CaptionLog(tmp_path / "data" / "capguard.db")
    rows = log.recent("demo", 10)
    log.close()
    assert [(row["video_sha256"], row["caption"]) for row in rows] == [(body["video_sha256"], body["caption"])]


@pytest.mark.slow   # a fresh `capguard serve` process importing torch and transformers: 7.6 s of make check's 85
def test_serve_refuses_a_missing_checkpoint(tmp_path):
    result = subprocess.run([*capguard_command(), "serve", "--checkpoint", str(tmp_path / "nothing")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "no checkpoint at" in result.stderr and "capguard.json" in result.stderr
