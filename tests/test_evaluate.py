"""Offline evaluation: hand-checked metrics, rows and warnings, the HTML page, real runs on tiny stacks."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from capguard.models.evaluate import (
    ROW_KEYS,
    build_report,
    caption_tokens,
    checkpoint_row,
    cider_d,
    evaluate,
    find_checkpoints,
    load_dataset,
    natural_key,
    rank_average,
    reference_metrics,
    spearman,
    watch,
)
from capguard.models.report import render_html

# ---------------------------------------------------------------------------------------------------
# Fixtures: run_stacks (conftest: a training run of tiny random-init stacks) and a
# 3-video make-videos manifest plus one file that is not a video.


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    from capguard.models.synth import make_dataset

    out = tmp_path_factory.mktemp("synth")
    paths = make_dataset(out, n_train=0, n_val=3, size=64, seconds=1, workers=1, progress=False)
    (out / "val" / "broken.mp4").write_text("not a video")
    with paths["val"].open("a", encoding="utf-8") as f:
        broken = {"id": "broken", "path": "val/broken.mp4", "caption_ko": "x", "caption_en": "x"}
        f.write(json.dumps(broken) + "\n")
    return paths["val"]


# ---------------------------------------------------------------------------------------------------
# Hand-written metrics


def test_rank_average_and_natural_order():
    assert rank_average([10, 20, 20, 30]).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert rank_average([3, 1, 2]).tolist() == [3.0, 1.0, 2.0]
    assert sorted(["epoch-10", "epoch-2", "epoch-1"], key=natural_key) == ["epoch-1", "epoch-2", "epoch-10"]


def test_spearman_against_hand_values():
    # ranks of y: [1, 2, 3.5, 5, 3.5]; centred x [-2..2], centred y [-2, -1, .5, 2, .5] -> 8 / sqrt(10 * 9.5)
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert spearman([1, 2, None, 3], [1, 2, 5, float("nan")]) == pytest.approx(1.0)   # incomplete pairs out
    assert math.isnan(spearman([1, 2, 3], [4, 4, 4]))      # a constant side has no ranking
    assert math.isnan(spearman([1], [2]))
    # The field report's run E5-v3: over all six epochs the rank correlation is weakly positive, hand value
    # 2 / sqrt(17.5 * 16.5); the trap shows between epochs 2 and 3 (see test_field_report_table).
    siglip = [0.24, 0.23, 0.34, 0.13, 0.04, 0.00]
    diversity = [0.09, 0.06, 0.04, 0.01, 0.04, 0.06]
    assert spearman(siglip, diversity) == pytest.approx(2 / math.sqrt(17.5 * 16.5))


def test_cider_d_against_hand_values():
    candidates = [["a", "b"], ["a", "c"]]
    references = [[["a", "b"]], [["c", "d"]]]
    # n=1, every word in one item's references: idf = log 2 for all. Item 1: same vector -> 10. Item 2: only
    # "c" shared: (log 2)^2 / ((sqrt 2 log 2) * (sqrt 2 log 2)) = 0.5 -> 5.
    mean, per_item = cider_d(candidates, references, n=1)
    assert per_item == pytest.approx([10.0, 5.0]) and mean == pytest.approx(7.5)
    # n=4: 3- and 4-grams do not exist (zero vectors score 0), bigrams: item 1 cosine 1, item 2 none shared
    # -> item 1 (1 + 1 + 0 + 0) / 4 * 10 = 5, item 2 (0.5 + 0 + 0 + 0) / 4 * 10 = 1.25.
    mean, per_item = cider_d(candidates, references)
    assert per_item == pytest.approx([5.0, 1.25]) and mean == pytest.approx(3.125)
    # length penalty: candidate 1 token shorter than its (otherwise identical-unigram) reference
    mean, per_item = cider_d([["a"], ["c"]], [[["a", "a"]], [["c"]]], n=1)
    assert per_item[0] == pytest.approx(10 * math.exp(-1 / 72))
    assert cider_d([], []) [1] == [] and math.isnan(cider_d([], [])[0])


def test_cider_d_matches_the_coco_toolkit():
    """Golden values from pycocoevalcap 1.2's cider_scorer on the same syllable-tokenized Korean captions."""
    candidates = ["낮, 홀로 선 빨간 문의 5층 베이지색 건물을 줌인한 영상", "밤, 나무 옆에 선 검은 문의 3층 회색 평지붕 건물",
                  "해질녘 한옥", "낮의 풍경"]
    references = ["낮, 홀로 선 빨간 문의 5층 베이지색 기와지붕 건물을 줌인한 영상",
                  "밤, 나무 옆에 선 검은 문의 2층 회색 평지붕 건물을 왼쪽으로 패닝한 영상",
                  "해질녘, 나무 옆에 선 빨간 문의 2층 갈색 기와지붕 한옥을 오른쪽으로 패닝한 영상",
                  "낮, 홀로 선 초록색 문의 단층 흰 평지붕 건물을 줌인한 영상"]
    mean, per_item = cider_d([caption_tokens(c, "ko") for c in candidates],
                             [[caption_tokens(r, "ko")] for r in references])
    assert mean == pytest.approx(2.152443636431704, rel=1e-9)
    assert per_item == pytest.approx([6.874168394980891, 1.734354136951115, 5.342183782287376e-05,
                                      0.001198591956986433], rel=1e-9)
    # English words, several references per item
    mean, _ = cider_d([["a", "grey", "building"], ["a", "red", "hanok", "at", "night"], ["a", "building"]],
                      [[["a", "grey", "building", "at", "night"], ["grey", "building"]],
                       [["a", "red", "hanok", "at", "sunset"]],
                       [["a", "blue", "building"], ["the", "building"]]])
    assert mean == pytest.approx(3.9378451966476358, rel=1e-9)


def test_reference_metrics():
    assert caption_tokens("낮의 풍경.", "ko") == ["낮", "의", "풍", "경"]
    assert caption_tokens("A grey building.", "en") == ["a", "grey", "building"]
    same = reference_metrics(["낮의 풍경", "밤의 건물"], ["낮의 풍경", "밤의 건물"], "ko")
    assert same["bleu"] == pytest.approx(100.0) and same["chrf"] == pytest.approx(100.0) and same["n"] == 2
    wrong = reference_metrics(["하늘", "하늘"], ["낮의 풍경", "밤의 건물"], "ko")
    assert wrong["bleu"] < 1 and wrong["chrf"] < 10 and wrong["cider_d"] == 0.0
    assert reference_metrics(["x"], [None], "en") == {"bleu": None, "chrf": None, "cider_d": None, "n": 0}


# ---------------------------------------------------------------------------------------------------
# Rows, verdicts and warnings, without a model


def test_looping_captions_trip_degenerate_share_in_the_report_row():
    loop = "도시의 풍경을 보여주는 영상입니다. " * 3
    captions = [f"{i}번 건물이 있는 거리 {chr(0xAC00 + 7 * i)}" for i in range(40)]
    row = checkpoint_row("loops", [loop.strip() if i % 5 == 0 else c for i, c in enumerate(captions)])
    assert row["degenerate_share"] == pytest.approx(0.2) and row["tripped"] == ["degenerate_share"]
    kinds = ["token_limit"] * 40      # cut at the limit but no loop: not counted as degenerate
    assert checkpoint_row("cut", captions, degenerate=kinds)["degenerate_share"] == 0.0


def test_identical_captions_are_collapsed_and_distinct_grounded_ones_are_ok():
    collapsed = checkpoint_row("epoch-4", ["도시의 한 건물을 중심으로 한 영상"] * 97, scores=[0.3] * 97)
    assert set(collapsed) == set(ROW_KEYS)
    assert collapsed["unique"] == 1 and collapsed["diversity"] == pytest.approx(1 / 97)
    assert collapsed["status"] == "collapsed"
    assert collapsed["tripped"] == ["unique_ratio", "near_unique_ratio", "top_mode_share", "content_unique_ratio"]
    assert collapsed["content_unique_ratio"] == pytest.approx(1 / 97) and collapsed["degenerate_share"] == 0.0
    assert collapsed["vendi_score"] is None                          # no embeddings
    assert collapsed["top_mode"] == "도시의 한 건물을 중심으로 한 영상" and collapsed["top_mode_share"] == 1.0
    assert collapsed["siglip_mean"] == pytest.approx(0.3) and collapsed["grounding_r1"] is None

    captions = [hashlib.sha1(str(i).encode()).hexdigest()[:12] for i in range(40)]   # no two alike
    emb = np.eye(40, 64)                                                # caption i fits video i only
    healthy = checkpoint_row("mlp", captions, scores=list(np.linspace(0.1, 0.3, 40)), text_emb=emb,
                             video_emb=emb, ids=[f"v{i}" for i in range(40)], info={"fingerprint": "f" * 64})
    assert healthy["status"] == "ok" and healthy["tripped"] == []
    assert healthy["unique"] == 40 and healthy["grounding_r1"] == 1.0
    assert healthy["vendi_score"] == pytest.approx(40.0)              # 40 orthogonal captions: 40 meanings
    assert healthy["siglip_median"] == pytest.approx(0.2)
    assert healthy["modes"][0]["videos"] == ["v0"] and healthy["fingerprint"] == "f" * 64
    assert healthy["bleu"] is None and healthy["attribute_accuracy"] is None        # nothing to compare with


def test_row_against_references_and_attributes():
    from capguard.models import synth

    attrs = list(synth.all_attributes())[::700]                  # 7 combinations spread over the vocabularies
    truth = [synth.caption_ko(a) for a in attrs]
    perfect = checkpoint_row("e", truth, references=truth, attributes=[a.to_dict() for a in attrs], lang="ko")
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["chrf"] == pytest.approx(100.0)
    assert perfect["attribute_accuracy"] == 1.0 and set(perfect["attribute_accuracy_by_name"]) == set(
        synth.ATTRIBUTE_NAMES)
    generic = checkpoint_row("e", ["밤, 도시의 건물"] * len(attrs), references=truth,
                             attributes=[a.to_dict() for a in attrs])              # language guessed: Korean
    night = sum(a.time == "night" for a in attrs) / len(attrs)
    assert generic["attribute_accuracy_by_name"]["time"] == pytest.approx(night)
    assert generic["attribute_accuracy_by_name"]["colour"] == 0.0
    assert generic["bleu"] < perfect["bleu"] and generic["cider_d"] < perfect["cider_d"]
    json.dumps(generic, allow_nan=False)                         # no nan reaches JSON: distinct-n of
    json.dumps(checkpoint_row("e", ["", ""]), allow_nan=False)   # empty captions is nan -> null


def test_field_report_table():
    """The C-Abstractor run: 9, 6, 4, 1, 4, 6 unique captions of 97, SigLIP 0.24 ... 0.00."""
    rows = []
    for epoch, (unique, siglip) in enumerate(zip([9, 6, 4, 1, 4, 6], [0.24, 0.23, 0.34, 0.13, 0.04, 0.00],
                                                     strict=True), 1):
        captions = [f"epoch {epoch} says template {chr(65 + k % unique) * 8} about the city"
                    for k in range(97)]
        rows.append(checkpoint_row(f"epoch-{epoch}", captions, scores=[siglip] * 97))
    assert [round(r["diversity"], 2) for r in rows] == [0.09, 0.06, 0.04, 0.01, 0.04, 0.06]
    report = build_report(rows)
    assert all(v == "collapsed" for v in report["verdicts"].values())
    codes = {w["code"]: w["message"] for w in report["warnings"]}
    assert "epoch-2 -> epoch-3" in codes["siglip_up_diversity_down"]   # SigLIP .23 -> .34, diversity down
    assert "siglip_diversity_negative" not in codes                       # rank correlation over all 6 is > 0
    rho = report["correlation"]["siglip_mean_vs_diversity"]["rho"]
    assert rho == pytest.approx(2 / math.sqrt(17.5 * 16.5))


def _row(name, siglip, diversity, status="ok"):
    return {**dict.fromkeys(ROW_KEYS), "name": name, "siglip_mean": siglip, "diversity": diversity,
            "status": status, "tripped": [] if status == "ok" else ["unique_ratio"], "n": 10, "unique": 5,
            "near_unique": 5, "modes": []}


def test_negative_spearman_warns_and_positive_does_not():
    falling = build_report([_row("e1", 0.1, 0.9), _row("e2", 0.2, 0.6), _row("e3", 0.4, 0.2, "collapsed")])
    assert falling["correlation"]["siglip_mean_vs_diversity"] == {"method": "spearman", "rho": -1.0, "n": 3}
    codes = [w["code"] for w in falling["warnings"]]
    assert codes == ["collapsed", "siglip_diversity_negative", "siglip_up_diversity_down",
                     "best_siglip_collapsed"]
    assert "rho = -1.00" in falling["warnings"][1]["message"]
    rising = build_report([_row("e1", 0.1, 0.5), _row("e2", 0.2, 0.6), _row("e3", 0.4, 0.9)])
    assert rising["correlation"]["siglip_mean_vs_diversity"]["rho"] == pytest.approx(1.0)
    assert rising["warnings"] == []
    json.dumps(build_report([_row("e1", None, 0.5)]), allow_nan=False)   # rho nan -> null
    # SigLIP-up/diversity-down steps are read within a run, not from one run's last epoch to the next's first
    two_runs = build_report([{**_row("a/e2", 0.1, 0.9), "path": "runs/a/epoch-2"},
                             {**_row("b/e1", 0.2, 0.5), "path": "runs/b/epoch-1"}])
    assert "siglip_up_diversity_down" not in [w["code"] for w in two_runs["warnings"]]


# ---------------------------------------------------------------------------------------------------
# The HTML page


def test_html_escapes_captions_and_draws_one_bar_per_checkpoint():
    evil = "<script>alert(1)</script>"
    rows = [checkpoint_row("<b>epoch-1</b>", [evil] * 5 + ["해질녘, 나무 옆에 선 한옥"] * 5, scores=[0.2] * 10),
            checkpoint_row("epoch-2", [f"caption {i}" for i in range(10)], scores=[0.1] * 10),
            checkpoint_row("epoch-3", [f"another {i}" for i in range(10)])]   # no scorer: no SigLIP point
    page = render_html(build_report(rows, {"source": "val.jsonl", "n_videos": 10}))
    assert "<script" not in page and "<b>epoch" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;b&gt;epoch-1&lt;/b&gt;" in page
    assert "해질녘, 나무 옆에 선 한옥" in page and '<meta charset="utf-8">' in page
    assert "Noto Sans CJK KR" in page and "sans-serif" in page
    assert "<link" not in page and "src=" not in page and "@import" not in page and "url(" not in page
    svg = page[page.index("<svg"):page.index("</svg>")]
    assert svg.count('class="bar"') == 3 and svg.count('class="point"') == 2
    # the 0.5 line sits halfway down the plot area (top 28 px, 320 - 28 - 72 = 220 px high)
    assert '<line class="healthy" x1="48" x2="664" y1="138.0" y2="138.0"' in svg and "healthy 0.50" in svg
    assert page.index("&lt;b&gt;epoch-1") < page.index(">epoch-2<") < page.index(">epoch-3<")  # in order
    # the new figures: content-unique and looping share in the main table, the Vendi score in the details
    assert "<th>Content-unique</th>" in page and "<th>Looping</th>" in page and "<th>Vendi score</th>" in page
    start = page.index("&lt;b&gt;epoch-1", page.index('<table id="main"'))
    first = page[start:page.index("</tr>", start)]                       # epoch-1's row of the main table
    # grounding R@1 (no embeddings), content-unique (2 content keys of 10 captions), looping share, verdict
    assert '<td class="num">-</td><td class="num">0.20</td><td class="num">0.00</td><td>' in first


# ---------------------------------------------------------------------------------------------------
# Data sets and real runs on tiny stacks


def test_load_dataset(manifest, tmp_path):
    ko = load_dataset(manifest)
    assert ko.kind == "manifest" and ko.lang == "ko" and len(ko.items) == 4
    assert ko.items[0].rel == "val/val-00000.mp4" and ko.items[0].path.is_file()
    assert ko.items[0].reference.endswith("영상") and ko.items[0].attributes["floors"] in range(1, 7)
    en = load_dataset(manifest, references="en", limit=2)
    assert en.lang == "en" and len(en.items) == 2 and en.items[0].reference.startswith("a ")
    assert load_dataset(manifest, references="none").items[0].reference is None
    folder = load_dataset(manifest.parent / "val")
    assert folder.kind == "dir" and folder.lang is None and folder.items[0].rel == "broken.mp4"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"path": "a.mp4"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        load_dataset(bad)
    with pytest.raises(FileNotFoundError, match="make-videos"):
        load_dataset(tmp_path / "missing")


def test_evaluate_writes_one_report(run_stacks, manifest, tmp_path, monkeypatch):
    import capguard.models.stack
    from capguard.models.evaluate.runner import _sample

    llm_loads, decodes, progress = [], [], []
    real_load_llm = capguard.models.stack.load_llm
    monkeypatch.setattr(capguard.models.stack, "load_llm", lambda *a: llm_loads.append(a[0]) or real_load_llm(*a))

    def loader(path, num_frames, side):
        decodes.append(Path(path).name)
        return _sample(path, num_frames, side)

    out = tmp_path / "out"
    report = evaluate([run_stacks["first"], run_stacks["second"]], manifest, out,
                      lambda done, total: progress.append((done, total)), max_new_tokens=4, batch_size=2,
                      progress_bar=False, frame_loader=loader)
    assert [r["name"] for r in report["checkpoints"]] == ["epoch-1", "epoch-2"]
    assert json.loads((out / "report.json").read_text(encoding="utf-8")) == report
    for row in report["checkpoints"]:
        assert set(ROW_KEYS) <= set(row) and row["n"] == 3 and row["status"] in ("ok", "collapsed")
        assert len(row["fingerprint"]) == 64 and 0 <= row["siglip_mean"] <= 1 and row["bleu"] is not None
    assert report["checkpoints"][0]["fingerprint"] != report["checkpoints"][1]["fingerprint"]
    assert [r["thresholds"]["near_dup_threshold"] for r in report["checkpoints"]] == [0.9, 0.98]
    assert sorted(decodes) == ["broken.mp4", "val-00000.mp4", "val-00001.mp4", "val-00002.mp4"]  # once each
    assert len(llm_loads) == 1                                      # the second epoch reused the first's LLM
    assert progress[-1] == (8, 8) and [d for d, _ in progress] == sorted(d for d, _ in progress)
    assert report["dataset"]["skipped"] == [{"id": "broken", "path": "val/broken.mp4", "code": "not_a_video",
                                             "message": report["dataset"]["skipped"][0]["message"]}]
    assert report["warnings"][0]["code"] == "videos_skipped"
    lines = [json.loads(line) for line in (out / "captions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 6 and set(lines[0]) == {"checkpoint", "id", "path", "caption", "reference", "siglip", "seed",
                                                 "finish_reason"}
    assert lines[0]["path"] == "val/val-00000.mp4" and lines[3]["checkpoint"] == "epoch-2"
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count('class="bar"') == 2


def _wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for the watcher"
        time.sleep(0.05)


def _rows(out: Path) -> list[dict]:
    try:
        return json.loads((out / "report.json").read_text(encoding="utf-8"))["checkpoints"]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def test_watch_picks_up_a_checkpoint_written_after_start(run_stacks, manifest, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_stacks["first"], run / "epoch-1")
    (run / "epoch-2").mkdir()
    (run / "epoch-2" / "capguard.json").write_text("{")      # a broken checkpoint: reported, then skipped
    out = tmp_path / "out"
    stop = threading.Event()
    result = {}
    options = {"max_new_tokens": 4, "progress_bar": False, "references": "none"}
    thread = threading.Thread(target=lambda: result.update(watch(run, manifest, out, interval=0.05,
                                                                 max_checkpoints=2, stop=stop, **options)))
    thread.start()
    try:
        _wait_for(lambda: len(_rows(out)) == 1)
        first_row = _rows(out)[0]
        assert find_checkpoints(run) == [run / "epoch-1", run / "epoch-2"]
        shutil.copytree(run_stacks["staged"], run / "epoch-3")          # written while the watcher polls
        thread.join(timeout=120)
        assert not thread.is_alive()
    finally:
        stop.set()
        thread.join(timeout=30)
    assert [r["name"] for r in result["checkpoints"]] == ["epoch-1", "epoch-3"]
    assert result["checkpoints"][0] == first_row                    # kept, not recomputed
    assert result["checkpoints"][0]["bleu"] is None                 # references="none"
    failed = [w["message"] for w in result["warnings"] if w["code"] == "checkpoint_failed"]
    assert len(failed) == 1 and "epoch-2" in failed[0] and "invalid JSON" in failed[0]
    # a restarted watcher keeps the rows and, with nothing new, adds none
    again = watch(run, manifest, out, interval=0.01, once=True, **options)
    assert [r["name"] for r in again["checkpoints"]] == ["epoch-1", "epoch-3"]
    assert len((out / "captions.jsonl").read_text(encoding="utf-8").splitlines()) == 6


def test_find_checkpoints_in_natural_order(tmp_path):
    for name in ("run/epoch-10", "run/epoch-2", "run/notes", "epoch-1"):
        (tmp_path / name).mkdir(parents=True)
    for name in ("run/epoch-10", "run/epoch-2", "epoch-1"):
        (tmp_path / name / "capguard.json").write_text("{}")
    assert [p.relative_to(tmp_path).as_posix() for p in find_checkpoints(tmp_path)] == \
        ["epoch-1", "run/epoch-2", "run/epoch-10"]


CLI = [sys.executable, "-m", "capguard.server.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow
def test_cli_evaluate_end_to_end(run_stacks, manifest, tmp_path):
    out = tmp_path / "cli-out"
    result = subprocess.run([*CLI, "evaluate", "--checkpoints", str(run_stacks["first"]), str(run_stacks["staged"]),
                             "--videos", str(manifest), "--out", str(out), "--max-new-tokens", "4",
                             "--limit", "3", "--batch-size", "2"],
                            capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["checkpoint"] for line in lines[:2]] == ["epoch-1", "epoch-3"]
    assert lines[0]["unique"].endswith("/3") and lines[0]["status"] in ("ok", "collapsed")
    assert lines[2] == {"report": str(out / "report.json"), "html": str(out / "report.html"),
                        "captions": str(out / "captions.jsonl")}
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["dataset"]["n_videos"] == 3 and len(report["checkpoints"]) == 2
    assert (out / "report.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")

    misuse = subprocess.run([*CLI, "evaluate", "--checkpoints", str(run_stacks["first"]), "--videos",
                             str(manifest), "--out", str(out), "--once"],
                            capture_output=True, text=True, timeout=120, env=ENV)
    assert misuse.returncode == 2 and "--watch" in misuse.stderr
    missing = subprocess.run([*CLI, "evaluate", "--checkpoints", str(tmp_path), "--videos", str(manifest),
                              "--out", str(out)], capture_output=True, text=True, timeout=120, env=ENV)
    assert missing.returncode == 2 and "capguard.json is missing" in missing.stderr
