"""The benchmarks run and print their tables (tiny settings). They measure nothing here: no timing is asserted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
DEMO = REPO / "checkpoints" / "demo" / "capguard.json"
VAL = REPO / "samples" / "val" / "val.jsonl"
needs_demo = pytest.mark.skipif(not (DEMO.is_file() and VAL.is_file()),
                                reason="needs the shipped checkpoints/demo and samples/val")


def run(script: str, *args: str, timeout: float = 120) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                         timeout=timeout, cwd=REPO, env=env)
    assert out.returncode == 0, f"{script} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def table_rows(stdout: str, header_start: str) -> list[list[str]]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        rows.append(line.split())
    return rows


@pytest.mark.slow   # a fresh interpreter (torch, transformers): 14-140 s on 2 busy cores
def test_gpu_bench_tiny_prints_one_row_per_projector():
    stdout = run("gpu_bench.py", "--tiny", "--repeats", "1")
    assert stdout.startswith("device CPU")
    rows = table_rows(stdout, "projector")
    assert [r[0] for r in rows] == ["linear", "mlp2x_gelu", "c-abstractor"]
    for r in rows:
        assert float(r[2]) > 0 and float(r[3]) > 0            # naive and batched videos/s
        assert r[4].endswith("x") and "/" in r[5]              # ratio, same-token count
    # visual tokens: all 2 frames x 16 patches for linear/MLP, the queries for the C-Abstractor
    assert [int(r[1]) for r in rows] == [32, 32, 8]


@pytest.mark.vllm   # make test-vllm (a loopback-only namespace); ~40 s: two engine starts on the CPU
def test_gpu_bench_tiny_runs_the_vllm_engine_too():
    """The GPU bench's vllm path (``--engines hf vllm``: the random LLM written out, loaded by vLLM, the same
    videos through stack.caption with the vllm engine) runs end to end, so it is ready the day a GPU is lent."""
    pytest.importorskip("vllm")
    stdout = run("gpu_bench.py", "--tiny", "--repeats", "1", "--engines", "hf", "vllm", timeout=400)
    rows = [r for r in table_rows(stdout, "projector     batch v/s") if not r[0].startswith("(")]   # not vLLM's log
    assert [r[0] for r in rows] == ["linear", "mlp2x_gelu", "c-abstractor"]
    for r in rows:
        assert float(r[1]) > 0 and float(r[2]) > 0 and r[3].endswith("x")   # hf batch, vllm videos/s, ratio
        same, total = map(int, r[4].split("/"))
        assert same == total   # fp32 on the CPU: vLLM's tokens equal HF's one-by-one ones


@pytest.mark.slow   # a fresh interpreter (torch, transformers): 14-140 s on 2 busy cores
def test_gpu_bench_plan_has_the_field_report_shapes():
    """--plan builds the full stack on the meta device (no memory, no GPU): LLaMA-2-7B-sized, 576 patches
    per frame, 8 frames = 4608 visual tokens (+ BOS and the newline), 64 C-Abstractor queries."""
    stdout = run("gpu_bench.py", "--plan")
    assert stdout.startswith("LLM 6.738B params")
    assert "8 frames x 577 tokens" in stdout
    rows = {r[0]: r for r in table_rows(stdout, "projector")}
    assert [rows[k][2] for k in ("linear", "mlp2x_gelu", "c-abstractor")] == ["4610", "4610", "66"]
    assert float(rows["linear"][3]) == pytest.approx(65.3, abs=0.1)   # prefill TFLOP per video


def test_bench_decode_quick_checks_every_backend(tmp_path):
    stdout = run("bench_decode.py", "--quick", "--repeats", "1", "--video-dir", str(tmp_path))
    rows = table_rows(stdout, "video")
    assert [" ".join(r[:2]) for r in rows][:2] == ["h264 short", "vp9 short"]
    for r in rows:
        decord, pyav, sequential, auto = r[-4:]                # exact-frame flags
        assert pyav == sequential == auto == "y"               # PyAV, the baseline and auto return the asked frames
        assert decord in ("y", "-")                            # decord is exact or cannot open (AV1)
    assert "auto chose the faster exact backend" in stdout


def test_bench_server_helpers():
    import bench_server  # bench/ is on pytest's pythonpath (pyproject.toml)

    assert bench_server.differing({"a": "x", "b": "y"}, {"a": "x", "b": "z"}) == ["b"]
    assert bench_server.differing({"a": "x"}, {}) == ["a"]
    # several passes: a video whose passes disagree differs from any reference caption
    assert bench_server.same_captions([("a", "x"), ("a", "x"), ("b", "y")]) == {"a": "x", "b": "y"}
    assert bench_server.differing({"b": "y"}, bench_server.same_captions([("b", "y"), ("b", "z")])) == ["b"]
    # each run against the naive runs just before and after it
    assert bench_server.paired_ratios([30.0, 33.0], [10.0, 10.0, 12.0]) == [3.0, 3.0]
    assert bench_server.paired_summary([30.0, 44.0], [10.0, 10.0, 12.0]) == "3.50x (3.00-4.00)"
    cpu = bench_server.process_cpu_s(os.getpid(), with_children=False)
    assert cpu is None or cpu > 0
    if VAL.is_file():
        assert len(bench_server.manifest_videos(VAL, 5)) == 5


@needs_demo
@pytest.mark.slow
def test_bench_metrics_runs_on_the_demo_stack():
    stdout = run("bench_metrics.py", "--windows", "100", "--observations", "40", "--request-videos", "8",
                 "--scrapes", "5", timeout=300)
    assert "window 100 (full recompute every" in stdout
    assert "of a c1 request" in stdout and "GET /metrics: median" in stdout


@needs_demo
@pytest.mark.slow
def test_bench_server_compares_captions_with_the_naive_loop():
    stdout = run("bench_server.py", "--videos", "6", "--rounds", "1", "--passes", "2", "--concurrency", "1", "4",
                 timeout=600)
    rows = table_rows(stdout, "run")
    assert [r[0] for r in rows] == ["naive", "server", "server"]
    assert all(r[-1] == "6/6" for r in rows)                   # the server's captions are the naive loop's, every pass
    assert "6 videos x 2 passes" in stdout
    assert "throughput / naive loop: c1" in stdout
    assert "paired (each run / mean of the naive runs before and after it): c1" in stdout


@pytest.mark.slow   # a fresh interpreter (torch, transformers): 14-140 s on 2 busy cores
@needs_demo
def test_cpu_limits_prints_each_stage_against_the_matmul_peak():
    stdout = run("bench_cpu_limits.py", "--batches", "2", "--repeats", "1")
    assert "float32 matmul peak" in stdout
    rows = table_rows(stdout, "batch stage")
    assert [" ".join(r[1:3]) for r in rows[:3]] == ["vision tower", "LLM prefill", "decode step"]
    for r in rows[:3]:
        assert r[0] == "2" and float(r[3]) > 0 and float(r[4]) > 0 and r[6].endswith("%")
