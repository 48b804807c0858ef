"""/metrics of a real app after real traffic: promtool-clean, and it carries every metric the alert
rules and the Grafana dashboard query."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from test_deploy import metric_names_in_deploy

from capguard.server.app import create_app


@pytest.fixture(scope="module")
def exposition(server_settings, video_files) -> str:
    with TestClient(create_app(server_settings())) as client:
        for clip in video_files[:2]:
            with clip.open("rb") as f:
                assert client.post("/caption", files={"video": (clip.name, f, "video/mp4")},
                                   data={"max_new_tokens": "3"}).status_code == 200
        client.post("/caption", files={"video": ("x.mp4", b"not a video", "video/mp4")})
        return client.get("/metrics").text


def sample_families(text: str) -> set[str]:
    """Families as PromQL names them: counters keep _total, histograms fold _bucket/_sum/_count."""
    names = set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name
            for suffix in ("_bucket", "_sum", "_count", "_created"):
                if family.type == "histogram" and name.endswith(suffix):
                    name = name.removesuffix(suffix)
            if not name.endswith("_created"):
                names.add(name)
    return names


def test_every_metric_used_by_alerts_and_dashboard_is_exposed(exposition):
    missing = metric_names_in_deploy() - sample_families(exposition)
    assert not missing, f"alerts/dashboard query metrics the server does not expose: {sorted(missing)}"


def test_guard_series_exist_per_checkpoint_from_the_start(exposition):
    families = {f.name: f for f in text_string_to_metric_families(exposition)}
    trips = {(s.labels["checkpoint"], s.labels["rule"]) for s in families["capguard_guard_trips"].samples
             if s.name.endswith("_total")}
    assert {("demo", r) for r in ("unique_ratio", "near_unique_ratio", "top_mode_share", "grounding_r1")} <= trips
    window = [s for s in families["capguard_window_captions"].samples if s.labels == {"checkpoint": "demo"}]
    assert window and window[0].value == 2


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool missing (.ci/run installs Debian's prometheus)")
def test_promtool_check_metrics_is_clean(exposition):
    result = subprocess.run(["promtool", "check", "metrics"], input=exposition, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), \
        result.stdout + result.stderr
