"""End-to-end throughput: the server at concurrency 1, 4, 8, 16 against the naive one-video-at-a-time loop.

    .venv/bin/python bench/bench_server.py                        # checkpoints/demo, samples/val (97), 3 rounds
    .venv/bin/python bench/bench_server.py --videos 16 --rounds 1 --concurrency 1 8
    .venv/bin/python bench/bench_server.py --threads 2            # torch intra-op threads, both sides

1. Naive loop, no server: for each video, ``sample_frames`` + ``stack.caption([frames])`` (encode,
   projector, generate, score) one at a time, in a worker thread as the server's model work is: on
   this 2-core box torch in the *main* thread with 2 OpenMP threads ran 20-50x slower than in any
   other thread while another process was busy, an artefact that would flatter the server.
2. ``capguard serve`` as a subprocess on a free port (the same checkpoint, its default settings;
   ``CAPGUARD_*`` variables in the environment pass through), every video POSTed over real HTTP by
   N client threads at once, for each N of ``--concurrency``.
3. Rounds: naive, then each concurrency, repeated ``--rounds`` times, so a change in the machine's
   load hits all of them alike; the table shows each run's median (and range) over the rounds.

Both sides get ``--threads`` torch threads (default 1: two decoder processes, the HTTP server and the
client share the 2 cores with the model thread, and oversubscribed OpenMP threads spin). Every
server caption is compared with the naive loop's caption of the same video. CPU ms per video are read
from /proc: the server process with its decoder processes, and this process (the HTTP client).
Prints the table and the ratios cN / naive; exits 1 if any caption differs.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))   # this tree's models/ and server/, also when another tree is pip-installed
DEFAULT_MANIFEST = REPO / "samples" / "val" / "val.jsonl"


@dataclass
class Run:
    """One pass over all videos by one contender (naive loop or the server at one concurrency)."""
    wall_s: float                     # first request sent -> last answer received
    latencies_s: list[float]          # per video, request sent -> answer
    captions: dict[str, str]          # video name -> caption
    batch: float = 1.0                # mean videos per model call (from /metrics)
    server_cpu_s: float | None = None  # server + decoder processes, user + system
    client_cpu_s: float | None = None  # this process during the run (HTTP client, or the naive loop itself)


@dataclass
class Summary:
    """All rounds of one contender."""
    runs: list[Run] = field(default_factory=list)

    def rates(self, videos: int) -> list[float]:
        return [videos / r.wall_s for r in self.runs]

    def median_rate(self, videos: int) -> float:
        return statistics.median(self.rates(videos))


def manifest_videos(manifest: Path, limit: int | None) -> list[Path]:
    """Video paths listed in a val.jsonl manifest (one JSON object with a "path" per line), in order."""
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    paths = [manifest.parent / row["path"] for row in rows]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"{manifest} lists {len(missing)} videos that are missing, e.g. {missing[0]}")
    return paths[:limit] if limit else paths


def process_cpu_s(pid: int, with_children: bool = True) -> float | None:
    """User + system CPU seconds of `pid` (and its live children) from /proc; None where /proc is absent."""
    tick = os.sysconf("SC_CLK_TCK")

    def one(p: int) -> tuple[float, int]:
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick, int(fields[1])   # utime, stime; ppid

    try:
        total = one(pid)[0]
    except OSError:
        return None
    if with_children:
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != pid:
                try:
                    cpu, ppid = one(int(entry.name))
                except (OSError, IndexError, ValueError):
                    continue
                if ppid == pid:
                    total += cpu
    return total


def own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def naive_runner(checkpoint: Path, device: str) -> Callable[[list[Path]], Run]:
    """A function that runs the naive loop over some videos, in a dedicated worker thread (docstring)."""
    from models.stack import load_stack
    from models.video import sample_frames

    thread = ThreadPoolExecutor(1, thread_name_prefix="naive")
    stack = thread.submit(load_stack, checkpoint, device).result()

    def one(path: Path) -> str:
        frames = sample_frames(path, stack.config.num_frames, max_side=stack.frame_side).frames
        return stack.caption([frames])[0][0].caption

    def loop(paths: list[Path]) -> Run:
        captions, latencies = {}, []
        cpu0, started = own_cpu_s(), time.perf_counter()
        for path in paths:
            t0 = time.perf_counter()
            captions[path.name] = one(path)
            latencies.append(time.perf_counter() - t0)
        wall = time.perf_counter() - started
        return Run(wall, latencies, captions, client_cpu_s=own_cpu_s() - cpu0)

    return lambda paths: thread.submit(loop, paths).result()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, data_dir: Path, device: str, threads: int,
                 log_path: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    env = {**os.environ, "CAPGUARD_DATA_DIR": str(data_dir), "CAPGUARD_DEVICE": device, "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    with log_path.open("wb") as log:   # `python -m` in REPO: the server of this tree, like the naive loop
        process = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(port),
                                    "--checkpoint", str(checkpoint)],
                                   env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"capguard serve exited ({process.returncode}); see {log_path}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit(f"capguard serve not ready in 300 s; see {log_path}")


def batch_stats(client, url: str) -> tuple[float, float]:
    from prometheus_client.parser import text_string_to_metric_families

    values = {s.name: s.value for f in text_string_to_metric_families(client.get(f"{url}/metrics").text)
              for s in f.samples if s.name in ("capguard_batch_size_sum", "capguard_batch_size_count")}
    return values.get("capguard_batch_size_sum", 0.0), values.get("capguard_batch_size_count", 0.0)


def server_run(url: str, server_pid: int, paths: list[Path], concurrency: int) -> Run:
    import httpx

    payloads = [(p.name, p.read_bytes()) for p in paths]
    with httpx.Client(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:
        def post(payload: tuple[str, bytes]) -> tuple[str, str, float]:
            t0 = time.perf_counter()
            r = client.post(f"{url}/caption", files={"video": (payload[0], payload[1], "video/mp4")})
            if r.status_code != 200:
                raise SystemExit(f"POST /caption of {payload[0]} answered {r.status_code}: {r.text[:300]}")
            return payload[0], r.json()["caption"], time.perf_counter() - t0

        sum0, count0 = batch_stats(client, url)
        server0, client0 = process_cpu_s(server_pid), own_cpu_s()
        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            answers = list(pool.map(post, payloads))
        wall = time.perf_counter() - started
        server1, client1 = process_cpu_s(server_pid), own_cpu_s()
        sum1, count1 = batch_stats(client, url)
    return Run(wall, [a[2] for a in answers], {a[0]: a[1] for a in answers},
               batch=(sum1 - sum0) / max(1.0, count1 - count0),
               server_cpu_s=None if server0 is None or server1 is None else server1 - server0,
               client_cpu_s=client1 - client0)


def differing(reference: dict[str, str], captions: dict[str, str]) -> list[str]:
    """Names whose caption differs from the reference's (or is missing).

    Example: differing({"a": "x", "b": "y"}, {"a": "x", "b": "z"}) -> ["b"].
    """
    return [name for name, caption in reference.items() if captions.get(name) != caption]


def table(results: dict[str, Summary], videos: int, reference: dict[str, str]) -> list[str]:
    def per_video_ms(values: list[float | None]) -> str:
        known = [v for v in values if v is not None]
        return f"{1000 * statistics.median(known) / videos:.1f}" if known else "-"

    lines = [f"{'run':<11} {'videos/s':>9} {'range':>13} {'p50 ms':>8} {'p90 ms':>8} {'batch':>6} "
             f"{'srv CPU ms/v':>12} {'this CPU ms/v':>13} {'same captions':>14}"]
    for name, summary in results.items():
        rates = summary.rates(videos)
        latencies = sorted(t for r in summary.runs for t in r.latencies_s)
        same = min(videos - len(differing(reference, r.captions)) for r in summary.runs)
        lines.append(f"{name:<11} {statistics.median(rates):>9.2f} {min(rates):>6.2f}-{max(rates):<6.2f} "
                     f"{1000 * statistics.median(latencies):>8.1f} "
                     f"{1000 * latencies[int(0.9 * (len(latencies) - 1))]:>8.1f} "
                     f"{statistics.mean(r.batch for r in summary.runs):>6.2f} "
                     f"{per_video_ms([r.server_cpu_s for r in summary.runs]):>12} "
                     f"{per_video_ms([r.client_cpu_s for r in summary.runs]):>13} {same:>9}/{videos}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=REPO / "checkpoints" / "demo")
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST, help="val.jsonl of the videos")
    parser.add_argument("--videos", type=int, default=None, help="the first N of the manifest (default: all)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, naive loop and server alike")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads)
    paths = manifest_videos(args.manifest, args.videos)
    n = len(paths)
    print(f"checkpoint {args.checkpoint}; {n} videos from {args.manifest}; {args.rounds} rounds; "
          f"torch threads {args.threads}; device {args.device}; {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.2f}")

    naive = naive_runner(args.checkpoint, args.device)
    naive(paths[:2])   # warm-up
    results = {"naive": Summary(), **{f"server c{c}": Summary() for c in args.concurrency}}
    with tempfile.TemporaryDirectory(prefix="capguard-bench-") as tmp:
        process, url = start_server(args.checkpoint, Path(tmp) / "data", args.device, args.threads,
                                    Path(tmp) / "serve.log")
        try:
            server_run(url, process.pid, paths[:8], max(args.concurrency))   # warm-up
            for round_ in range(args.rounds):
                results["naive"].runs.append(naive(paths))
                for c in args.concurrency:
                    results[f"server c{c}"].runs.append(server_run(url, process.pid, paths, c))
                print(f"round {round_ + 1}/{args.rounds}: naive {n / results['naive'].runs[-1].wall_s:.1f} v/s, "
                      + ", ".join(f"c{c} {n / results[f'server c{c}'].runs[-1].wall_s:.1f}"
                                  for c in args.concurrency), flush=True)
        finally:
            process.terminate()
            process.wait(timeout=30)

    reference = results["naive"].runs[0].captions
    print()
    print("\n".join(table(results, n, reference)))
    base = results["naive"].median_rate(n)
    print("\nthroughput / naive loop: " + "   ".join(
        f"c{c} {results[f'server c{c}'].median_rate(n) / base:.2f}x" for c in args.concurrency))
    if 1 in args.concurrency and 8 in args.concurrency:
        print(f"c8 / c1: {results['server c8'].median_rate(n) / results['server c1'].median_rate(n):.2f}x")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    bad = {name: differing(reference, r.captions) for name, s in results.items() for r in s.runs}
    bad = {name: names for name, names in bad.items() if names}
    if bad:
        name, names = next(iter(bad.items()))
        print(f"CAPTIONS DIFFER from the naive loop's in {len(bad)} runs, e.g. {name}: {names[:5]}")
        sys.exit(1)


if __name__ == "__main__":
    main()
