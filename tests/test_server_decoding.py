"""POST /caption decoding fields (validated, echoed, logged, reproducible by seed), the caption log's migration,
and collapse_policy=fallback saying what happened (issue 15, sections 1 and 4)."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess

import pytest
from fastapi.testclient import TestClient

from capguard.models.decoding import DecodingRequest
from capguard.models.evaluate import evaluate
from capguard.server.app import create_app
from capguard.server.cli import main
from capguard.server.storage import CaptionLog
from tests.test_server_batching import ADMIN, collapse_settings, force_one_caption, post, samples

BAD_FIELDS = [
    ({"temperature": "0.7"}, "temperature needs do_sample=true"),
    ({"do_sample": "true", "temperature": "0"}, "temperature must be > 0"),
    ({"do_sample": "true", "top_p": "1.5"}, "top_p must be > 0 and <= 1"),
    ({"do_sample": "true", "top_k": "-2"}, "top_k must be >= 0"),
    ({"num_beams": "64"}, "num_beams must be between 1 and 8"),
    ({"do_sample": "true", "num_beams": "2"}, "beam search keeps the likeliest"),
    ({"repetition_penalty": "-1"}, "repetition_penalty must be > 0"),
    ({"do_sample": "true", "seed": str(2**64)}, "seed must be between 0"),
    ({"do_sample": "maybe"}, "do_sample"),
    ({"top_k": "many", "do_sample": "true"}, "top_k"),
]


def test_bad_decoding_fields_are_422_that_say_why(server_settings, video_files):
    with TestClient(create_app(server_settings())) as client:
        for fields, needle in BAD_FIELDS:
            r = post(client, video_files[0], **fields)
            assert r.status_code == 422, (fields, r.text)
            assert needle in r.json()["error"]["message"], fields
        assert post(client, video_files[0], max_new_tokens=2).status_code == 200   # the server stays up


def test_decoding_is_echoed_logged_and_a_seed_reproduces(server_settings, video_files):
    settings = server_settings()
    with TestClient(create_app(settings)) as client:
        greedy = post(client, video_files[0], max_new_tokens=6).json()
        assert greedy["decoding"] == {"do_sample": False, "temperature": None, "top_p": None, "top_k": None,
                                      "num_beams": 1, "repetition_penalty": 1.0, "seed": None,
                                      "stop_on_repetition": False, "repetition_min_count": None,
                                      "repetition_min_pattern_size": None}
        assert greedy["fallback"] is None
        fields = {"do_sample": "true", "temperature": "1.5", "top_k": "50", "seed": "123", "max_new_tokens": 8}
        first = post(client, video_files[1], **fields).json()
        assert first["decoding"] == {"do_sample": True, "temperature": 1.5, "top_p": 1.0, "top_k": 50,
                                     "num_beams": 1, "repetition_penalty": 1.0, "seed": 123,
                                     "stop_on_repetition": False, "repetition_min_count": None,
                                     "repetition_min_pattern_size": None}
        again = post(client, video_files[1], **fields).json()
        assert again["caption"] == first["caption"]
        drawn = post(client, video_files[2], do_sample="true", max_new_tokens=4).json()["decoding"]["seed"]
        assert isinstance(drawn, int) and 0 <= drawn < 2**53        # a sampled caption always has its seed
        beams = post(client, video_files[3], num_beams=3, max_new_tokens=4).json()["decoding"]
        assert (beams["num_beams"], beams["do_sample"]) == (3, False)
    log = CaptionLog(settings.data_dir / "capguard.db")
    rows = log.recent("demo", 10)
    log.close()
    assert [r["decoding"]["seed"] for r in rows] == [None, 123, drawn, None]   # video 1 twice: its latest row
    assert rows[1]["decoding"]["max_new_tokens"] == 8 and rows[3]["decoding"]["num_beams"] == 3


def test_an_old_caption_log_gains_the_decoding_column(tmp_path):
    path = tmp_path / "capguard.db"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE captions (id INTEGER PRIMARY KEY AUTOINCREMENT, created_at REAL NOT NULL, "
                "checkpoint TEXT NOT NULL, fingerprint TEXT NOT NULL, video_sha256 TEXT NOT NULL, caption TEXT "
                "NOT NULL, num_tokens INTEGER NOT NULL, siglip REAL, text_emb BLOB, video_emb BLOB, timings TEXT "
                "NOT NULL)")
    old.execute("INSERT INTO captions (created_at, checkpoint, fingerprint, video_sha256, caption, num_tokens, "
                "timings) VALUES (1.0, 'demo', 'f', 'v', 'a caption', 2, '{}')")
    old.commit()
    old.close()
    log = CaptionLog(path)
    assert log.recent("demo", 5)[0]["decoding"] is None and log.recent("demo", 5)[0]["caption"] == "a caption"
    log.close()
    CaptionLog(path).close()   # a second open finds the column and adds nothing
    columns = [row[1] for row in sqlite3.connect(path).execute("PRAGMA table_info(captions)")]
    assert columns.count("decoding") == 1


def test_fallback_says_what_was_asked_and_why_and_counts_it(server_settings, video_files):
    with TestClient(create_app(collapse_settings(server_settings, "fallback"))) as client:
        auth = {"Authorization": f"Bearer {ADMIN}"}
        assert client.post("/checkpoints/runs/epoch-1/activate", headers=auth).status_code == 200
        force_one_caption(client, "runs/epoch-1")
        answers = [post(client, clip, max_new_tokens=2).json() for clip in video_files[:3]]
        assert [a["fallback"] for a in answers] == [None] * 3
        r = post(client, video_files[3], max_new_tokens=2).json()
        assert r["checkpoint"] == "demo"
        assert r["fallback"] == {"requested": "runs/epoch-1", "reason": answers[2]["guard"]["tripped"]}
        assert "unique_ratio" in r["fallback"]["reason"]
        post(client, video_files[4], max_new_tokens=2)
        counted = samples(client)
        assert counted[("capguard_fallbacks_total", (("requested", "runs/epoch-1"), ("served", "demo")))] == 2
        if shutil.which("promtool"):
            check = subprocess.run(["promtool", "check", "metrics"], input=client.get("/metrics").text,
                                   capture_output=True, text=True, timeout=60)
            assert check.returncode == 0, check.stdout + check.stderr
        assert json.loads(json.dumps(r))["guard"]["checkpoint"] == "demo"   # the guard shown is the server's


def test_cli_decoding_flags(checkpoints_root, video_files, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["caption", str(video_files[0]), "--temperature", "0.5"])
    assert exit_.value.code == 2 and "temperature needs do_sample=true" in capsys.readouterr().err
    argv = ["caption", str(video_files[0]), str(video_files[1]), "--checkpoint", str(checkpoints_root / "demo"),
            "--no-score", "--device", "cpu", "--max-new-tokens", "5", "--do-sample", "--seed", "9"]
    runs = []
    for _ in range(2):
        assert main(argv) == 0
        runs.append([json.loads(line) for line in capsys.readouterr().out.splitlines()])
    assert [r["decoding"]["seed"] for r in runs[0]] == [9, 9] and runs[0][0]["decoding"]["do_sample"] is True
    assert [r["caption"] for r in runs[0]] == [r["caption"] for r in runs[1]]


def test_evaluation_runs_decode_as_asked_and_reproducibly(checkpoints_root, video_files, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for clip in video_files[:3]:
        (videos / clip.name).write_bytes(clip.read_bytes())
    options = {"max_new_tokens": 4, "progress_bar": False, "references": "none", "device": "cpu",
               "decoding": DecodingRequest(do_sample=True, temperature=1.2, seed=2**64 - 2)}
    reports = [evaluate([checkpoints_root / "demo"], videos, tmp_path / f"out{k}", **options) for k in range(2)]
    assert reports[0]["run"]["decoding"] == {"do_sample": True, "temperature": 1.2, "seed": 2**64 - 2}
    rows = [[json.loads(line) for line in (tmp_path / f"out{k}" / "captions.jsonl").open()] for k in range(2)]
    assert [r["seed"] for r in rows[0]] == [2**64 - 2, 2**64 - 1, 0]    # video i: seed + i, mod 2**64
    assert [r["caption"] for r in rows[0]] == [r["caption"] for r in rows[1]]


def test_evaluation_jobs_take_decoding_fields(server_settings, tmp_path, video_files):
    root = tmp_path / "datasets"
    (root / "clips").mkdir(parents=True)
    (root / "clips" / "a.mp4").write_bytes(video_files[0].read_bytes())
    settings = server_settings(admin_token=ADMIN, datasets_root=root)
    auth = {"Authorization": f"Bearer {ADMIN}"}
    with TestClient(create_app(settings)) as client:
        body = {"checkpoints": ["demo"], "dataset": "clips"}
        r = client.post("/evaluations", json={**body, "temperature": 0.5}, headers=auth)
        assert r.status_code == 422 and "temperature needs do_sample=true" in r.json()["error"]["message"]
        r = client.post("/evaluations", json={**body, "do_sample": True, "num_beams": 2}, headers=auth)
        assert r.status_code == 422 and "num_beams=2 with do_sample=true" in r.json()["error"]["message"]
        r = client.post("/evaluations", json={**body, "do_sample": True, "top_k": 5, "max_new_tokens": 3},
                        headers=auth)
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["decoding"] == {"do_sample": True, "top_k": 5} and job["max_new_tokens"] == 3
        assert client.post(f"/evaluations/{job['id']}/cancel", headers=auth).status_code in (200, 409)
