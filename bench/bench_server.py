"""End-to-end throughput: the server at concurrency 1, 4, 8, 16 against the naive one-video-at-a-time loop.

    .venv/bin/python bench/bench_server.py                        # checkpoints/demo, samples/val (97), 3 rounds
    .venv/bin/python bench/bench_server.py --videos 16 --rounds 1 --concurrency 1 8
    .venv/bin/python bench/bench_server.py --threads 2            # torch intra-op threads, both sides
    .venv/bin/python bench/bench_server.py --variant guard8=,CAPGUARD_GUARD_RECOMPUTE_EVERY=8 \
        --variant before=/tmp/capguard-before                      # more servers, measured in the same rounds
    unshare -n sh -c 'ip link set lo up && .venv-vllm/bin/python bench/bench_server.py --engine hf vllm'
                                                                   # one server per LLM engine, side by side

1. Naive loop, no server: for each video, ``sample_frames`` + ``stack.caption([frames])`` (encode,
   projector, generate, score) one at a time, in a worker thread as the server's model work is: on
   this 2-core box torch in the *main* thread with 2 OpenMP threads ran 20-50x slower than in any
   other thread while another process was busy, an artefact that would flatter the server.
2. ``capguard serve`` as a subprocess on a free port (the same checkpoint, its default settings;
   ``CAPGUARD_*`` variables in the environment pass through), every video POSTed over real HTTP by
   N client threads at once, for each N of ``--concurrency``.
   ``--variant`` adds servers from other source trees (e.g. ``git archive OLD | tar -x -C DIR``)
   and/or with other ``CAPGUARD_*`` settings, each on its own port, measured in the same rounds.
   ``--engine hf vllm`` replaces the one server with one per engine (``CAPGUARD_ENGINE``), rows
   ``hf cN`` and ``vllm cN``; the naive loop stays HF's (engine hf), whatever the environment says.
3. Rounds: naive, then each concurrency, repeated ``--rounds`` times, so a change in the machine's
   load hits all of them alike (the servers' order turns by one each round); the table shows each run's
   median (and range) over the rounds. One more naive run after the last round gives every server run a
   naive run just before and after it: the "paired" ratios divide each run by the mean of those two (the
   host's speed drifts on a shared VM).
   ``--passes K`` sends every video K times per run (naive loop too): a server fills its pipeline at
   the start of a run and drains it at the end, which weighs less over more requests.
4. The model's own ceiling: ``stack.caption`` alone on decoded frames at batch 1, 4 and 8 (ms per
   video). Naive ms / batch-B ms is what a server whose model thread never idles could reach with
   batches of B; concurrency 8 gives batches of about 4 (while one batch runs, the other half of the
   clients upload and decode the next one).

Both sides get ``--threads`` torch threads (default 1: two decoder processes, the HTTP server and the
client share the 2 cores with the model thread, and oversubscribed OpenMP threads spin). Every
server caption is compared with the naive loop's caption of the same video. CPU ms per video are read
from /proc: the server process with its decoder processes, and this process (the HTTP client); "others
CPU" is how many CPUs' worth the machine's other processes used meanwhile (on a shared 2-core box a
figure above ~0.2 means the run was starved; ``--quiet-wait`` waits for a quiet spell before each round).
Prints the table and the ratios cN / naive; exits 1 if any caption differs.
"""

from __future__ import annotations

import argparse
import json
import os
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

from serving import free_port, wait_ready  # noqa: E402  (one home for starting a server: bench/serving.py)

DEFAULT_MANIFEST = REPO / "samples" / "val" / "val.jsonl"


@dataclass
class Run:
    """One run of one contender (naive loop or the server at one concurrency): ``--passes`` passes over all
    videos."""
    wall_s: float                     # first request sent -> last answer received
    latencies_s: list[float]          # per request, request sent -> answer
    captions: dict[str, str]          # video name -> caption (a marker that differs from any caption when
                                      # the passes disagree: see same_captions)
    batch: float = 1.0                # mean videos per model call (from /metrics)
    server_cpu_s: float | None = None  # server + decoder processes, user + system
    client_cpu_s: float | None = None  # this process during the run (HTTP client, or the naive loop itself)
    others_cpu: float | None = None    # CPUs' worth used by other processes during the run (shared machines)


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


def machine_busy_s() -> float | None:
    """CPU seconds all processes have used (the "cpu" line of /proc/stat, less idle and iowait)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def others_cpu(busy0: float | None, busy1: float | None, ours_s: float, wall_s: float) -> float | None:
    """CPUs' worth that processes other than ours used over `wall_s`.

    Example: 3.0 s busy on the machine in 2 s of wall, 2.0 s of it ours -> 0.5 (half a CPU).
    """
    if busy0 is None or busy1 is None:
        return None
    return max(0.0, (busy1 - busy0 - ours_s) / wall_s)


def wait_for_quiet(max_s: float, idle_share: float = 0.85, window_s: float = 3.0) -> float:
    """Wait up to `max_s` for a `window_s` in which the CPUs were at least `idle_share` idle; returns the wait."""
    started = time.monotonic()
    while time.monotonic() - started < max_s:
        busy0 = machine_busy_s()
        time.sleep(window_s)
        busy1 = machine_busy_s()
        if busy0 is None or busy1 is None or (busy1 - busy0) / (window_s * os.cpu_count()) <= 1 - idle_share:
            break
    return time.monotonic() - started


def naive_runner(checkpoint: Path, device: str) -> tuple[Callable[..., Run],
                                                         Callable[[list[Path], int], float]]:
    """(the naive loop over some videos, the model's own ms per video at a batch size), both run on one
    dedicated worker thread (module docstring)."""
    from capguard.models.stack import load_stack
    from capguard.models.video import sample_frames

    thread = ThreadPoolExecutor(1, thread_name_prefix="naive")
    stack = thread.submit(load_stack, checkpoint, device, engine="hf").result()   # the naive loop is HF's

    def one(path: Path) -> str:
        frames = sample_frames(path, stack.config.num_frames, max_side=stack.frame_side).frames
        return stack.caption([frames])[0][0].caption

    def loop(paths: list[Path], threads: int | None = None) -> Run:
        import torch

        before = torch.get_num_threads()
        if threads is not None:   # process-wide; put back after this run
            torch.set_num_threads(threads)
        try:
            answers, latencies = [], []
            busy0, cpu0, started = machine_busy_s(), own_cpu_s(), time.perf_counter()
            for path in paths:
                t0 = time.perf_counter()
                answers.append((path.name, one(path)))
                latencies.append(time.perf_counter() - t0)
            wall = time.perf_counter() - started
        finally:
            torch.set_num_threads(before)
        ours = own_cpu_s() - cpu0
        return Run(wall, latencies, same_captions(answers), client_cpu_s=ours,
                   others_cpu=others_cpu(busy0, machine_busy_s(), ours, wall))

    def model(paths: list[Path], batch: int) -> float:
        """Milliseconds per video of stack.caption alone on decoded frames, `batch` videos a call: what
        the server's model thread spends on a batch, whatever else runs beside it."""
        frames = [sample_frames(p, stack.config.num_frames, max_side=stack.frame_side).frames for p in paths]
        stack.caption(frames[:batch])   # warm-up
        started = time.perf_counter()
        for i in range(0, len(frames) - batch + 1, batch):
            stack.caption(frames[i:i + batch])
        return 1000 * (time.perf_counter() - started) / (len(frames) // batch * batch)

    return (lambda paths, threads=None: thread.submit(loop, paths, threads).result(),
            lambda paths, batch: thread.submit(model, paths, batch).result())


@dataclass(frozen=True)
class Variant:
    """A server to measure: this tree's by default, or another source tree's, with extra environment."""
    label: str                                   # row label: "server", or the --variant name
    tree: Path = REPO                            # `python -m capguard.server.cli` runs from here
    env: dict[str, str] = field(default_factory=dict)   # e.g. {"CAPGUARD_GUARD_RECOMPUTE_EVERY": "8"}


def parse_variant(text: str) -> Variant:
    """--variant LABEL=[TREE][,KEY=VALUE...] -> Variant.

    Example: "guard8=,CAPGUARD_GUARD_RECOMPUTE_EVERY=8" -> Variant("guard8", REPO, {"CAPGUARD_...": "8"});
    "before=/tmp/old" -> the server of the checkout in /tmp/old.
    """
    label, sep, rest = text.partition("=")
    if not sep or not label:
        raise argparse.ArgumentTypeError(f"--variant wants LABEL=[TREE][,KEY=VALUE...], got {text!r}")
    tree, *pairs = rest.split(",")
    if any("=" not in pair for pair in pairs):
        raise argparse.ArgumentTypeError(f"--variant {text!r}: environment entries must be KEY=VALUE")
    path = Path(tree).resolve() if tree else REPO
    if not (path / "server" / "cli.py").is_file():
        raise argparse.ArgumentTypeError(f"--variant {text!r}: {path} is not a capguard source tree")
    return Variant(label, path, dict(pair.split("=", 1) for pair in pairs))


def start_server(checkpoint: Path, data_dir: Path, device: str, threads: int,
                 log_path: Path, variant: Variant = Variant("server")) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "CAPGUARD_DATA_DIR": str(data_dir), "CAPGUARD_DEVICE": device, "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           **variant.env}
    with log_path.open("wb") as log:   # `python -m` in the tree: its own server/ and models/
        process = subprocess.Popen([sys.executable, "-m", "capguard.server.cli", "serve", "--port", str(port),
                                    "--checkpoint", str(checkpoint.resolve())],
                                   env=env, stdout=log, stderr=subprocess.STDOUT, cwd=variant.tree)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, process, 300, log_tail=lambda: f"see {log_path}", poll_s=0.5)
    return process, url


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
        busy0, server0, client0 = machine_busy_s(), process_cpu_s(server_pid), own_cpu_s()
        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            answers = list(pool.map(post, payloads))
        wall = time.perf_counter() - started
        busy1, server1, client1 = machine_busy_s(), process_cpu_s(server_pid), own_cpu_s()
        sum1, count1 = batch_stats(client, url)
    return Run(wall, [a[2] for a in answers], same_captions([a[:2] for a in answers]),
               batch=(sum1 - sum0) / max(1.0, count1 - count0),
               server_cpu_s=None if server0 is None or server1 is None else server1 - server0,
               client_cpu_s=client1 - client0,
               others_cpu=others_cpu(busy0, busy1, (server1 or 0.0) - (server0 or 0.0) + client1 - client0, wall))


def same_captions(answers: list[tuple[str, str]]) -> dict[str, str]:
    """Video name -> caption over several passes; a video whose passes gave different captions gets a
    marker that equals no caption, so it counts as differing from the reference.

    Example: same_captions([("a", "x"), ("a", "x"), ("b", "y"), ("b", "z")]) -> {"a": "x", "b": "<passes differ: y | z>"}
    """
    seen: dict[str, list[str]] = {}
    for name, caption in answers:
        if caption not in seen.setdefault(name, []):
            seen[name].append(caption)
    return {name: c[0] if len(c) == 1 else f"<passes differ: {' | '.join(c)}>" for name, c in seen.items()}


def differing(reference: dict[str, str], captions: dict[str, str]) -> list[str]:
    """Names whose caption differs from the reference's (or is missing).

    Example: differing({"a": "x", "b": "y"}, {"a": "x", "b": "z"}) -> ["b"].
    """
    return [name for name, caption in reference.items() if captions.get(name) != caption]


def table(results: dict[str, Summary], videos: int, reference: dict[str, str]) -> list[str]:
    """The table's lines; `videos` is the requests per run (rates, CPU per video), `reference` the naive
    loop's caption of each distinct video."""
    def per_video_ms(values: list[float | None]) -> str:
        known = [v for v in values if v is not None]
        return f"{1000 * statistics.median(known) / videos:.1f}" if known else "-"

    width = max(11, *(len(name) for name in results))
    lines = [f"{'run':<{width}} {'videos/s':>9} {'range':>13} {'p50 ms':>8} {'p90 ms':>8} {'batch':>6} "
             f"{'srv CPU ms/v':>12} {'this CPU ms/v':>13} {'others CPU':>10} {'same captions':>14}"]
    for name, summary in results.items():
        rates = summary.rates(videos)
        latencies = sorted(t for r in summary.runs for t in r.latencies_s)
        same = min(len(reference) - len(differing(reference, r.captions)) for r in summary.runs)
        others = [r.others_cpu for r in summary.runs if r.others_cpu is not None]
        lines.append(f"{name:<{width}} {statistics.median(rates):>9.2f} {min(rates):>6.2f}-{max(rates):<6.2f} "
                     f"{1000 * statistics.median(latencies):>8.1f} "
                     f"{1000 * latencies[int(0.9 * (len(latencies) - 1))]:>8.1f} "
                     f"{statistics.mean(r.batch for r in summary.runs):>6.2f} "
                     f"{per_video_ms([r.server_cpu_s for r in summary.runs]):>12} "
                     f"{per_video_ms([r.client_cpu_s for r in summary.runs]):>13} "
                     f"{f'{statistics.median(others):.2f}' if others else '-':>10} {same:>9}/{len(reference)}")
    return lines


def paired_ratios(rates: list[float], naive_rates: list[float]) -> list[float]:
    """Round i's rate over the mean of the naive rates of rounds i and i + 1 (``naive_rates`` has one more
    entry: the naive run after the last round).

    Example: paired_ratios([30.0, 33.0], [10.0, 10.0, 12.0]) -> [3.0, 3.0].
    """
    return [rate / ((naive_rates[i] + naive_rates[i + 1]) / 2) for i, rate in enumerate(rates)]


def paired_summary(rates: list[float], naive_rates: list[float]) -> str:
    """'2.95x (2.80-3.10)': the median and range of paired_ratios."""
    ratios = paired_ratios(rates, naive_rates)
    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=REPO / "checkpoints" / "demo")
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST, help="val.jsonl of the videos")
    parser.add_argument("--videos", type=int, default=None, help="the first N of the manifest (default: all)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--passes", type=int, default=1, help="passes over the videos in each run (naive loop "
                        "and server alike): the server's fill at the start and drain at the end of a run weigh "
                        "less with more passes, i.e. closer to its throughput under sustained load")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, naive loop and server alike")
    parser.add_argument("--naive-threads", type=int, nargs="*", default=[], metavar="N",
                        help="also run the naive loop with N torch threads (rows 'naive tN'): a plain loop left "
                        "to torch's defaults uses every core; ratios are also printed against the fastest")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quiet-wait", type=float, default=0.0, help="before each round, wait up to this many "
                        "seconds for the other processes on the machine to go quiet (85 %% idle for 3 s)")
    parser.add_argument("--variant", type=parse_variant, action="append", default=[],
                        metavar="LABEL=[TREE][,KEY=VALUE...]", help="another server measured in the same rounds: "
                        "another source tree (e.g. a git worktree of an older commit) and/or CAPGUARD_* settings")
    parser.add_argument("--engine", nargs="+", choices=["auto", "hf", "vllm"], default=None,
                        help="one server per LLM engine (CAPGUARD_ENGINE), side by side in the same rounds; run "
                        "with the venv that has vLLM (.venv-vllm) for vllm")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads)
    if args.passes < 1:
        parser.error("--passes must be at least 1")
    videos = manifest_videos(args.manifest, args.videos)
    paths = videos * args.passes   # every run sends these, in this order
    n = len(paths)                 # requests per run: rates and CPU per video count each pass
    print(f"checkpoint {args.checkpoint}; {len(videos)} videos x {args.passes} passes from {args.manifest}; "
          f"{args.rounds} rounds; "
          f"torch threads {args.threads}; device {args.device}; {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.2f}")

    servers_ = ([Variant(e, REPO, {"CAPGUARD_ENGINE": e}) for e in dict.fromkeys(args.engine)] if args.engine
                else [Variant("server")])
    variants = [*servers_, *args.variant]
    for v in variants:
        if v.label != "server":
            print(f"variant {v.label}: tree {v.tree}, environment {v.env or '-'}")
    naive, model_ms = naive_runner(args.checkpoint, args.device)
    naive(paths[:2])   # warm-up
    naive_extra = {f"naive t{t}": t for t in args.naive_threads if t != args.threads}
    results = {"naive": Summary(), **{name: Summary() for name in naive_extra},
               **{f"{v.label} c{c}": Summary() for c in args.concurrency for v in variants}}
    with tempfile.TemporaryDirectory(prefix="capguard-bench-") as tmp:
        servers = {}
        try:
            for i, v in enumerate(variants):   # all started first; each idles while another is measured
                servers[v.label] = start_server(args.checkpoint, Path(tmp) / f"data{i}", args.device, args.threads,
                                                Path(tmp) / f"serve{i}.log", v)
            for process, url in servers.values():
                server_run(url, process.pid, paths[:8], max(args.concurrency))   # warm-up
            for round_ in range(args.rounds):
                if args.quiet_wait:
                    waited = wait_for_quiet(args.quiet_wait)
                    print(f"round {round_ + 1}: waited {waited:.0f} s for a quiet machine", flush=True)
                results["naive"].runs.append(naive(paths))
                for name, threads in naive_extra.items():
                    results[name].runs.append(naive(paths, threads))
                # the servers' order turns by one each round: none is always the one measured right after the
                # naive loop (or always last)
                order = list(servers.items())[round_ % len(servers):] + list(servers.items())[:round_ % len(servers)]
                for c in args.concurrency:
                    for label, (process, url) in order:
                        results[f"{label} c{c}"].runs.append(server_run(url, process.pid, paths, c))
                print(f"round {round_ + 1}/{args.rounds}: naive {n / results['naive'].runs[-1].wall_s:.1f} v/s, "
                      + ", ".join(f"{name} {n / s.runs[-1].wall_s:.1f}" for name, s in results.items()
                                  if name != "naive"), flush=True)
            closing_naive = naive(paths)   # after the last round: every run has a naive run before and after it
        finally:
            for process, _ in servers.values():
                process.terminate()
            for process, _ in servers.values():
                process.wait(timeout=30)

    reference = results["naive"].runs[0].captions
    print()
    print("\n".join(table(results, n, reference)))
    base = results["naive"].median_rate(n)
    for v in variants:
        prefix = "" if v.label == "server" else f"{v.label} "
        print(f"\n{prefix}throughput / naive loop: " + "   ".join(
            f"c{c} {results[f'{v.label} c{c}'].median_rate(n) / base:.2f}x" for c in args.concurrency), end="")
    print()
    # The host's speed drifts within a run (on a shared VM the naive loop moved 9.3 -> 11.7 v/s over three
    # rounds): a run against the naive runs just before and after it is the ratio that drift disturbs least.
    naive_rates = [n / r.wall_s for r in [*results["naive"].runs, closing_naive]]
    for v in variants:
        prefix = "" if v.label == "server" else f"{v.label} "
        print(f"{prefix}paired (each run / mean of the naive runs before and after it): " + "   ".join(
            f"c{c} {paired_summary(results[f'{v.label} c{c}'].rates(n), naive_rates)}" for c in args.concurrency))
    if naive_extra:
        best = max(["naive", *naive_extra], key=lambda name: results[name].median_rate(n))
        best_rate = results[best].median_rate(n)
        for v in variants:
            prefix = "" if v.label == "server" else f"{v.label} "
            print(f"{prefix}throughput / fastest naive loop ({best}): " + "   ".join(
                f"c{c} {results[f'{v.label} c{c}'].median_rate(n) / best_rate:.2f}x" for c in args.concurrency))
    if 1 in args.concurrency and 8 in args.concurrency and "server c1" in results:
        print(f"c8 / c1: {results['server c8'].median_rate(n) / results['server c1'].median_rate(n):.2f}x")
    ceiling = {b: model_ms(paths[:min(n, 24)], b) for b in (1, 4, 8) if b <= n}
    print("model thread alone (stack.caption on decoded frames), ms per video: " + ", ".join(
        f"batch {b} {ms:.1f}" for b, ms in ceiling.items()) + "; naive loop " + f"{1000 / base:.1f}")
    print("ceiling (model thread never idle, everything else on the other core): " + ", ".join(
        f"batches of {b} {1000 / base / ms:.2f}x naive" for b, ms in ceiling.items() if b > 1))
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    bad = {name: differing(reference, r.captions) for name, s in results.items() for r in s.runs}
    bad = {name: names for name, names in bad.items() if names}
    if bad:
        name, names = next(iter(bad.items()))
        print(f"CAPTIONS DIFFER from the naive loop's in {len(bad)} runs, e.g. {name}: {names[:5]}")
        sys.exit(1)


if __name__ == "__main__":
    main()
