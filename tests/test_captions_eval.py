"""Caption files from any pipeline: the field report's run comes back collapsed, a healthy file does not,
the shipped scorer scores rows that name videos, and every kind of bad file is one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from capguard.models.captions_file import CaptionsFileError, parse_captions, read_captions_file
from capguard.models.evaluate.captions import evaluate_captions
from capguard.server.cli import main

REPO = Path(__file__).resolve().parent.parent
VAL = REPO / "samples" / "val" / "val.jsonl"

# The field report's C-Abstractor run (docs/field-report.en.md): unique captions of 97 per
# epoch, and run E5-v3's SigLIP means.
FIELD_REPORT = [(1, 9, 0.24), (2, 6, 0.23), (3, 4, 0.34), (4, 1, 0.13), (5, 4, 0.04), (6, 6, 0.00)]
GENERIC = [  # generic Korean captions of the kind the report quotes; distinct from one another
    "1970년대 후반에 촬영된 것으로 보이는 도시의 건물 풍경",
    "도심의 한 블록을 보여주는 영상",
    "2017년 이후에 촬영된 건물의 모습",
    "도시의 한 건물을 중심으로 한 영상",
    "맑고 화창한 낮의 도시 풍경",
    "맑고 화창한 낮의 도시 광경을 담은 장면",
    "회색 건물들이 늘어선 거리",
    "높은 빌딩과 나무가 있는 도심",
    "하늘 아래 서 있는 여러 층의 건물",
]


def field_report_files(directory: Path) -> list[Path]:
    """Six caption files, one per epoch: k generic captions spread over the 97 videos, the epoch's SigLIP
    mean as every row's given score."""
    ids = [json.loads(line)["id"] for line in VAL.read_text(encoding="utf-8").splitlines()]
    assert len(ids) == 97
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for epoch, unique, siglip in FIELD_REPORT:
        captions = GENERIC[(epoch - 1) % 3:][:unique] if unique <= 6 else GENERIC[:unique]
        rows = [{"video": vid, "caption": captions[i % unique], "siglip": siglip} for i, vid in enumerate(ids)]
        path = directory / f"epoch-{epoch}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        paths.append(path)
    return paths


def test_field_report_run_is_collapsed_every_epoch_and_warned(tmp_path):
    paths = field_report_files(tmp_path / "run")
    report = evaluate_captions(paths, tmp_path / "out")
    rows = {r["name"]: r for r in report["checkpoints"]}
    assert [r["name"] for r in report["checkpoints"]] == [f"epoch-{e}" for e, _, _ in FIELD_REPORT]
    assert [rows[f"epoch-{e}"]["unique"] for e, _, _ in FIELD_REPORT] == [9, 6, 4, 1, 4, 6]
    assert [round(rows[f"epoch-{e}"]["siglip_mean"], 2) for e, _, _ in FIELD_REPORT] == [s for *_, s in FIELD_REPORT]
    assert report["verdicts"] == {f"epoch-{e}": "collapsed" for e, _, _ in FIELD_REPORT}
    assert all("unique_ratio" in r["tripped"] for r in report["checkpoints"])
    codes = [w["code"] for w in report["warnings"]]
    assert "siglip_up_diversity_down" in codes and "collapsed" in codes
    step = next(w for w in report["warnings"] if w["code"] == "siglip_up_diversity_down")
    assert "epoch-2 -> epoch-3" in step["message"]
    correlation = report["correlation"]["siglip_mean_vs_diversity"]
    assert correlation["n"] == 6 and correlation["rho"] is not None
    assert all(r["siglip_source"] == "file" and r["grounding_r1"] is None for r in report["checkpoints"])
    written = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert written["verdicts"] == report["verdicts"]
    html = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert html.count('class="bar"') == 6 and "SigLIP rose while diversity fell" in html
    assert len((tmp_path / "out" / "captions.jsonl").read_text(encoding="utf-8").splitlines()) == 6 * 97


def test_healthy_file_is_not_flagged(tmp_path):
    rows = [json.loads(line) for line in VAL.read_text(encoding="utf-8").splitlines()]
    path = tmp_path / "references.jsonl"
    path.write_text("".join(json.dumps({"video": r["id"], "caption": r["caption_ko"]}, ensure_ascii=False) + "\n"
                            for r in rows), encoding="utf-8")
    report = evaluate_captions([path], tmp_path / "out", scorer="none")
    assert report["verdicts"] == {"references": "ok"}
    assert report["checkpoints"][0]["unique"] == 96
    assert not [w for w in report["warnings"] if w["code"] == "collapsed"]


@pytest.mark.slow
def test_rows_with_videos_are_scored_by_the_shipped_scorer(tmp_path):
    """12 validation videos: their reference captions ground (R@1 well above chance 1/12) and get SigLIP;
    one caption for all 12 grounds none. Paths relative to --videos."""
    rows = [json.loads(line) for line in VAL.read_text(encoding="utf-8").splitlines()][:12]
    good, generic = tmp_path / "good.jsonl", tmp_path / "generic.jsonl"
    good.write_text("".join(json.dumps({"video": r["id"], "caption": r["caption_ko"], "video_path": r["path"],
                                        "reference": r["caption_ko"]}, ensure_ascii=False) + "\n"
                            for r in rows), encoding="utf-8")
    generic.write_text("".join(json.dumps({"video": r["id"], "caption": GENERIC[4], "video_path": r["path"]},
                                          ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    code = main(["evaluate", "--captions", str(good), str(generic), "--videos", str(VAL.parent),
                 "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert code == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    good_row, generic_row = report["checkpoints"]
    assert good_row["grounding_r1"] >= 0.5 and good_row["siglip_mean"] is not None
    assert generic_row["grounding_r1"] == 0.0 and generic_row["status"] == "collapsed"
    assert good_row["siglip_source"].startswith("scorer") and good_row["status"] == "ok"
    assert good_row["chrf"] == pytest.approx(100.0)
    # fewer than 3 files: no ±1.00 correlation
    assert report["correlation"]["siglip_mean_vs_diversity"]["rho"] is None


BAD = [
    ("not-jsonl", b'[{"video": "a", "caption": "x"}]\n', "not_jsonl", 1),
    ("csv", b'video,caption\na,x\n', "not_jsonl", 1),
    ("missing-caption", b'{"video": "a", "caption": "x"}\n{"video": "b"}\n', "missing_field", 2),
    ("caption-number", b'{"video": "a", "caption": 3}\n', "wrong_type", 1),
    ("siglip-string", b'{"video": "a", "caption": "x", "siglip": "0.3"}\n', "wrong_type", 1),
    ("siglip-nan", b'{"video": "a", "caption": "x", "siglip": NaN}\n', "wrong_type", 1),
    ("video-bool", b'{"video": true, "caption": "x"}\n', "wrong_type", 1),
    ("duplicate", b'{"video": "a", "caption": "x"}\n\n{"video": "a", "caption": "y"}\n', "duplicate_video", 3),
    ("empty", b"\n \n", "empty", None),
    ("latin-1", '{"video": "a", "caption": "caf\u00e9"}\n'.encode("latin-1"), "not_utf8", 1),
]


@pytest.mark.parametrize(("name", "data", "code", "line"), BAD, ids=[b[0] for b in BAD])
def test_bad_files_name_file_and_line(tmp_path, capsys, name, data, code, line):
    path = tmp_path / f"{name}.jsonl"
    path.write_bytes(data)
    with pytest.raises(CaptionsFileError) as info:
        read_captions_file(path)
    assert info.value.code == code and info.value.line == line
    assert str(info.value).startswith(f"{path}:{line}:" if line else f"{path}:")
    ok = tmp_path / "ok.jsonl"
    ok.write_text('{"video": "a", "caption": "x"}\n', encoding="utf-8")
    assert main(["evaluate", "--captions", str(ok), str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and err.count("\n") == 1
    assert not (tmp_path / "out" / "report.json").exists()   # checked before anything is written


def test_limits_and_unknown_fields():
    with pytest.raises(CaptionsFileError) as info:
        parse_captions(b'{"video": "a", "caption": "x"}\n' * 3, source="up.jsonl", name="up", max_bytes=40)
    assert info.value.code == "too_large"
    with pytest.raises(CaptionsFileError) as info:
        parse_captions(b'{"video": "a", "caption": "x"}\n{"video": "b", "caption": "y"}\n', source="up.jsonl",
                       name="up", max_rows=1)
    assert info.value.code == "too_large" and info.value.line == 2
    parsed = parse_captions('{"video": 7, "caption": "낮", "step": 120, "video_path": "a.mp4"}\n'.encode(),
                            source="up.jsonl", name="up")
    row = parsed.rows[0]
    assert (row.video, row.caption, row.siglip, row.video_path) == ("7", "낮", None, None)   # upload: no paths


def test_partial_video_paths_are_warned_not_scored(tmp_path):
    path = tmp_path / "half.jsonl"
    path.write_text('{"video": "a", "caption": "x", "video_path": "a.mp4"}\n{"video": "b", "caption": "y"}\n')
    report = evaluate_captions([path], tmp_path / "out", scorer="none")
    assert "partial_video_paths" in [w["code"] for w in report["warnings"]]
    assert report["checkpoints"][0]["grounding_r1"] is None


def test_missing_file_and_scorer_are_exit_2(tmp_path, capsys):
    assert main(["evaluate", "--captions", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "nope.jsonl" in capsys.readouterr().err
    ok = tmp_path / "ok.jsonl"
    ok.write_text('{"video": "a", "caption": "x", "video_path": "a.mp4"}\n', encoding="utf-8")
    assert main(["evaluate", "--captions", str(ok), "--scorer", str(tmp_path / "no-scorer"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "--scorer" in capsys.readouterr().err


def test_two_points_have_no_correlation(tmp_path):
    """Two files (or checkpoints) always rank-correlate +-1: the report says 'not meaningful' instead."""
    paths = field_report_files(tmp_path / "run")[1:3]            # epochs 2 and 3: SigLIP up, diversity down
    report = evaluate_captions(paths, tmp_path / "out")
    correlation = report["correlation"]["siglip_mean_vs_diversity"]
    assert correlation["rho"] is None and correlation["n"] == 2 and "not meaningful" in correlation["note"]
    codes = [w["code"] for w in report["warnings"]]
    assert "siglip_diversity_negative" not in codes and "siglip_up_diversity_down" in codes
    html = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "not meaningful with 2 checkpoint" in html and "-1.00" not in html
