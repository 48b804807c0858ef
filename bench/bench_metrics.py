"""Guard + metrics cost of one /caption request as a share of the request, and /metrics scrape time.

    .venv/bin/python bench/bench_metrics.py                          # windows 100 and 10,000, demo stack
    .venv/bin/python bench/bench_metrics.py --windows 100 --observations 200 --request-videos 8

1. The request it is measured against, in this same run: ``--request-videos`` videos of samples/val
   through the stack (decode + ``stack.caption``) one at a time (a request at concurrency 1), and in
   one batch of 8 (the model time each video costs at concurrency 8).
2. Per window: a guard as the server configures it (settings defaults, the checkpoint's own
   thresholds) filled with ``window`` distinct captions (bench/bench_guard.py's worst-case stream:
   every caption distinct), then ``--observations`` requests' worth of the work the server adds to a
   caption, each timed: the loop check (``degeneration``) and ``guard.observe`` (content key, running
   counts, running Vendi) and the metric updates of ``run_batch`` (model thread),
   ``state().to_dict()`` for the response, the request counter and histogram of the middleware.
   The observations are the stack's real captions and embeddings, on fresh videos; the content-key
   cache of whole captions is cleared before each (a server sees new captions made of known words). At window
   10,000 the guard recomputes its clustered figures once per 10,000 observations; that one
   observation is in the mean (and is the max).
3. /metrics scrape: the real app (``create_app``, TestClient, no network) with the caption log
   pre-filled with ``window`` rows, so the guard restores a full window at start; median of
   ``--scrapes`` GET /metrics.

Prints per window: mean / p50 / p99 / max of the added work, its mean as a share of the request at
concurrency 1 and of a video's model time at batch 8, and the scrape's median and p99.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from bench_guard import stream  # noqa: E402  (the window fill: reuse, don't duplicate)
from bench_server import manifest_videos  # noqa: E402


def request_times(checkpoint: Path, paths: list[Path]) -> tuple[float, float, list]:
    """(seconds of one request at c1, model seconds per video in a batch of 8, the stack's outputs)."""
    from capguard.models.stack import load_stack
    from capguard.models.video import sample_frames

    def work():
        stack = load_stack(checkpoint, device="cpu")
        decode = lambda p: sample_frames(p, stack.config.num_frames, max_side=stack.frame_side).frames  # noqa: E731
        stack.caption([decode(paths[0])])   # warm-up
        singles, outputs = [], []
        for path in paths:
            started = time.perf_counter()
            outputs += stack.caption([decode(path)])[0]
            singles.append(time.perf_counter() - started)
        frames = [decode(p) for p in paths[:8]]
        started = time.perf_counter()
        stack.caption(frames)
        return statistics.median(singles), (time.perf_counter() - started) / len(frames), outputs, stack

    with ThreadPoolExecutor(1) as thread:   # torch in a worker thread, as in the server (bench_server.py)
        return thread.submit(work).result()


def guard_settings(window: int, stack_guard: dict):
    from capguard.server.guard import GuardSettings
    from capguard.server.settings import Settings

    options = {**Settings().guard_options(), "window": window, **stack_guard}
    options["min_captions"] = min(options["min_captions"], window)
    return GuardSettings.from_options(options)


def added_work(window: int, outputs: list, stack_guard: dict, observations: int) -> tuple[np.ndarray, np.ndarray]:
    """Seconds of (guard.observe, everything else) for each of `observations` requests, after a full window."""
    from capguard.models import semantic
    from capguard.models.degenerate import degeneration
    from capguard.server.guard import Guard
    from capguard.server.metrics import Metrics

    settings = guard_settings(window, stack_guard)
    dim = outputs[0].text_emb.shape[0]
    guard, metrics = Guard("demo", settings), Metrics()
    guard.restore(stream(window, "healthy", dim, seed=1))
    n = max(observations, settings.effective_recompute_every)
    guard_s, other_s = np.empty(n), np.empty(n)
    for i in range(n):
        out = outputs[i % len(outputs)]
        semantic.content_key.cache_clear()   # a new caption, known words: the word cache stays warm
        started = time.perf_counter()
        loop = degeneration(out.caption, out.num_tokens, 48)                                      # run_batch
        state = guard.observe(f"{i:064x}", out.caption, out.text_emb, out.video_emb, out.score,
                              degenerate=None if loop is None else loop.kind)                     # model thread
        observed = time.perf_counter()
        if loop is not None:
            metrics.degenerate.labels("demo", loop.kind).inc()
        for stage in ("encode", "generate", "score"):
            metrics.stage_seconds.labels(stage).observe(0.01)
        metrics.captions.labels("demo").inc()
        metrics.tokens.labels("demo").inc(out.num_tokens)
        metrics.siglip.labels("demo").observe(out.score)
        metrics.observe_guard("demo", state)
        state.to_dict()                                                                           # the response
        metrics.requests.labels("/caption", "200").inc()                                          # middleware
        metrics.request_seconds.labels("/caption").observe(0.05)
        guard_s[i], other_s[i] = observed - started, time.perf_counter() - observed
    return guard_s, other_s


def scrape_times(checkpoint_dir: Path, window: int, scrapes: int, dim: int) -> tuple[float, float, float]:
    """(median, p99 seconds of GET /metrics, seconds to start the app) with a full guard window restored."""
    from fastapi.testclient import TestClient

    from capguard.models.stack import load_stack
    from capguard.server.app import create_app
    from capguard.server.settings import Settings
    from capguard.server.storage import CaptionLog, CaptionRecord

    stack = load_stack(checkpoint_dir, device="cpu")
    with tempfile.TemporaryDirectory(prefix="capguard-bench-") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        log = CaptionLog(data / "capguard.db")
        rows = stream(window, "healthy", dim, seed=3)
        log.append([CaptionRecord(checkpoint=checkpoint_dir.name, fingerprint=stack.fingerprint,
                                  video_sha256=r["video_sha256"], caption=r["caption"], num_tokens=8,
                                  siglip=r["siglip"], text_emb=r["text_emb"], video_emb=r["video_emb"])
                    for r in rows])
        log.close()
        settings = Settings(checkpoints_root=checkpoint_dir.parent, default_checkpoint=checkpoint_dir.name,
                            data_dir=data, device="cpu", decode_workers=1, guard_window=window,
                            guard_min_captions=min(30, window))
        started = time.perf_counter()
        with TestClient(create_app(settings)) as client:
            startup = time.perf_counter() - started
            restored = client.app.state.capguard.guards.get(checkpoint_dir.name).state().window_captions
            if restored != window:
                raise SystemExit(f"the guard restored {restored} rows, not {window}: check the fill")
            times = []
            for _ in range(scrapes):
                t0 = time.perf_counter()
                response = client.get("/metrics")
                times.append(time.perf_counter() - t0)
                response.raise_for_status()
    return statistics.median(times), float(np.percentile(times, 99)), startup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=REPO / "checkpoints" / "demo")
    parser.add_argument("--windows", type=int, nargs="+", default=[100, 10_000])
    parser.add_argument("--observations", type=int, default=500, help="timed requests per window (at least "
                        "the guard's recompute interval, so one full recompute is in the mean)")
    parser.add_argument("--request-videos", type=int, default=16)
    parser.add_argument("--scrapes", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    paths = manifest_videos(REPO / "samples" / "val" / "val.jsonl", max(8, args.request_videos))
    request_s, batch_video_s, outputs, stack = request_times(args.checkpoint.resolve(), paths)
    print(f"checkpoint {args.checkpoint}; torch threads {args.threads}; load average {os.getloadavg()[0]:.2f}")
    print(f"request at c1 (decode + caption, median of {len(paths)}): {1000 * request_s:.1f} ms; "
          f"model time per video in a batch of 8: {1000 * batch_video_s:.1f} ms")
    for window in args.windows:
        guard_s, other_s = added_work(window, outputs, stack.config.guard, args.observations)
        times = guard_s + other_s
        every = guard_settings(window, stack.config.guard).effective_recompute_every
        scrape_med, scrape_p99, startup = scrape_times(args.checkpoint.resolve(), window, args.scrapes,
                                                     outputs[0].text_emb.shape[0])
        us = 1e6 * times
        print(f"\nwindow {window} (full recompute every {every} observations; {len(times)} requests timed)")
        print(f"  guard + metrics per request: mean {us.mean():.0f} us, p50 {np.median(us):.0f} us, "
              f"p99 {np.percentile(us, 99):.0f} us, max {us.max() / 1000:.1f} ms "
              f"(guard.observe mean {1e6 * guard_s.mean():.0f} us, metrics + response dict {1e6 * other_s.mean():.0f} us)")
        print(f"  share: {times.mean() / request_s:.2%} of a c1 request, "
              f"{times.mean() / batch_video_s:.2%} of a video's model time at batch 8"
              f"{'' if times.max() < request_s else f'; the slowest one is {times.max() / request_s:.1f}x a request'}")
        print(f"  GET /metrics: median {1000 * scrape_med:.2f} ms, p99 {1000 * scrape_p99:.2f} ms "
              f"(app start with the window restored: {startup:.1f} s)")


if __name__ == "__main__":
    main()
