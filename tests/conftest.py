"""Shared fixtures: tiny random-init checkpoints, small synthetic videos, server settings in a tmp dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from ray_local import ray_cluster  # noqa: F401 - one local Ray cluster per session, for the tests marked ray

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


@pytest.fixture(scope="session")
def projector_stacks(tmp_path_factory) -> dict[str, Path]:
    """{projector type: checkpoint dir}: one private random-init stack per projector type."""
    from capguard.models.components import init_checkpoint

    root = tmp_path_factory.mktemp("stacks")
    return {p: init_checkpoint(root / p, p, seed=1) for p in ("linear", "mlp2x_gelu", "c-abstractor")}


@pytest.fixture(scope="session")
def run_stacks(tmp_path_factory) -> dict[str, Path]:
    """A training run's layout: run/epoch-1 (mlp2x_gelu, its own encoder and LLM), run/epoch-2 (linear,
    sharing epoch-1's encoder/scorer and LLM by relative path, with its own guard section) and
    staging/epoch-3 (linear, private); "root" is the folder above them."""
    import json

    from capguard.models.components import TinySizes, init_checkpoint, write_checkpoint
    from capguard.models.config import ScorerConfig
    from capguard.models.projector import build_projector

    root = tmp_path_factory.mktemp("runs")
    first = init_checkpoint(root / "run" / "epoch-1", "mlp2x_gelu", seed=0)
    sizes = TinySizes()
    projector = build_projector("linear", sizes.vision_width, sizes.llm_hidden)
    # like a training epoch: its own projector, the encoder/scorer and LLM of another dir by relative path
    shared = ScorerConfig(path="../epoch-1/siglip", tokenizer="../epoch-1/siglip")
    second = write_checkpoint(root / "run" / "epoch-2", projector, "linear", "../epoch-1/siglip",
                              "../epoch-1/llm", scorer=shared)
    manifest = second / "capguard.json"   # its own guard section, as the server honours it
    config = {**json.loads(manifest.read_text()), "guard": {"near_dup_threshold": 0.98}}
    manifest.write_text(json.dumps(config))
    staged = init_checkpoint(root / "staging" / "epoch-3", "linear", seed=3)
    return {"first": first, "second": second, "staged": staged, "root": root}


@pytest.fixture(scope="module")
def app_overrides() -> dict:
    """Settings overrides for the module's `app`: a test module overrides this fixture to configure it."""
    return {}


@pytest.fixture(scope="module")
def app(server_settings, app_overrides):
    """One app per test module, built from server_settings(**app_overrides); not started (see `client`)."""
    from capguard.server.app import create_app

    return create_app(server_settings(**app_overrides))


@pytest.fixture(scope="module")
def client(app):
    """A TestClient that runs the app's lifespan (checkpoint loaded, decoders up) for the whole module."""
    from fastapi.testclient import TestClient

    with TestClient(app) as c:
        yield c


def error_of(response, status: int) -> dict:
    """The `error` object of a JSON error answer, after checking its status and the envelope
    {"error": {"code": ..., "message": non-empty}} that every error shares."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]
