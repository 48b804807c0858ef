"""What the live collapse guard costs a caption request: per-observe mean/p99 at window 100 and 10,000.

For each window: fill the guard with `window` rows through ``Guard.restore`` (timed: that is a restart),
then time ``observe`` on fresh videos, enough of them to include at least one full recompute (with the
auto policy that is every observation at window 100 and once per 10,000 at window 10,000), and time
``state().to_dict()`` (what every /caption response and /metrics update pays). The stream is the
expensive case: every caption distinct (clustering is quadratic in distinct captions), with 64-dim
scorer embeddings as the demo stack's scorer gives.

    .venv/bin/python bench/bench_guard.py                       # both windows, healthy stream
    .venv/bin/python bench/bench_guard.py --windows 100 --stream collapsed --request-ms 800
    .venv/bin/python bench/bench_guard.py --new-figures           # + issue 15's per-caption figures

``--new-figures`` also times, per observed caption, what issue 15 adds beside the guard: the loop check
(``capguard.models.degenerate.degeneration``), the content key (``capguard.models.semantic.content_key``,
kiwipiepy word by word with a word cache) with a running count of distinct keys, and the running Vendi
score (X^T X updated per caption, its eigenvalues every ``RunningVendi.SCORE_EVERY`` captions or on every
full recompute when those are rarer), on two caption streams: random
Hangul words (every word unseen: the analyser's worst case) and the demo's recorded val captions (a real
captioner's vocabulary, tests/data/val-captions-demo.jsonl) with its 128-dim scorer embeddings.

Prints ratios to a typical request (``--request-ms``). Its default, 45 ms, is one request at concurrency 1
on the shipped demo stack on the 2-core dev CPU (bench/RESULTS.md); pass the figure of the stack you
serve. bench/bench_metrics.py measures the request and the guard side by side.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np

from capguard.server.guard import Guard, GuardSettings


def healthy_captions(n: int, seed: int) -> list[str]:
    """n captions of random Hangul syllables (6 words of 3): pairwise far from near-duplicates."""
    codes = np.random.default_rng(seed).integers(0xAC00, 0xAC00 + 11172, (n, 18))
    return [" ".join("".join(map(chr, row[i:i + 3])) for i in range(0, 18, 3)) for row in codes]


def stream(n: int, kind: str, dim: int, seed: int) -> list[dict]:
    """n guard rows for distinct videos: captions per `kind`, matched embeddings, scores."""
    rng = np.random.default_rng(seed)
    video = rng.standard_normal((n, dim)).astype(np.float32)                # (n, dim)
    text = video + 0.3 * rng.standard_normal((n, dim)).astype(np.float32)   # (n, dim)
    if kind == "healthy":
        captions = healthy_captions(n, seed)
    else:  # the field report's worst epoch: a handful of captions for everything
        pool = healthy_captions(4, seed)
        captions = [pool[i % 4] for i in range(n)]
    return [{"video_sha256": f"{seed:08x}{i:056x}", "caption": c, "text_emb": text[i], "video_emb": video[i],
             "siglip": float(rng.random())} for i, c in enumerate(captions)]


def bench_window(window: int, args: argparse.Namespace) -> None:
    settings = GuardSettings(window=window, recompute_every=args.recompute_every)
    every = settings.effective_recompute_every
    n_obs = max(args.observations, every)
    fill = stream(window, args.stream, args.dim, seed=1)
    fresh = stream(n_obs, args.stream, args.dim, seed=2)
    guard = Guard("bench", settings)

    started = time.perf_counter()
    guard.restore(fill)
    restore_s = time.perf_counter() - started

    times_us = np.empty(n_obs)
    for i, row in enumerate(fresh):
        t0 = time.perf_counter_ns()
        guard.observe(**row)
        times_us[i] = (time.perf_counter_ns() - t0) / 1e3
    first = (-(window + 1)) % every  # index of the first timed observe whose count is a multiple of `every`
    recomputes = times_us[first::every]

    to_dict_us = []
    for _ in range(200):
        t0 = time.perf_counter_ns()
        guard.state().to_dict()
        to_dict_us.append((time.perf_counter_ns() - t0) / 1e3)

    mean, p99 = times_us.mean(), np.percentile(times_us, 99)
    request_us = args.request_ms * 1e3
    state = guard.state()
    print(f"window {window:>6}  recompute_every {every:>6}  stream {args.stream}  ({n_obs} observations, "
          f"final status {state.status}, {state.window_captions} videos)")
    print(f"  observe   mean {mean:10.1f} us  p50 {np.median(times_us):10.1f} us  p99 {p99:10.1f} us  "
          f"max {times_us.max():12.1f} us")
    print(f"  full recompute (the observations that ran one): mean {recomputes.mean() / 1e3:9.1f} ms  "
          f"({len(recomputes)} of them)")
    print(f"  restore of {window} rows: {restore_s * 1e3:.1f} ms")
    print(f"  state().to_dict(): mean {np.mean(to_dict_us):.1f} us")
    print(f"  vs a {args.request_ms:g} ms request: observe mean {mean / request_us:.3%}, p99 {p99 / request_us:.3%}, "
          f"worst single observe {times_us.max() / request_us:.1f}x a request")


def demo_captions(n: int) -> list[str]:
    """n captions cycling through the demo's recorded val captions (greedy and sampled passes)."""
    path = Path(__file__).resolve().parents[1] / "tests" / "data" / "val-captions-demo.jsonl"
    captions = [json.loads(line)["caption"] for line in path.read_text().splitlines()]
    return [captions[i % len(captions)] for i in range(n)]


def bench_new_figures(window: int, args: argparse.Namespace) -> None:
    """Per-caption cost of the loop check, the content key + distinct-key count, and the running Vendi score."""
    from capguard.models.degenerate import degeneration
    from capguard.models.semantic import RunningVendi, content_key, warm_up

    started = time.perf_counter()
    warm_up()
    load_s = time.perf_counter() - started
    every = GuardSettings(window=window, recompute_every=args.recompute_every).effective_recompute_every
    n_obs = max(args.observations, every)
    dim = 128   # the demo scorer's text embedding size
    score_every = max(every, RunningVendi.SCORE_EVERY)
    rng = np.random.default_rng(0)
    for label, captions in [("random words", healthy_captions(window + n_obs, seed=3)),
                            ("demo captions", demo_captions(window + n_obs))]:
        content_key.cache_clear()
        emb = rng.standard_normal((window + n_obs, dim))               # (window + n_obs, dim)
        vendi = RunningVendi(dim)
        vendi.reset(emb[:window])
        keys = Counter(content_key(c) for c in captions[:window])    # the window's content keys (fills caches)
        loop_us, content_us, vendi_us, score_us = (np.empty(n_obs) for _ in range(4))
        for i in range(n_obs):
            new, old = window + i, i
            t0 = time.perf_counter_ns()
            degeneration(captions[new], 14, 48)
            t1 = time.perf_counter_ns()
            keys[content_key(captions[new])] += 1
            gone = content_key(captions[old])
            keys[gone] -= 1
            if not keys[gone]:
                del keys[gone]
            t2 = time.perf_counter_ns()
            vendi.replace(emb[old], emb[new])
            t3 = time.perf_counter_ns()
            if i % score_every == 0:
                vendi.score()
            t4 = time.perf_counter_ns()
            loop_us[i], content_us[i], vendi_us[i], score_us[i] = (t1 - t0) / 1e3, (t2 - t1) / 1e3, \
                (t3 - t2) / 1e3, (t4 - t3) / 1e3
        total = loop_us + content_us + vendi_us + score_us
        request_us = args.request_ms * 1e3
        print(f"  new figures, {label} (kiwipiepy load + first call {load_s:.1f} s, once per process):")
        print(f"    loop check {loop_us.mean():7.1f} us   content key + count {content_us.mean():7.1f} us "
              f"(p99 {np.percentile(content_us, 99):7.1f})   Vendi update {vendi_us.mean():6.1f} us   "
              f"Vendi score {score_us[::score_every].mean():7.1f} us every {score_every}")
        print(f"    all new figures: mean {total.mean():7.1f} us = {total.mean() / request_us:.3%} of a "
              f"{args.request_ms:g} ms request; p99 {np.percentile(total, 99):7.1f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, nargs="+", default=[100, 10_000])
    parser.add_argument("--observations", type=int, default=1000, help="timed observes per window (at least "
                        "recompute_every, so one full recompute is in the mean)")
    parser.add_argument("--recompute-every", type=int, default=None, help="default: the guard's auto policy")
    parser.add_argument("--stream", choices=["healthy", "collapsed"], default="healthy")
    parser.add_argument("--dim", type=int, default=64, help="scorer embedding size (demo stack: 64)")
    parser.add_argument("--new-figures", action="store_true", help="also time issue 15's per-caption figures")
    parser.add_argument("--request-ms", type=float, default=45.0,
                        help="a typical /caption request; default: the demo stack at concurrency 1 on 2 CPU cores")
    args = parser.parse_args()
    for window in args.windows:
        bench_window(window, args)
        if args.new_figures:
            bench_new_figures(window, args)


if __name__ == "__main__":
    main()
