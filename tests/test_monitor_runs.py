"""The monitor's stopping rule on real training runs, replayed with default settings.

tests/data/train-runs holds the validation captions (97 videos) of every epoch of four ``capguard train``
runs, written by the monitor itself (``captions-epoch-N.jsonl``, gzipped; README.md there has the commands
and each epoch's figures): the field report's C-Abstractor recipe and three MLP-2L runs (the default recipe
twice, with different thread counts, and the recipe that made checkpoints/demo). Every one of the MLP runs'
first seven epochs breaks a guard rule, so a monitor that counted collapsed epochs alone would stop them all
(``test_counting_collapse_alone_would_stop_the_healthy_runs``); the rule counts only epochs that are
collapsed and not recovering, and must stop the C-Abstractor early and no MLP run.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
from pathlib import Path

import pytest

from capguard.models.monitor import DiversityMonitor, MonitorResult, improvements

RUNS = Path(__file__).resolve().parent / "data" / "train-runs"


def epochs(run: str) -> list[tuple[int, list[dict]]]:
    """[(epoch, rows)] of a recorded run, in epoch order."""
    files = sorted(RUNS.joinpath(run).glob("captions-epoch-*.jsonl.gz"),
                   key=lambda p: int(re.search(r"epoch-(\d+)", p.name).group(1)))
    assert files, f"no recorded epochs under {RUNS / run}"
    return [(int(re.search(r"epoch-(\d+)", f.name).group(1)),
             [json.loads(line) for line in gzip.decompress(f.read_bytes()).decode("utf-8").splitlines()])
            for f in files]


def replay(run: str, **options) -> list[MonitorResult]:
    """Feed a recorded run to a DiversityMonitor epoch by epoch, as ``capguard train`` does; stop where it says."""
    recorded = epochs(run)
    ids = [row["video"] for row in recorded[0][1]]
    monitor = DiversityMonitor(None, ids, ids=ids, **options)
    results = []
    for epoch, rows in recorded:
        assert [row["video"] for row in rows] == ids
        results.append(monitor.observe([row["caption"] for row in rows], scores=[row["siglip"] for row in rows],
                                       epoch=epoch))
        if results[-1].should_stop:
            break
    return results


@pytest.fixture(scope="module")
def c_abstractor():
    return replay("c-abstractor")


def test_recorded_runs_are_whole():
    """97 captions per epoch; the C-Abstractor ran on past its stop (so the test sees what stopping skipped)."""
    for run, n in (("c-abstractor", 15), ("mlp-2l", 9), ("mlp-2l-rerun", 9), ("mlp-2l-demo", 21)):
        recorded = epochs(run)
        assert [e for e, _ in recorded] == list(range(1, n + 1))
        assert all(len(rows) == 97 for _, rows in recorded)


def test_c_abstractor_run_stops_at_epoch_5_and_says_why(c_abstractor):
    stop = c_abstractor[-1]
    assert stop.should_stop and stop.epoch == 5
    assert [r.report.unique for r in c_abstractor] == [4, 1, 2, 2, 2]
    assert [r.recovering for r in c_abstractor] == [None, False, False, False, False] and stop.streak == 4
    assert {"unique_ratio", "near_unique_ratio", "top_mode_share", "content_unique_ratio"} <= set(stop.tripped)
    reason = stop.reason
    assert "4 evaluations in a row collapsed and not recovering (patience 4" in reason
    assert "top_mode_share 1.00 > 0.2" in reason and "unique_ratio 0.04 -> 0.02" in reason
    assert "trend epoch 1 -> epoch 5" in reason and "SigLIP 0.013 -> 0.012" in reason


@pytest.mark.parametrize("run", ["mlp-2l", "mlp-2l-rerun", "mlp-2l-demo"])
def test_mlp_runs_are_never_stopped(run):
    results = replay(run)
    assert len(results) == len(epochs(run)) and not any(r.should_stop for r in results)
    assert all(r.tripped for r in results[:7])          # collapsed by the guard's lines all the same
    stage1 = [r.report.unique for r in results[:3]]
    assert stage1[0] > stage1[1] > stage1[2]            # the projector-only dip the rule must ride out
    assert results[3].recovering or results[4].recovering   # and the climb out of it
    assert max(r.streak for r in results) < 4


def test_the_demo_recipe_turns_healthy():
    """The recipe of checkpoints/demo: collapsed by the guard's lines until epoch 12, healthy from 13 on."""
    results = replay("mlp-2l-demo")
    assert [bool(r.tripped) for r in results] == [True] * 12 + [False] * 9
    assert results[-1].report.unique >= 90 and results[-1].streak == 0


def test_counting_collapse_alone_would_stop_the_healthy_runs():
    """The problem the rule solves: with no recovery possible (min_recovery 1.0) every collapsed epoch after
    the first counts, and every MLP run stops in its projector-only stage or just after, like the C-Abstractor."""
    for run in ("mlp-2l", "mlp-2l-rerun", "mlp-2l-demo"):
        assert replay(run, min_recovery=1.0)[-1].epoch == 5
    # Why patience 4: the rerun's first stage-2 epoch climbs by 5 captions of 97 only, 0.002 over the margin;
    # at patience 3 a margin a hair higher stops that healthy run there. Its next epoch jumps by 0.45.
    rerun = replay("mlp-2l-rerun")
    assert max(rerun[3].changes.values()) == pytest.approx(5 / 97) and max(rerun[4].changes.values()) > 0.4
    assert replay("mlp-2l-rerun", patience=3, min_recovery=0.06)[-1].epoch == 4


# The field report's C-Abstractor run (docs/field-report.en.md): unique captions of 97 and SigLIP per epoch.
FIELD_REPORT = [(9, 0.24), (6, 0.23), (4, 0.34), (1, 0.13), (4, 0.04), (6, 0.00)]
SENTENCES = ["오래된 도시의 건물 풍경을 담은 영상", "도심 한 블록의 건물들", "최근에 촬영된 건물 한 채",
             "도시 한가운데 선 건물", "맑고 화창한 낮 풍경", "회색 빌딩이 선 거리", "나무와 빌딩이 있는 도심",
             "하늘 아래 여러 층 건물", "강가에 선 낮은 건물"]
# epochs 5-6: "collapsed onto near-duplicates" one word apart (the report's 풍경/광경), as the report describes
VARIANTS = [f"맑고 화창한 낮의 도시 {word}을 담은 영상" for word in ("풍경", "광경", "전경", "정경", "절경", "원경")]


def test_field_report_run_stops_at_epoch_5_naming_the_siglip_trap(caplog):
    caplog.set_level(logging.WARNING, logger="capguard")
    monitor = DiversityMonitor(None, list(range(97)))
    for epoch, (unique, siglip) in enumerate(FIELD_REPORT, start=1):
        pool = SENTENCES if epoch <= 4 else VARIANTS
        result = monitor.observe([pool[i % unique] for i in range(97)], scores=[siglip] * 97, epoch=epoch)
        if result.should_stop:
            break
    assert result.epoch == 5 and [r.report.unique for r in monitor.history] == [9, 6, 4, 1, 4]
    assert result.report.near_unique == 1                       # four spellings of one caption
    assert [r.siglip_up_diversity_down for r in monitor.history] == [False, False, True, False, False]
    assert "SigLIP rose while diversity fell at epoch 3" in result.reason and result.reason in caplog.text
    assert result.metrics()["capguard/recovering"] == 0.0


def test_recovery_resets_the_streak_and_the_first_evaluation_is_the_baseline():
    val = Path(__file__).resolve().parent.parent / "samples" / "val" / "val.jsonl"
    distinct = [json.loads(line)["caption_ko"] for line in val.read_text(encoding="utf-8").splitlines()[:20]]
    ids = [f"v{i}" for i in range(20)]

    def with_unique(k):          # k distinct captions, the rest the first one
        return distinct[:k] + [distinct[0]] * (20 - k)

    monitor = DiversityMonitor(None, ids, patience=2)
    results = [monitor.observe(with_unique(k), epoch=e) for e, k in enumerate([1, 1, 3, 3, 3], start=1)]
    # 1 -> 1: no change; 1 -> 3: +0.10 unique (recovering); 3 -> 3 -> 3: stop
    assert [r.recovering for r in results] == [None, False, True, False, False]
    assert [r.streak for r in results] == [0, 1, 0, 1, 2] and results[-1].should_stop
    assert improvements(results[1].report, results[2].report)["unique_ratio"] == pytest.approx(0.10)
    # a healthy evaluation is never counted, whatever the trend
    monitor = DiversityMonitor(None, ids, patience=1)
    assert monitor.observe(distinct, epoch=1).tripped == [] and not monitor.observe(distinct, epoch=2).counted
    with pytest.raises(ValueError, match="min_recovery"):
        DiversityMonitor(None, ids, min_recovery=0.0)
    with pytest.raises(ValueError, match="ignore_first"):
        DiversityMonitor(None, ids, ignore_first=-1)
