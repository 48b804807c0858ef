"""Server parts without a model: the batcher's grouping and back-pressure, the caption log, settings."""

from __future__ import annotations

import asyncio
import os
import threading

import numpy as np
import pytest

from capguard.server.batcher import Batcher, QueueFull
from capguard.server.settings import Settings
from capguard.server.storage import CaptionLog, CaptionRecord


def run(coro):
    return asyncio.run(coro)


def test_batches_group_by_key_keep_order_and_respect_the_size_limit():
    batches = []

    def run_batch(jobs):
        batches.append(list(jobs))
        return [job.upper() for job in jobs]

    async def main():
        batcher = Batcher(run_batch, max_batch_size=3, max_wait_s=0.2, queue_size=16)
        batcher.start()
        jobs = [("a", "a1"), ("b", "b1"), ("a", "a2"), ("a", "a3"), ("a", "a4"), ("b", "b2")]
        results = await asyncio.gather(*(batcher.submit(job, key) for key, job in jobs))
        batcher.stop()
        return results

    assert run(main()) == ["A1", "B1", "A2", "A3", "A4", "B2"]
    assert batches == [["a1", "a2", "a3"], ["b1", "b2"], ["a4"]]


def test_a_failing_batch_fails_its_jobs_and_the_thread_lives_on():
    def run_batch(jobs):
        if "bad" in jobs:
            raise ValueError("model exploded")
        return jobs

    async def main():
        batcher = Batcher(run_batch, max_batch_size=4, max_wait_s=0.05, queue_size=4)
        batcher.start()
        with pytest.raises(ValueError, match="model exploded"):
            await asyncio.gather(batcher.submit("bad", "k"), batcher.submit("good", "k"))
        assert await batcher.submit("later", "k") == "later"
        assert batcher.alive()
        batcher.stop()
        assert not batcher.alive()

    run(main())


def test_two_model_threads_run_two_batches_side_by_side_and_both_stop():
    both_running = threading.Barrier(2, timeout=10)   # broken (an error) unless two batches overlap
    threads = set()

    def run_batch(jobs):
        threads.add(threading.current_thread().name)
        both_running.wait()
        return [job * 2 for job in jobs]

    async def main():
        batcher = Batcher(run_batch, max_batch_size=2, max_wait_s=0.05, queue_size=8, workers=2)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(i, "k") for i in range(4)))
        assert batcher.alive()
        batcher.stop()
        assert not batcher.alive()
        assert not any(t.is_alive() for t in batcher._threads)
        return results

    assert run(main()) == [0, 2, 4, 6]
    assert threads == {"capguard-model_0", "capguard-model_1"}


def test_full_queue_raises_at_once_and_stop_fails_the_waiting_jobs():
    release = threading.Event()
    started = threading.Event()

    def run_batch(jobs):
        started.set()
        release.wait(10)
        return jobs

    async def main():
        batcher = Batcher(run_batch, max_batch_size=1, max_wait_s=0, queue_size=1)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit("first", "k"))
        await asyncio.to_thread(started.wait, 10)
        second = asyncio.ensure_future(batcher.submit("second", "k"))
        await asyncio.sleep(0.05)
        assert batcher.depth() == 1
        with pytest.raises(QueueFull):
            await batcher.submit("third", "k")
        release.set()
        assert await first == "first"
        assert await second == "second"
        batcher.stop()

    run(main())


def record(sha: str, caption: str, fingerprint: str = "f" * 64, dim: int = 4) -> CaptionRecord:
    rng = np.random.default_rng(len(caption))
    return CaptionRecord(checkpoint="demo", fingerprint=fingerprint, video_sha256=sha, caption=caption,
                         num_tokens=len(caption.split()), siglip=0.5, text_emb=rng.normal(size=dim),
                         video_emb=rng.normal(size=dim), timings_ms={"generate": 12.5})


def test_caption_log_recent_keeps_the_latest_caption_per_video(tmp_path):
    log = CaptionLog(tmp_path / "capguard.db")
    log.append([record("A", "one"), record("B", "two")])
    log.append([record("A", "three"), record("C", "four", fingerprint="0" * 64)])
    assert [(r["video_sha256"], r["caption"]) for r in log.recent("demo", 10)] == [
        ("B", "two"), ("A", "three"), ("C", "four")]
    assert [r["caption"] for r in log.recent("demo", 2)] == ["three", "four"]
    assert [r["caption"] for r in log.recent("demo", 10, fingerprint="f" * 64)] == ["two", "three"]
    assert log.recent("other", 10) == []
    row = log.recent("demo", 1)[0]
    np.testing.assert_allclose(row["text_emb"], record("C", "four").text_emb.astype(np.float32))
    assert row["text_emb"].dtype == np.float32
    log.close()
    reopened = CaptionLog(tmp_path / "capguard.db")   # committed rows are on disk
    assert reopened.count() == 4 and reopened.count("demo") == 4
    mode = reopened._conn.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    reopened.close()


def test_settings_read_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CAPGUARD_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("CAPGUARD_ADMIN_TOKEN", "s3cret")
    monkeypatch.setenv("CAPGUARD_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CAPGUARD_CORS_ORIGINS", '["https://example.org"]')
    settings = Settings()
    assert settings.max_batch_size == 4 and settings.data_dir == tmp_path
    assert settings.admin_token.get_secret_value() == "s3cret" and "s3cret" not in repr(settings)
    assert settings.cors_origins == ["https://example.org"]
    assert settings.guard_options()["window"] == 100 and settings.guard_options()["min_unique_ratio"] == 0.5
    with pytest.raises(ValueError):
        Settings(guard_window=10, guard_min_captions=20)
    with pytest.raises(ValueError):
        Settings(max_batch_sise=4)   # a typo must not pass silently


def test_torch_threads_leave_the_decoders_their_cores(monkeypatch):
    import capguard.server.settings

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(capguard.server.settings, "available_cpus", lambda: 8)
    assert Settings(decode_workers=2).resolved_torch_threads() == 6
    assert Settings(decode_workers=3, torch_threads=4).resolved_torch_threads() == 4   # explicit wins
    monkeypatch.setattr(capguard.server.settings, "available_cpus", lambda: 2)
    assert Settings(decode_workers=2).resolved_torch_threads() == 1                    # never 0
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert Settings().resolved_torch_threads() is None                                 # the operator's choice
    with pytest.raises(ValueError):
        Settings(http="gunicorn")


def test_available_cpus_honours_a_container_cpu_limit(monkeypatch, tmp_path):
    from capguard.server.settings import available_cpus

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    (tmp_path / "cpu.max").write_text("400000 100000\n")          # docker --cpus 4 / a k8s limit of 4
    assert available_cpus(tmp_path) == 4
    (tmp_path / "cpu.max").write_text("150000 100000\n")          # 1.5 CPUs: round up
    assert available_cpus(tmp_path) == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")             # no limit
    assert available_cpus(tmp_path) == 64
    (tmp_path / "cpu.max").unlink()                              # cgroup v1
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("200000")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert available_cpus(tmp_path) == 2
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1")     # v1 without a limit
    assert available_cpus(tmp_path) == 64


def test_a_batch_does_not_wait_for_jobs_nobody_is_preparing():
    async def main(expect_more, patience_s):
        batcher = Batcher(lambda jobs: jobs, max_batch_size=8, max_wait_s=60, queue_size=4,
                          expect_more=expect_more)
        batcher.start()
        try:
            return await asyncio.wait_for(batcher.submit("alone", "k"), timeout=patience_s)
        finally:
            batcher.stop(timeout_s=0.1)

    assert run(main(lambda: False, 10)) == "alone"      # nothing else coming: runs at once
    with pytest.raises(asyncio.TimeoutError):
        run(main(lambda: True, 0.5))                     # more announced: it waits, past the test's patience


@pytest.mark.parametrize("origins", [[], ["https://dashboard.example"]])
def test_cors_is_off_unless_origins_are_listed(server_settings, origins):
    from fastapi.testclient import TestClient

    from capguard.server.app import create_app

    client = TestClient(create_app(server_settings(cors_origins=origins)))   # no lifespan: nothing loads
    r = client.get("/healthz", headers={"Origin": "https://dashboard.example"})
    assert r.status_code == 200
    assert r.headers.get("access-control-allow-origin") == (origins[0] if origins else None)


def test_decode_workers_import_no_web_stack_or_torch():
    """Every decode process imports capguard.server.decode: it must stay light (and so start fast)."""
    import subprocess
    import sys

    code = ("import sys, capguard.server.decode, capguard.models.video; "
            "print(sorted(m for m in ('torch', 'fastapi', 'starlette', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
