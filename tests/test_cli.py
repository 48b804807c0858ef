"""The command line as a user runs it: init-checkpoint, then caption a PyAV-made mp4."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from videomaker import make_video

CLI = [sys.executable, "-m", "capguard.server.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, env=ENV)


@pytest.mark.slow   # a fresh interpreter (torch, transformers): 14-140 s on 2 busy cores
def test_init_checkpoint_then_caption_prints_json_lines(tmp_path):
    ckpt = tmp_path / "stack"
    made = run("init-checkpoint", str(ckpt), "--projector", "c-abstractor", "--options", '{"num_queries": 4}')
    assert made.returncode == 0, made.stderr
    assert (ckpt / "capguard.json").is_file()
    video = make_video(tmp_path / "clip.mp4", num_frames=40, fps=20)
    bad = tmp_path / "notes.txt"
    bad.write_text("not a video")
    result = run("caption", str(video), str(bad), "--checkpoint", str(ckpt), "--max-new-tokens", "5")
    assert result.returncode == 1          # one input failed: the exit status says so
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    by_video = {line["video"]: line for line in lines}
    ok = by_video[str(video)]
    assert isinstance(ok["caption"], str) and len(ok["fingerprint"]) == 64
    assert ok["frames"]["count"] == 8
    assert ok["frames"]["indices"] == [0, 6, 11, 17, 22, 28, 33, 39]      # linspace over 40 frames
    assert ok["frames"]["timestamps_s"][1] == 0.3                         # frame 6 at 20 fps
    assert 0 <= ok["scores"]["siglip"] <= 1
    assert set(ok["timings_ms"]) == {"encode", "generate", "score"}
    assert by_video[str(bad)]["error"]["code"] == "not_a_video"


@pytest.mark.slow   # a fresh interpreter (torch, transformers): 14-140 s on 2 busy cores
def test_bad_checkpoint_is_one_clear_line(tmp_path):
    result = run("caption", "x.mp4", "--checkpoint", str(tmp_path))
    assert result.returncode == 2
    assert "capguard.json is missing" in result.stderr and "Traceback" not in result.stderr
