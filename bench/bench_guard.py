"""What the live collapse guard costs a caption request: per-observe mean/p99 at window 100 and 10,000.

For each window: fill the guard with `window` rows through ``Guard.restore`` (timed: that is a restart),
then time ``observe`` on fresh videos, enough of them to include at least one full recompute (with the
auto policy that is every observation at window 100 and once per 10,000 at window 10,000), and time
``state().to_dict()`` (what every /caption response and /metrics update pays). The stream is the
expensive case: every caption distinct (clustering is quadratic in distinct captions), with 64-dim
scorer embeddings as the demo stack's scorer gives.

    .venv/bin/python bench/bench_guard.py                       # both windows, healthy stream
    .venv/bin/python bench/bench_guard.py --windows 100 --stream collapsed --request-ms 800

Prints ratios to a typical request (``--request-ms``). Its default, 45 ms, is one request at concurrency 1
on the shipped demo stack on the 2-core dev CPU (bench/RESULTS.md); pass the figure of the stack you
serve. bench/bench_metrics.py measures the request and the guard side by side.
"""

from __future__ import annotations

import argparse
import time

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, nargs="+", default=[100, 10_000])
    parser.add_argument("--observations", type=int, default=1000, help="timed observes per window (at least "
                        "recompute_every, so one full recompute is in the mean)")
    parser.add_argument("--recompute-every", type=int, default=None, help="default: the guard's auto policy")
    parser.add_argument("--stream", choices=["healthy", "collapsed"], default="healthy")
    parser.add_argument("--dim", type=int, default=64, help="scorer embedding size (demo stack: 64)")
    parser.add_argument("--request-ms", type=float, default=45.0,
                        help="a typical /caption request; default: the demo stack at concurrency 1 on 2 CPU cores")
    args = parser.parse_args()
    for window in args.windows:
        bench_window(window, args)


if __name__ == "__main__":
    main()
