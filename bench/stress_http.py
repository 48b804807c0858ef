"""Phases 1-2 over HTTP: fuzzed uploads (plus over-size bodies), then load and a burst past the queue.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import httpx
from stress_inputs import FILENAMES, MUTATIONS, make_bombs, make_clips, make_non_videos, make_seeds
from stress_run import BOUNDARY, MAX_UPLOAD, Answer, Run, classify, memory_mb


def phase_fuzz(run: Run) -> None:
    phase = run.begin("fuzz")
    rng = run.rng
    seeds = make_seeds(run.tmp / "seeds")
    bombs = make_bombs(run.tmp / "bombs")
    odd = make_non_videos(rng)
    cases: list[tuple[str, bytes, str, set[int] | None]] = []
    cases += [(f"seed {label}", data, "clip.bin", {200}) for label, data in seeds]
    cases += [(label, data, "clip.bin", allowed) for label, data, allowed in odd]
    names = list(MUTATIONS)
    while len(cases) + len(bombs) + 2 < run.plan.fuzz_cases:
        label, data = seeds[len(cases) % len(seeds)]
        kinds = [names[len(cases) % len(names)]] + ([rng.choice(names)] if rng.random() < 0.25 else [])
        for kind in kinds:
            data = MUTATIONS[kind](data, rng) or b"\0"
        cases.append((f"{' + '.join(kinds)} of {label}", data, rng.choice(FILENAMES), None))

    # bombs first, on fresh decoders, so their peak RSS (VmHWM) is theirs alone
    run.sampler.worker_peak_mb = 0.0
    for label, data in bombs:
        answer = run.post_video(data, label, allowed={413})
        phase.count(answer)
    run.sampler.sample()
    phase.figures["bomb decoder peak RSS MB"] = f"{run.sampler.worker_peak_mb:.0f}"
    if run.sampler.worker_peak_mb > 512:
        phase.violate(f"a decoder reached {run.sampler.worker_peak_mb:.0f} MB on the bombs: "
                      "frames were allocated")
    for answer in oversize_uploads(run):
        phase.count(answer)

    def one(case: tuple[str, bytes, str, set[int] | None]) -> Answer:
        label, data, filename, allowed = case
        fields = {"num_frames": str(rng.randint(1, 16))} if rng.random() < 0.5 else {}
        return run.post_video(data, label, filename, fields, allowed)

    with ThreadPoolExecutor(run.plan.fuzz_clients) as pool:
        for case, answer in zip(cases, pool.map(one, cases), strict=True):
            phase.count(answer)
            if answer.code == "decode_failed":   # capguard.models.video let a non-VideoError out: a decoder bug
                phase.violate(f"{case[0]}: decode_failed: {answer.body['error']['message']}")
    run.settle(phase)


def oversize_uploads(run: Run) -> list[Answer]:
    """An upload over max_upload_bytes, once with Content-Length and once chunked: both 413 at once."""
    answers = [run.post_video(b"\0" * (MAX_UPLOAD + 1), "oversize with Content-Length", allowed={413})]
    head = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="video"; filename="big.mp4"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()

    def chunked() -> Iterable[bytes]:
        yield head
        for _ in range(MAX_UPLOAD // 2**16 + 8):
            yield b"\0" * 2**16
        yield f"\r\n--{BOUNDARY}--\r\n".encode()

    started = time.perf_counter()
    try:
        r = run.client().post("/caption", content=chunked(),
                              headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
        answers.append(classify(r.status_code, dict(r.headers), r.content, time.perf_counter() - started,
                                "oversize chunked", {413}))
    except httpx.TransportError as exc:   # the server may answer 413 and close while we still send
        answers.append(Answer(None, None, None, time.perf_counter() - started,
                              f"oversize chunked: connection error {exc}"))
    return answers


def phase_load(run: Run) -> None:
    phase = run.begin("load")
    clips = make_clips(run.tmp / "clips", 24)
    latencies: list[float] = []
    answers: list[Answer] = []
    lock = threading.Lock()
    run.sampler.sample()
    rss_before = memory_mb(run.server.pid)
    deadline = time.monotonic() + run.plan.load_seconds

    def client(i: int) -> None:
        rng = random.Random(i)
        while time.monotonic() < deadline:
            answer = run.post_video(rng.choice(clips), f"load client {i}", allowed={200, 503})
            with lock:
                answers.append(answer)
                if answer.status == 200:
                    latencies.append(answer.seconds)
            if answer.status == 503:
                time.sleep(0.1)

    started = time.monotonic()
    with ThreadPoolExecutor(run.plan.load_clients) as pool:
        list(pool.map(client, range(run.plan.load_clients)))
    wall = time.monotonic() - started
    for answer in answers:
        phase.count(answer)
    rss_after = memory_mb(run.server.pid)
    if latencies:
        q = statistics.quantiles(latencies, n=100, method="inclusive")
        phase.figures["latency p50/p95/p99 ms"] = f"{1e3 * q[49]:.0f}/{1e3 * q[94]:.0f}/{1e3 * q[98]:.0f}"
    phase.figures["throughput captions/s"] = f"{len(latencies) / wall:.2f}"
    phase.figures["server RSS growth MB"] = (f"{rss_after - rss_before:+.0f} "
                                             f"({rss_before:.0f}->{rss_after:.0f})")
    phase.figures["load clients x seconds"] = f"{run.plan.load_clients} x {run.plan.load_seconds:g}"

    # a burst: all at the same instant, more than the queue holds; the overflow must be 503 + Retry-After
    barrier = threading.Barrier(run.plan.burst)

    def burst(i: int) -> Answer:
        barrier.wait()
        return run.post_video(clips[i % len(clips)], "burst", allowed={200, 503})

    with ThreadPoolExecutor(run.plan.burst) as pool:
        burst_answers = list(pool.map(burst, range(run.plan.burst)))
    for answer in burst_answers:
        phase.count(answer)
    refused = sum(a.status == 503 for a in burst_answers)
    phase.figures["burst served / 503"] = f"{run.plan.burst - refused} / {refused}"
    run.settle(phase)
