"""Evaluation sweeps on Ray Data (models/ray_sweep.py): the report equals the local run's; a cut sweep resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ray_local import ray_test

from capguard.models.evaluate import evaluate, load_dataset
from capguard.models.ray_sweep import PARTIAL_NAME, SweepPlan, SweepWorker, _read_partial, write_report

REPO = Path(__file__).resolve().parent.parent
CHECKPOINTS = [str(REPO / "checkpoints" / "demo"), str(REPO / "checkpoints" / "collapsed")]
VIDEOS = REPO / "samples" / "val" / "val.jsonl"
TIMED = ("seconds", "timings_s")   # run timings: the only figures allowed to differ


def comparable(report: dict) -> dict:
    """The report without what depends on when and how fast it ran."""
    rows = [{k: v for k, v in row.items() if k not in TIMED} for row in report["checkpoints"]]
    return {**{k: v for k, v in report.items() if k not in ("run", "checkpoints")}, "checkpoints": rows}


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """The local run on 2 checkpoints x 5 val videos, batches of 2 (so the last batch is a single video)."""
    out = tmp_path_factory.mktemp("local")
    report = evaluate(CHECKPOINTS, load_dataset(VIDEOS, limit=5), out, batch_size=2, device="cpu",
                      progress_bar=False)
    return report, (out / "captions.jsonl").read_text(encoding="utf-8")


def plan(batch_size: int = 2) -> SweepPlan:
    dataset = load_dataset(VIDEOS, limit=5)
    return SweepPlan(tuple(CHECKPOINTS), tuple(str(i.path) for i in dataset.items), batch_size, None, None, "cpu")


def swept_in_process(the_plan: SweepPlan) -> dict:
    """Every unit of the plan through one SweepWorker in this process (no Ray): {(checkpoint, video): row}."""
    worker, done = SweepWorker(the_plan), {}
    for unit in the_plan.units():
        for row in worker({key: [value] for key, value in unit.items()})["row"]:
            row = json.loads(row)
            done[(row["checkpoint"], row["video"])] = row
    return done


@pytest.mark.slow   # two stacks loaded twice: ~10 s
def test_worker_as_plain_object_gives_the_local_report(local, tmp_path):
    the_plan, dataset = plan(), load_dataset(VIDEOS, limit=5)
    done = swept_in_process(the_plan)
    report = write_report(the_plan, dataset, done, tmp_path, paths=CHECKPOINTS)
    assert comparable(report) == comparable(local[0])
    assert (tmp_path / "captions.jsonl").read_text(encoding="utf-8") == local[1]
    assert report["verdicts"] == {"demo": "ok", "collapsed": "collapsed"}


def test_partial_file_of_another_plan_is_not_reused(tmp_path):
    path = tmp_path / PARTIAL_NAME
    path.write_text(json.dumps({"plan": {"checkpoints": ["elsewhere"]}}) + "\n" + '{"checkpoint": 0, "video": 0}\n')
    assert _read_partial(path, plan()) == {}


def test_torn_last_line_is_dropped_and_the_file_ends_on_a_newline(tmp_path):
    from dataclasses import asdict

    path = tmp_path / PARTIAL_NAME
    header = json.dumps({"plan": asdict(plan())})
    path.write_text(header + "\n" + '{"checkpoint": 0, "video": 1, "caption": "x"}\n{"checkpoint": 0, "vi')
    assert list(_read_partial(path, plan())) == [(0, 1)]
    assert path.read_text().endswith('"x"}\n') and path.read_text().count("\n") == 2


@ray_test
@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_sweep_on_an_actor_pool_equals_the_local_run_and_resumes(local, tmp_path):
    from capguard.models.ray_sweep import sweep

    progress = []
    report = sweep(CHECKPOINTS, VIDEOS, tmp_path, limit=5, batch_size=2, actors=2, device="cpu",
                   progress_callback=lambda done, total: progress.append((done, total)))
    assert comparable(report) == comparable(local[0])
    assert (tmp_path / "captions.jsonl").read_text(encoding="utf-8") == local[1]
    assert progress == [(done, 10) for done in range(11)]   # once before, then once per row as it arrives

    # cut: the run wrote three rows (one whole unit of 2 videos, half of the next), then tore a line
    lines = (tmp_path / PARTIAL_NAME).read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1 + 2 * 5                     # header + one line per (checkpoint, video)
    kept = lines[:4]
    (tmp_path / PARTIAL_NAME).write_text("\n".join(kept) + "\n" + lines[4][:20], encoding="utf-8")
    again = sweep(CHECKPOINTS, VIDEOS, tmp_path, limit=5, batch_size=2, actors=2, device="cpu")
    resumed = (tmp_path / PARTIAL_NAME).read_text(encoding="utf-8").splitlines()
    assert resumed[:4] == kept
    keys = [(row["checkpoint"], row["video"]) for row in map(json.loads, resumed[1:])]
    assert set(keys) == {(c, v) for c in range(2) for v in range(5)}
    assert keys.count((0, 0)) == keys.count((0, 1)) == 1   # the finished unit is not captioned again
    assert len(keys) == 10 + 1                         # only the half-written unit's kept row is written twice
    assert comparable(again) == comparable(local[0])


@pytest.mark.parametrize("extra", [["--watch", str(REPO / "checkpoints"), "--ray"],
                                   ["--checkpoints", CHECKPOINTS[0], "--ray", "--actors", "0"]])
def test_cli_refuses_what_a_sweep_cannot_do(extra, tmp_path, capsys):
    from capguard.server.cli import main

    assert main(["evaluate", *extra, "--videos", str(VIDEOS), "--out", str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err


def test_cli_hands_the_decoding_flags_to_the_sweep(monkeypatch, tmp_path):
    """--ray with decoding flags is a sweep with that DecodingRequest (no cluster: the sweep is replaced)."""
    import importlib.util

    import capguard.models.ray_sweep
    from capguard.models.decoding import DecodingRequest
    from capguard.server.cli import main

    calls, find_spec = [], importlib.util.find_spec

    def stopped_sweep(*args, **kwargs):
        calls.append(kwargs)
        raise KeyboardInterrupt   # the CLI's Ctrl-C path: exit 130, nothing printed as a report

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "ray" else find_spec(name, *a))
    monkeypatch.setattr(capguard.models.ray_sweep, "sweep", stopped_sweep)
    assert main(["evaluate", "--checkpoints", CHECKPOINTS[0], "--videos", str(VIDEOS), "--out", str(tmp_path),
                 "--ray", "--do-sample", "--temperature", "0.8", "--seed", "3"]) == 130
    assert calls[0]["decoding"] == DecodingRequest(do_sample=True, temperature=0.8, seed=3)


CUT_SWEEP = r'''
import os, sys
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from capguard.models.ray_sweep import sweep

out, checkpoints, videos = Path(sys.argv[1]), sys.argv[2:4], sys.argv[4]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                        "object_store_memory": 128 * 2**20})
worker = cluster.add_node(num_cpus=2, object_store_memory=128 * 2**20)   # the node that will be lost
ray.init(address=cluster.address)
fsync, rows = os.fsync, []


def lose_the_worker_after_three_rows(fd):
    fsync(fd)
    rows.append(fd)
    if len(rows) == 3:              # three rows are on disk: now the node holding every pool actor goes
        cluster.remove_node(worker)
        os._exit(3)                 # and the job with it (the test ends what is left of this cluster)


os.fsync = lose_the_worker_after_three_rows   # the sweep fsyncs once per finished row
sweep(checkpoints, videos, out, limit=5, batch_size=2, actors=2, device="cpu")
os._exit(0)
'''


def end_processes_of(ray_tmpdir: str) -> None:
    """End, by id, the processes of the cluster the cut run left behind: those started with its RAY_TMPDIR.

    Reads /proc/PID/environ whole: Ray's setproctitle zeroes its first bytes, so psutil's environ() is empty.
    """
    import psutil

    marker = f"\0RAY_TMPDIR={ray_tmpdir}\0".encode()
    for process in psutil.process_iter():
        try:
            if marker in b"\0" + Path(f"/proc/{process.pid}/environ").read_bytes() + b"\0":
                process.kill()
        except (OSError, psutil.NoSuchProcess):
            continue


@ray_test
@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_sweep_cut_by_a_lost_node_resumes(local, tmp_path):
    """A 2-node cluster (ray.cluster_utils) loses its worker node mid-sweep; the rerun captions the rest."""
    import os
    import subprocess
    import sys
    import tempfile

    from capguard.models.ray_sweep import sweep

    with tempfile.TemporaryDirectory(prefix="ray-", dir="/tmp") as short:   # unix socket paths: <= 107 bytes
        try:
            cut = subprocess.run([sys.executable, "-c", CUT_SWEEP, str(tmp_path), *CHECKPOINTS, str(VIDEOS)],
                                 env={**os.environ, "RAY_TMPDIR": short}, timeout=600, capture_output=True,
                                 text=True)
        finally:
            end_processes_of(short)
    assert cut.returncode == 3, cut.stderr[-2000:]
    written = (tmp_path / PARTIAL_NAME).read_text(encoding="utf-8").splitlines()
    assert len(written) == 1 + 3                       # the header and the three rows the lost run finished
    report = sweep(CHECKPOINTS, VIDEOS, tmp_path, limit=5, batch_size=2, actors=2, device="cpu")
    resumed = (tmp_path / PARTIAL_NAME).read_text(encoding="utf-8").splitlines()
    assert resumed[:len(written)] == written           # what the lost run finished is kept, not redone
    assert comparable(report) == comparable(local[0])


@pytest.mark.slow   # the demo stack loaded twice: ~6 s
def test_worker_carries_decoding_and_row_names_like_the_local_run(tmp_path):
    """A sampled run with a seed: the plan's DecodingRequest gives each video the local run's config (seed + i)."""
    from capguard.models.decoding import DecodingRequest
    from capguard.models.evaluate import Evaluator

    decoding = DecodingRequest(do_sample=True, temperature=0.9, seed=5)
    dataset = load_dataset(VIDEOS, limit=3)
    evaluator = Evaluator(dataset, tmp_path / "local", batch_size=2, device="cpu", progress_bar=False,
                          decoding=decoding)
    evaluator.add(CHECKPOINTS[0], name="mine")
    expected = evaluator.write()
    the_plan = SweepPlan((CHECKPOINTS[0],), tuple(str(i.path) for i in dataset.items), 2, None, None, "cpu",
                         decoding.given())
    report = write_report(the_plan, dataset, swept_in_process(the_plan), tmp_path / "swept", paths=CHECKPOINTS[:1], names=["mine"])
    assert comparable(report) == comparable(expected) and report["run"]["decoding"] == decoding.given()
    assert (tmp_path / "swept" / "captions.jsonl").read_text(encoding="utf-8") == \
        (tmp_path / "local" / "captions.jsonl").read_text(encoding="utf-8")
    assert [json.loads(line)["seed"] for line in (tmp_path / "swept" / "captions.jsonl").open()] == [5, 6, 7]
