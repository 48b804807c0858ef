"""The guard's figures over time (server/history.py), GET /checkpoints/{name}/guard/history, and the page's
live chart drawing them with the rule lines in headless Chromium (issue 15, section 5)."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from test_ui import browser, served  # noqa: F401 - the headless Chromium and `capguard serve` fixtures

from capguard.server.app import create_app
from capguard.server.guard import Guard, GuardSettings
from capguard.server.history import FIGURES, GuardHistory, rule_lines
from tests.test_server_batching import post


def test_history_keeps_a_point_every_n_captions_and_the_last_m():
    guard, history = Guard("demo", GuardSettings(window=10, min_captions=3)), GuardHistory(points=3, every=2)
    for i in range(9):
        history.add("demo", guard.observe(f"v{i}", "same caption" if i % 2 else f"caption {i}"))
    got = history.get("demo", guard.state().thresholds)
    assert [p["captions_seen"] for p in got["points"]] == [4, 6, 8]         # every 2nd, the last 3 kept
    assert got["points"][-1]["unique_ratio"] == pytest.approx(5 / 8) and got["figures"] == list(FIGURES)
    assert got["points"][-1]["status"] in {"ok", "collapsed"} and got["every"] == 2
    assert {r["figure"]: (r["kind"], r["value"]) for r in got["rules"]} == {
        "unique_ratio": ("min", 0.5), "near_unique_ratio": ("min", 0.5), "top_mode_share": ("max", 0.2),
        "grounding_r1": ("min", 0.1), "content_unique_ratio": ("min", 0.5), "degenerate_share": ("max", 0.1)}
    assert history.get("other", {})["points"] == [] and rule_lines({}) == []
    with pytest.raises(ValueError, match="must be >= 1"):
        GuardHistory(points=0)


def test_history_endpoint(server_settings, video_files):
    settings = server_settings(history_every=2, guard_min_captions=3, guard_window=10)
    with TestClient(create_app(settings)) as client:
        start = client.get("/checkpoints/demo/guard/history").json()
        assert [p["captions_seen"] for p in start["points"]] == [0]       # the restored (empty) window
        for clip in video_files[:4]:
            assert post(client, clip, max_new_tokens=2).status_code == 200
        got = client.get("/checkpoints/demo/guard/history").json()
        assert [p["captions_seen"] for p in got["points"]] == [0, 2, 4]
        last = got["points"][-1]
        assert last["window_captions"] == 4 and last["unique_ratio"] == client.get("/checkpoints/demo/guard").json()[
            "unique_ratio"]
        assert {r["figure"] for r in got["rules"]} == {"unique_ratio", "near_unique_ratio", "top_mode_share",
                                                      "grounding_r1", "content_unique_ratio", "degenerate_share"}
        assert "vendi_score" in last and last["degenerate_share"] is not None
        missing = client.get("/checkpoints/nothing/guard/history")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_checkpoint"
        idle = client.get("/checkpoints/runs/epoch-1/guard/history")
        assert idle.status_code == 404 and idle.json()["error"]["code"] == "checkpoint_not_loaded"
    with TestClient(create_app(settings)) as client:   # a restart: one point, from the restored window
        points = client.get("/checkpoints/demo/guard/history").json()["points"]
        assert len(points) == 1 and points[0]["window_captions"] == 4 and points[0]["captions_seen"] == 0


@pytest.mark.slow
def test_page_draws_the_guard_over_time_with_the_rule_lines(served, browser, video_files, tmp_path):  # noqa: F811
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = served
    for clip in video_files[:6]:
        files = {"video": (clip.name, clip.read_bytes(), "video/mp4"), "max_new_tokens": (None, "3")}
        assert httpx.post(f"{url}/caption", files=files, timeout=60).status_code == 200
    history = httpx.get(f"{url}/checkpoints/demo/guard/history").json()
    browser.get(f"{url}/")
    wait = WebDriverWait(browser, 60, poll_frequency=0.1)
    wait.until(lambda d: d.find_element("id", "guard-chart").get_attribute("data-points") == str(len(history["points"])))
    chart = browser.find_element("id", "guard-chart")
    lines = {e.get_attribute("data-figure"): e for e in chart.find_elements("css selector", "polyline.series")}
    assert {"unique_ratio", "near_unique_ratio", "top_mode_share", "siglip_mean", "content_unique_ratio",
            "degenerate_share"} <= set(lines)
    with_figure = [p for p in history["points"] if p["unique_ratio"] is not None]   # not the empty window's
    assert len(lines["unique_ratio"].get_attribute("points").split()) == len(with_figure) == 6
    rules = chart.find_elements("css selector", "line.rule")
    assert sorted(r.get_attribute("data-figure") for r in rules) == sorted(r["figure"] for r in history["rules"])
    unique_rule = next(r for r in rules if r.get_attribute("data-figure") == "unique_ratio")
    plot = chart.find_element("css selector", "rect.plot")
    top, height = float(plot.get_attribute("y")), float(plot.get_attribute("height"))
    assert float(unique_rule.get_attribute("y1")) == pytest.approx(top + 0.5 * height)   # the 0.5 line
    legend = [li.get_property("textContent") for li in browser.find_elements("css selector", "#chart-legend li")]
    assert "unique ratio (≥ 0.5)" in legend and "top mode share (≤ 0.2)" in legend

    # the form's decoding fields reach the server and the answer's decoding is shown
    browser.find_element("id", "do-sample").click()
    browser.find_element("id", "temperature").send_keys("1")
    browser.find_element("id", "seed").send_keys("5")
    browser.find_element("id", "video").send_keys(str(video_files[6].resolve()))
    browser.find_element("id", "submit").click()
    wait.until(lambda d: d.find_element("id", "result").get_attribute("data-state") in ("done", "error"))
    assert browser.find_element("id", "result").get_attribute("data-state") == "done", \
        browser.find_element("id", "error").get_property("textContent")
    assert browser.find_element("id", "result-decoding").get_property("textContent") == "sampled: temperature 1, seed 5"
    assert not browser.find_element("id", "result-fallback").is_displayed()
    shot = Path(os.environ.get("CAPGUARD_UI_SCREENSHOT") or tmp_path / "chart.png")
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
