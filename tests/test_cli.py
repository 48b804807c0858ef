"""The command line as a user runs it: init-checkpoint, then caption a PyAV-made mp4."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from videomaker import make_video

from capguard.server.cli import build_parser, main

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


@pytest.mark.parametrize("argv, flag", [
    (["caption", "x.mp4", "--num-frames", "0"], "--num-frames"),
    (["caption", "x.mp4", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["caption", "x.mp4", "--batch-size", "-1"], "--batch-size"),
    (["evaluate", "--checkpoints", "a", "--videos", "v", "--out", "o", "--num-frames", "0"], "--num-frames"),
    (["evaluate", "--checkpoints", "a", "--videos", "v", "--out", "o", "--max-new-tokens", "zero"], "--max-new-tokens"),
    (["train", "--data", "d", "--out", "o", "--threads", "0"], "--threads"),
    (["make-videos", "--out", "o", "--val", "-3"], "--val"),
])
def test_out_of_range_numbers_are_a_usage_error(argv, flag, capsys):
    """0 used to be replaced by the checkpoint's default through ``args.num_frames or ...``: now exit code 2."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and ("at least" in err or "not a number" in err), err


def test_explicit_numbers_reach_the_command():
    args = build_parser().parse_args(["caption", "x.mp4", "--num-frames", "1", "--max-new-tokens", "1"])
    assert (args.num_frames, args.max_new_tokens) == (1, 1)
    assert build_parser().parse_args(["caption", "x.mp4"]).num_frames is None   # None: the checkpoint's own
