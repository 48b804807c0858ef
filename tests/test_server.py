"""The HTTP API on one app: every endpoint, every error path, crash and hang isolation of the decoder."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import error_of
from fastapi.testclient import TestClient
from fault_decoder import ABORT, HANG, OVERSIZE, SEGFAULT
from prometheus_client.parser import text_string_to_metric_families

from capguard.models.degenerate import degeneration
from capguard.models.video import sample_indices
from capguard.server.app import create_app
from capguard.server.checkpoints import Checkpoints
from capguard.server.errors import ApiError

ADMIN, METRICS = "admin-secret", "metrics-secret"
MAX_UPLOAD = 300_000     # bytes; the test clips are 5-15 kB
DECODE_TIMEOUT_S = 3.0   # the hang test waits this long


@pytest.fixture(scope="module")
def app_overrides():
    return {"decoder": "fault_decoder:decoder", "decode_workers": 2, "decode_timeout_s": DECODE_TIMEOUT_S,
            "admin_token": ADMIN, "metrics_token": METRICS, "max_upload_bytes": MAX_UPLOAD}


@pytest.fixture
def tmp_dir_empty(app):
    """After the test, no upload may be left in data_dir/tmp."""
    yield
    assert list((app.state.settings.data_dir / "tmp").iterdir()) == []


def post(client, content: bytes, filename: str = "clip.mp4", **fields):
    files = {"video": (filename, content, "application/octet-stream")}
    files.update({k: (None, str(v)) for k, v in fields.items()})
    return client.post("/caption", files=files)


def metric_samples(client) -> dict[tuple, float]:
    text = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS}"}).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


# ------------------------------------------------------------------------------------------- probes


def test_healthz_and_readyz(client):
    assert client.get("/healthz").json() == {"status": "alive"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    demo = next(c for c in client.get("/checkpoints").json()["checkpoints"] if c["name"] == "demo")
    assert ready.json() == {"status": "ready", "checkpoint": "demo", "fingerprint": demo["fingerprint"]}


# ------------------------------------------------------------------------------------------ caption


def test_caption_answers_with_every_field(client, video_files, tmp_dir_empty):
    data = video_files[2].read_bytes()   # 18 frames
    r = post(client, data)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"caption", "checkpoint", "fingerprint", "video_sha256", "frames", "scores", "guard",
                         "timings_ms", "degenerate", "decoding", "fallback", "finish_reason"}
    assert body["finish_reason"] in ("stop", "length")   # no stop_on_repetition asked
    # the tests' random-weight demo often loops: the answer says so, as the library judges the caption
    judged = degeneration(body["caption"])
    if judged is None:
        assert body["degenerate"] is None or body["degenerate"]["kind"] == "token_limit"
    else:
        assert body["degenerate"] | {"hit_token_limit": False} == judged.to_dict()
    assert body["checkpoint"] == "demo" and len(body["fingerprint"]) == 64
    assert body["video_sha256"] == hashlib.sha256(data).hexdigest()
    assert body["frames"]["count"] == 8 and body["frames"]["indices"] == sample_indices(18, 8)
    assert body["frames"]["timestamps_s"] == pytest.approx([i / 24 for i in sample_indices(18, 8)], abs=1e-3)
    assert 0.0 <= body["scores"]["siglip"] <= 1.0
    assert body["guard"]["status"] == "warming_up" and body["guard"]["window_captions"] >= 1
    # the typed guard payload keeps exactly the keys (and order) of GuardState.to_dict()
    live = client.app.state.capguard.guards.get("demo").state().to_dict()
    assert list(body["guard"]) == list(live)
    assert client.get("/checkpoints/demo/guard").json().keys() == live.keys()
    timings = body["timings_ms"]
    assert set(timings) == {"decode", "encode", "generate", "score", "total"}
    assert all(v >= 0 for v in timings.values()) and timings["total"] >= timings["decode"]


def test_caption_options_are_applied(client, video_files):
    cut = ("capguard_degenerate_captions_total", (("checkpoint", "demo"), ("kind", "token_limit")))
    before = metric_samples(client)
    r = post(client, video_files[0].read_bytes(), num_frames=3, max_new_tokens=2)
    assert r.status_code == 200, r.text
    assert r.json()["frames"]["indices"] == sample_indices(12, 3)
    after = metric_samples(client)
    tokens = ("capguard_generated_tokens_total", (("checkpoint", "demo"),))
    assert after[tokens] - before[tokens] == 2
    # 2 tokens of a demo caption: cut at the limit, said so in the answer and counted by kind
    assert r.json()["degenerate"] == {"kind": "token_limit", "period": 0, "repeats": 0.0, "coverage": 0.0,
                                      "text": "", "hit_token_limit": True}
    assert after[cut] - before[cut] == 1


def test_named_checkpoint_loads_lazily(client, video_files):
    listed = {c["name"]: c for c in client.get("/checkpoints").json()["checkpoints"]}
    assert set(listed) == {"demo", "runs/epoch-1"}
    assert listed["runs/epoch-1"]["loaded"] is False and listed["runs/epoch-1"]["projector_type"] == "linear"
    r = post(client, video_files[1].read_bytes(), checkpoint="runs/epoch-1", max_new_tokens=3)
    assert r.status_code == 200, r.text
    assert r.json()["checkpoint"] == "runs/epoch-1"
    listed = {c["name"]: c for c in client.get("/checkpoints").json()["checkpoints"]}
    assert listed["runs/epoch-1"]["loaded"] is True
    assert listed["runs/epoch-1"]["fingerprint"] == r.json()["fingerprint"] != listed["demo"]["fingerprint"]
    assert listed["runs/epoch-1"]["active"] is False and listed["demo"]["active"] is True


# ------------------------------------------------------------------------------------ upload errors


def test_empty_file(client, tmp_dir_empty):
    assert error_of(post(client, b""), 400)["code"] == "empty_upload"


def test_text_file(client, tmp_dir_empty):
    assert error_of(post(client, b"just some notes\n" * 50, "notes.txt"), 415)["code"] == "not_a_video"


def test_truncated_video(client, video_files, tmp_dir_empty):
    data = video_files[7].read_bytes()
    r = post(client, data[: len(data) // 2])
    assert r.status_code in (415, 422), r.text
    assert r.json()["error"]["code"] in ("not_a_video", "corrupt_video")
    assert "upload-" not in r.json()["error"]["message"]   # the temp file's path is not leaked


def test_oversized_upload_with_content_length(client, tmp_dir_empty):
    error = error_of(post(client, b"\0" * (MAX_UPLOAD + 1)), 413)
    assert error["code"] == "video_too_large"


def test_oversized_upload_is_stopped_while_streaming(client, tmp_dir_empty):
    """No Content-Length (chunked): the limit must be enforced as the bytes arrive."""
    boundary = "capguardtestboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"video\"; filename=\"big.mp4\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()

    def body():
        yield head
        for _ in range(40):              # 40 x 64 KiB = 2.5 MiB, far over the limit
            yield b"\0" * 65536
        yield f"\r\n--{boundary}--\r\n".encode()

    r = client.post("/caption", content=body(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert error_of(r, 413)["code"] == "video_too_large"


@pytest.mark.parametrize("limit, code", [({"max_pixels": 1000}, "resolution_too_large"),
                                         ({"max_duration_s": 0.1}, "duration_too_long"),
                                         ({"max_frames": 5}, "duration_too_long")])
def test_video_limits_answer_413(app, client, video_files, monkeypatch, limit, code, tmp_dir_empty):
    state = app.state.capguard
    monkeypatch.setattr(state, "limits", dataclasses.replace(state.limits, **limit))
    assert error_of(post(client, video_files[0].read_bytes()), 413)["code"] == code


def test_not_multipart(client):
    r = client.post("/caption", json={"video": "aGVsbG8="})
    assert error_of(r, 415)["code"] == "unsupported_media_type"


def test_truncated_multipart_body(client, video_files, tmp_dir_empty):
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"video\"; filename=\"a.mp4\"\r\n\r\n".encode()
            + video_files[0].read_bytes()[:1000])   # no closing boundary: the client stopped mid-upload
    r = client.post("/caption", content=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert error_of(r, 400)["code"] == "bad_multipart"


def test_missing_video_field(client):
    r = client.post("/caption", files={"checkpoint": (None, "demo")})
    error = error_of(r, 422)
    assert error["code"] == "invalid_request" and "video" in error["message"]


@pytest.mark.parametrize("field, value", [("num_frames", "0"), ("num_frames", "65"), ("num_frames", "eight"),
                                          ("max_new_tokens", "0"), ("max_new_tokens", "257"), ("nonsense", "1")])
def test_bad_form_fields(client, video_files, field, value, tmp_dir_empty):
    error = error_of(post(client, video_files[0].read_bytes(), **{field: value}), 422)
    assert error["code"] == "invalid_request" and field in error["message"]


@pytest.mark.parametrize("name", ["nope", "../demo", "runs/../demo", "runs/../../x", "/etc", ".hidden", "runs",
                                  "demo/siglip", "a/b/c"])
def test_unknown_or_escaping_checkpoint(client, video_files, name, tmp_dir_empty):
    error = error_of(post(client, video_files[0].read_bytes(), checkpoint=name), 404)
    assert error["code"] == "unknown_checkpoint"


def test_checkpoint_names_cannot_leave_the_root(tmp_path, checkpoints_root):
    """A symlink inside the root that points outside is neither listed nor servable."""
    root = tmp_path / "root"
    (root / "ok").mkdir(parents=True)
    (root / "ok" / "capguard.json").write_text("{}")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "capguard.json").write_text("{}")
    (root / "escape").symlink_to(outside)
    (root / "inside").symlink_to(root / "ok")
    checkpoints = Checkpoints(root, "ok", "cpu")
    assert checkpoints.names() == ["inside", "ok"]
    for name in ("escape", "../outside", "ok/..", "ok/../../outside", str(outside)):
        with pytest.raises(ApiError) as info:
            checkpoints.path(name)
        assert info.value.status == 404
    checkpoints.close()


# ------------------------------------------------------------------------------- decoder isolation


@pytest.mark.parametrize("magic", [SEGFAULT, ABORT], ids=["segfault", "abort"])
def test_crashing_decoder_does_not_take_the_server_down(client, video_files, magic, tmp_dir_empty):
    before = metric_samples(client).get(("capguard_decoder_restarts_total", (("reason", "crash"),)), 0)
    error = error_of(post(client, magic + b"\0" * 100), 422)
    assert error["code"] == "decoder_crashed" and ("SIGSEGV" if magic == SEGFAULT else "SIGABRT") in error["message"]
    for clip in video_files[:3]:         # both workers (the fresh one included) serve the next requests
        assert post(client, clip.read_bytes(), max_new_tokens=2).status_code == 200
    assert metric_samples(client)[("capguard_decoder_restarts_total", (("reason", "crash"),))] == before + 1
    assert client.get("/readyz").status_code == 200


def test_a_decoder_answering_more_than_asked_is_refused(client, video_files, tmp_dir_empty):
    error = error_of(post(client, OVERSIZE), 422)
    assert error["code"] == "decoder_crashed" and "nonsense" in error["message"]
    assert post(client, video_files[0].read_bytes(), max_new_tokens=2).status_code == 200


def test_hanging_decoder_times_out_with_504(app, client, video_files, tmp_dir_empty):
    decoder = app.state.capguard.decoder
    with ThreadPoolExecutor(1) as pool:
        hanging = pool.submit(post, client, HANG)
        deadline = time.monotonic() + DECODE_TIMEOUT_S
        while decoder.pending == 0 and time.monotonic() < deadline:   # the hang is in one decoder ...
            time.sleep(0.01)
        assert decoder.pending == 1
        # ... and the other decoder serves meanwhile
        assert post(client, video_files[3].read_bytes(), max_new_tokens=2).status_code == 200
        error = error_of(hanging.result(), 504)
    assert error["code"] == "decode_timeout"
    assert post(client, video_files[3].read_bytes(), max_new_tokens=2).status_code == 200
    assert metric_samples(client)[("capguard_decoder_restarts_total", (("reason", "timeout"),))] == 1


# ---------------------------------------------------------------------------------- admin and auth


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": ADMIN},
                                     {"Authorization": f"Basic {ADMIN}"}])
def test_activate_needs_the_admin_token(client, headers):
    error = error_of(client.post("/checkpoints/runs/epoch-1/activate", headers=headers), 401)
    assert error["code"] == "unauthorized"
    assert client.get("/readyz").json()["checkpoint"] == "demo"


def test_guard_payload_is_a_schema_in_openapi(client):
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert schemas["CaptionResponse"]["properties"]["guard"] == {"$ref": "#/components/schemas/GuardInfo"}
    assert {"status", "window_captions", "unique_ratio", "tripped", "modes", "thresholds", "content_unique_ratio",
            "vendi_score", "degenerate_share"} <= set(schemas["GuardInfo"]["properties"])
    assert schemas["DegenerateInfo"]["properties"]["kind"]["enum"] == ["repeated_sentence", "repeated_ngram",
                                                                       "token_limit", "repetition_stop"]
    guard_route = spec["paths"]["/checkpoints/{name}/guard"]["get"]["responses"]["200"]
    assert guard_route["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/GuardInfo"}


def test_admin_routes_need_a_token_on_a_network_bind(server_settings):
    """No CAPGUARD_ADMIN_TOKEN: admin routes answer 403 on 0.0.0.0 and stay open on a loopback bind."""
    settings = server_settings(host="0.0.0.0")
    with TestClient(create_app(settings)) as client:
        for method, path, body in [("post", "/checkpoints/demo/activate", None),
                                   ("post", "/evaluations", {"checkpoints": ["demo"], "dataset": "val"}),
                                   ("post", f"/evaluations/{'0' * 32}/cancel", None)]:
            error = error_of(client.request(method.upper(), path, json=body), 403)
            assert error["code"] == "admin_token_required" and "CAPGUARD_ADMIN_TOKEN" in error["message"]
        assert client.get("/checkpoints").status_code == 200   # reading stays open
        settings.host = "127.0.0.1"
        assert client.post("/checkpoints/demo/activate").status_code == 200


def test_kiwipiepy_warms_up_on_the_loader_thread_not_on_a_request(server_settings, monkeypatch):
    import capguard.server.state as state_module

    threads = []
    monkeypatch.setattr(state_module.semantic, "warm_up", lambda: threads.append(threading.current_thread().name))
    with TestClient(create_app(server_settings())) as client:
        assert client.get("/readyz").status_code == 200
    assert threads and all(name.startswith("capguard-load") for name in threads), threads


def test_activate_switches_the_default_checkpoint(client, video_files):
    auth = {"Authorization": f"Bearer {ADMIN}"}
    assert error_of(client.post("/checkpoints/nope/activate", headers=auth), 404)["code"] == "unknown_checkpoint"
    assert error_of(client.post("/checkpoints/../x/activate", headers=auth), 404)["code"] in ("unknown_checkpoint",
                                                                                               "not_found")
    r = client.post("/checkpoints/runs/epoch-1/activate", headers=auth)
    assert r.status_code == 200, r.text
    assert r.json()["active"] is True and r.json()["loaded"] is True and r.json()["name"] == "runs/epoch-1"
    try:
        assert client.get("/readyz").json()["checkpoint"] == "runs/epoch-1"
        assert post(client, video_files[4].read_bytes(), max_new_tokens=2).json()["checkpoint"] == "runs/epoch-1"
    finally:
        assert client.post("/checkpoints/demo/activate", headers=auth).status_code == 200
    assert post(client, video_files[4].read_bytes(), max_new_tokens=2).json()["checkpoint"] == "demo"


def test_metrics_need_their_token_and_follow_design(client, video_files):
    assert error_of(client.get("/metrics"), 401)["code"] == "unauthorized"
    assert error_of(client.get("/metrics", headers={"Authorization": f"Bearer {ADMIN}"}), 401)
    post(client, video_files[5].read_bytes(), max_new_tokens=2)
    text = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS}"}).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    design = {"requests": "counter", "captions": "counter", "guard_trips": "counter", "generated_tokens": "counter",
              "stage_duration_seconds": "histogram", "request_duration_seconds": "histogram",
              "siglip_score": "histogram", "batch_size": "histogram", "queue_depth": "gauge",
              **{f"window_{n}": "gauge" for n in ("captions", "unique_ratio", "near_unique_ratio", "top_mode_share",
                                                  "repeat_probability", "siglip_mean", "grounding_r1",
                                                  "content_unique_ratio", "vendi_score", "degenerate_share")},
              "collapse_flag": "gauge", "degenerate_captions": "counter"}
    for name, kind in design.items():
        assert families[f"capguard_{name}"].type == kind, name
    samples = metric_samples(client)
    assert samples[("capguard_requests_total", (("endpoint", "/caption"), ("status", "200")))] >= 1
    assert samples[("capguard_captions_total", (("checkpoint", "demo"),))] >= 1
    assert samples[("capguard_window_captions", (("checkpoint", "demo"),))] >= 1
    assert samples[("capguard_collapse_flag", (("checkpoint", "demo"),))] == 0
    assert samples[("capguard_window_content_unique_ratio", (("checkpoint", "demo"),))] > 0
    assert 0 <= samples[("capguard_window_degenerate_share", (("checkpoint", "demo"),))] <= 1
    # every kind's series exists from the load, at 0 until a caption of that kind
    assert {dict(k[1])["kind"] for k in samples if k[0] == "capguard_degenerate_captions_total"} == {
        "repeated_sentence", "repeated_ngram", "token_limit", "repetition_stop"}
    assert {dict(k[1]).get("stage") for k in samples if k[0] == "capguard_stage_duration_seconds_count"} == {
        "decode", "encode", "generate", "score"}
    # routes are labelled by template, never by the raw path (no per-name or per-video series)
    endpoints = {dict(k[1])["endpoint"].replace(":path}", "}") for k in samples if k[0] == "capguard_requests_total"}
    templates = {*client.app.openapi()["paths"], "/metrics", "unmatched"}   # /metrics is not in the schema
    assert "/caption" in endpoints and endpoints <= templates, endpoints - templates


# ----------------------------------------------------------------------------------- error shapes


def test_routing_errors_are_json(client):
    assert error_of(client.get("/no/such/thing"), 404)["code"] == "not_found"
    assert error_of(client.get("/caption"), 405)["code"] == "method_not_allowed"
    assert error_of(client.delete("/checkpoints"), 405)["code"] == "method_not_allowed"


def test_unexpected_errors_answer_json_500(app, client, video_files, monkeypatch):
    state = app.state.capguard

    async def broken(name):
        raise RuntimeError("boom")

    monkeypatch.setattr(state.checkpoints, "get", broken)
    raw = TestClient(app, raise_server_exceptions=False)   # shares the running app's state, no second lifespan
    error = error_of(post(raw, video_files[0].read_bytes()), 500)
    assert error["code"] == "internal_error" and "boom" not in error["message"]
    monkeypatch.undo()
    assert post(client, video_files[0].read_bytes(), max_new_tokens=2).status_code == 200


def test_decoders_run_at_the_configured_niceness(client, app):
    """Decoding yields the CPU to the event loop, the model thread and the engine (decode_nice, default 5)."""
    state = app.state.capguard
    workers = list(state.decoder._workers)
    assert workers and state.settings.decode_nice == 5
    assert {os.getpriority(os.PRIO_PROCESS, w.pid) - os.getpriority(os.PRIO_PROCESS, 0) for w in workers} == {5}
