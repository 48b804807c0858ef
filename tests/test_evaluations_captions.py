"""POST /evaluations with caption files: uploaded (multipart) or named under the datasets root.

Bad files are refused before anything is queued, with the file and line in the message; the jobs that
run (a child process each, so marked slow) give the same report as ``capguard evaluate --captions``.
"""

from __future__ import annotations

import shutil
import time

import pytest
from fastapi.testclient import TestClient
from test_captions_eval import FIELD_REPORT, field_report_files

from capguard.models.captions_file import write_captions_file
from capguard.server.app import create_app

ADMIN = "admin-secret"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
def root(tmp_path_factory, video_files):
    """A datasets root: run/epoch-N.jsonl (the field report's run), clips/ with 4 videos and clips.jsonl
    (caption rows naming them), escape.jsonl (a video_path out of the root)."""
    root = tmp_path_factory.mktemp("datasets")
    field_report_files(root / "run")
    shutil.copytree(video_files[0].parent, root / "clips")
    write_captions_file(root / "clips.jsonl", [{"video": f"c{i}", "caption": f"{i + 2}층 건물을 줌인한 영상",
                                                "video_path": f"clips/{clip.name}"}
                                               for i, clip in enumerate(video_files[:4])])
    write_captions_file(root / "escape.jsonl", [{"video": "a", "caption": "x", "video_path": "../x.mp4"}])
    return root


@pytest.fixture(scope="module")
def client(server_settings, root):
    app = create_app(server_settings(admin_token=ADMIN, datasets_root=root, evaluation_max_checkpoints=6,
                                     evaluation_max_videos=100, evaluation_max_captions_bytes=64 * 1024))
    with TestClient(app) as c:
        yield c


def upload(client, files: dict[str, bytes], **fields):
    parts = [("captions", (name, data, "application/x-ndjson")) for name, data in files.items()]
    return client.post("/evaluations", headers=AUTH, files=parts, data=fields)


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def wait(client, job_id: str, timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/evaluations/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


OK = b'{"video": "a", "caption": "x"}\n'
BAD_UPLOADS = [
    ({"e1.jsonl": OK, "e2.jsonl": b'{"video": "a", "caption": "x"}\n{"video": "b"}\n'}, 422, "bad_captions",
     "e2.jsonl:2:"),
    ({"e1.jsonl": b'{"video": "a", "caption": "x"}\n{"video": "a", "caption": "y"}\n'}, 422, "bad_captions",
     "e1.jsonl:2: video 'a' again"),
    ({"e1.jsonl": b"video,caption\na,x\n"}, 422, "bad_captions", "e1.jsonl:1: not JSON"),
    ({"e1.jsonl": b""}, 422, "bad_captions", "no captions"),
    ({"../../etc/e1 x.jsonl": b'{"video": "a", "caption": 1}\n'}, 422, "bad_captions", "e1_x.jsonl:1:"),
    ({"big.jsonl": OK * 3000}, 413, "captions_too_large", "larger than"),
    ({f"e{i}.jsonl": OK for i in range(7)}, 422, "too_many_checkpoints", "7 caption files"),
]


@pytest.mark.parametrize(("files", "status", "code", "text"), BAD_UPLOADS,
                         ids=["missing", "duplicate", "csv", "empty", "path-name", "huge", "too-many"])
def test_bad_uploads_are_refused_before_queueing(client, files, status, code, text):
    before = len(client.get("/evaluations").json()["evaluations"])
    error = error_of(upload(client, files), status)
    assert error["code"] == code and text in error["message"]
    assert len(client.get("/evaluations").json()["evaluations"]) == before


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"captions": ["../outside.jsonl"]}, 422, "dataset_outside_root"),
    ({"captions": ["run/nope.jsonl"]}, 404, "unknown_dataset"),
    ({"captions": ["run"]}, 422, "bad_captions"),                    # a directory, not a file
    ({"captions": ["escape.jsonl"]}, 422, "dataset_outside_root"),   # its video_path leaves the root
    ({"captions": ["clips.jsonl"], "videos": "nope"}, 404, "unknown_dataset"),
    ({"captions": []}, 422, "invalid_request"),
    ({"captions": ["clips.jsonl"], "dataset": "x"}, 422, "invalid_request"),
])
def test_bad_named_files_are_refused(client, body, status, code):
    assert error_of(client.post("/evaluations", headers=AUTH, json=body), status)["code"] == code


def test_upload_needs_a_length_a_captions_field_and_the_token(client):
    assert error_of(client.post("/evaluations", files=[("captions", ("a.jsonl", OK))]), 401)
    assert "note" in error_of(upload(client, {"a.jsonl": OK}, note="x"), 422)["message"]     # unknown field
    response = client.post("/evaluations", headers=AUTH, files=[("video", ("a.mp4", b"x"))])
    assert error_of(response, 422)["code"] == "invalid_request"
    assert error_of(upload(client, {"a.jsonl": OK}, num_frames="999"), 422)["code"] == "invalid_request"
    assert error_of(client.post("/evaluations", headers={**AUTH, "content-type": "text/csv"}, content=b"a,b"),
                    415)["code"] == "unsupported_media_type"
    assert error_of(client.post("/evaluations", headers={**AUTH, "content-type": "application/json"},
                                content=b"{not json"), 400)["code"] == "bad_request"

    def chunks():
        yield b"--b\r\nContent-Disposition: form-data; name=\"captions\"; filename=\"a.jsonl\"\r\n\r\n" + OK
        yield b"\r\n--b--\r\n"
    response = client.post("/evaluations", headers={**AUTH, "content-type": "multipart/form-data; boundary=b"},
                           content=chunks())
    assert error_of(response, 411)["code"] == "length_required"


def test_openapi_documents_both_bodies(client):
    body = client.get("/openapi.json").json()["paths"]["/evaluations"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
    assert "captions" in body["multipart/form-data"]["schema"]["properties"]


@pytest.mark.slow
def test_uploaded_field_report_run_comes_back_collapsed(client, root):
    files = {p.name: p.read_bytes() for p in sorted((root / "run").glob("epoch-*.jsonl"))}
    response = upload(client, files)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["checkpoints"] == [f"epoch-{e}" for e, _, _ in FIELD_REPORT]
    assert job["progress"]["total"] == 6 * 97 and job["dataset"].startswith("uploaded: epoch-1.jsonl")
    job = wait(client, job["id"])
    assert job["status"] == "succeeded", job["error"]
    report = job["report"]
    assert report["verdicts"] == {f"epoch-{e}": "collapsed" for e, _, _ in FIELD_REPORT}
    assert "siglip_up_diversity_down" in [w["code"] for w in report["warnings"]]
    page = client.get(f"/evaluations/{job['id']}/report.html")
    assert page.status_code == 200 and page.text.count('class="bar"') == 6


@pytest.mark.slow
def test_named_files_with_videos_are_scored(client):
    response = client.post("/evaluations", headers=AUTH, json={"captions": ["clips.jsonl"], "num_frames": 4})
    assert response.status_code == 202, response.text
    job = wait(client, response.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    row = job["report"]["checkpoints"][0]
    assert row["name"] == "clips" and row["siglip_mean"] is not None and row["grounding_r1"] is not None
    assert row["siglip_source"].startswith("scorer")
