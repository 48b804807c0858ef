"""Shared fixtures: tiny random-init checkpoints, small synthetic videos, server settings in a tmp dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def checkpoints_root(tmp_path_factory) -> Path:
    """A checkpoints_root with two servable stacks: "demo" (mlp2x_gelu) and "runs/epoch-1" (linear)."""
    from capguard.models.components import init_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    init_checkpoint(root / "demo", "mlp2x_gelu", seed=0)
    init_checkpoint(root / "runs" / "epoch-1", "linear", seed=1)
    return root


@pytest.fixture(scope="session")
def video_files(tmp_path_factory) -> list[Path]:
    """Eight small H.264 clips; clip i has 12 + 3i frames, so each one samples different frame indices."""
    from videomaker import make_video

    out = tmp_path_factory.mktemp("videos")
    return [Path(make_video(out / f"clip{i}.mp4", num_frames=12 + 3 * i, size=(64, 48))) for i in range(8)]


@pytest.fixture(scope="session")
def server_settings(tmp_path_factory, checkpoints_root):
    """make(**overrides) -> Settings for a test app: the tmp checkpoints, CPU, one decoder process and a
    fresh data dir per call (pass data_dir=... to reuse one, e.g. across a restart)."""
    from capguard.server.settings import Settings

    def make(**overrides) -> Settings:
        values = {"checkpoints_root": checkpoints_root, "default_checkpoint": "demo",
                  "data_dir": tmp_path_factory.mktemp("data"), "device": "cpu", "decode_workers": 1,
                  "decode_timeout_s": 20.0, "max_wait_ms": 5.0}
        return Settings(**{**values, **overrides})

    return make


from ray_fixtures import ray_cluster  # noqa: E402, F401 - one local Ray cluster per session for the tests marked ray
