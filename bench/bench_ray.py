"""Per-request cost of the Ray path: ``capguard serve --ray`` against the plain server, same videos, same rounds.

    python bench/bench_ray.py                          # demo checkpoint, 16 val videos, c1 and c16, 2 rounds
    python bench/bench_ray.py --videos 32 --rounds 3 --replicas 2

Runs itself inside a loopback-only network namespace (``unshare -n``, ``-r`` when not root), as every Ray cluster here
must: Ray, both servers and the HTTP client all stay on 127.0.0.1. The plain server is bench_server.py's
(``capguard serve`` as a subprocess); the Ray one is ``build_app`` on a local 2-CPU cluster (ingress with
its decoder process, model replicas with one torch thread each, the guard actor writing the caption log).
Each round measures every contender at every concurrency, so a change in the machine's load hits all
alike; the table shows medians over the rounds. Overhead = Ray's per-request latency minus the plain
server's at c1 (one request in flight: the hops Ray adds, not the model); at c16 the per-video wall time
says what the hops cost in throughput. Captions of both must agree (exit 1 otherwise).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_server import differing, manifest_videos, server_run, start_server  # noqa: E402
from ray_local import CLUSTER, loopback_only  # noqa: E402


def in_namespace() -> None:
    """Re-run this script inside a fresh network namespace with only loopback, unless already in one."""
    if loopback_only():
        return
    if shutil.which("unshare") is None:
        raise SystemExit("bench_ray.py runs Ray in a loopback-only network namespace: needs unshare (util-linux)")
    command = " ".join([sys.executable, *map(lambda a: f"'{a}'", [__file__, *sys.argv[1:]])])
    user_ns = [] if os.geteuid() == 0 else ["-r"]   # not root: a user namespace owns the network namespace
    os.execvp("unshare", ["unshare", "-n", *user_ns, "sh", "-c", f"ip link set lo up && exec {command}"])


def start_ray(data_dir: Path, replicas: int, port: int) -> str:
    import ray
    from ray import serve

    from capguard.server.ray_serve import build_app
    from capguard.server.settings import Settings

    ray.init(**CLUSTER)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = Settings(checkpoints_root=REPO / "checkpoints", default_checkpoint="demo", device="cpu",
                        data_dir=data_dir)
    runner = threading.Thread(target=serve.run, args=(build_app(settings, replicas=replicas),),
                              kwargs={"name": "capguard", "route_prefix": "/"}, daemon=True)
    runner.start()
    runner.join(timeout=300)   # serve.run waits forever for resources it cannot get
    if runner.is_alive():
        raise SystemExit(f"the Ray application with {replicas} replicas did not start in 300 s")
    return f"http://127.0.0.1:{port}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--replicas", type=int, default=1, help="Ray model replicas (1: the overhead alone; "
                        "2 on a 2-core box: the replicas share the cores with everything else)")
    args = parser.parse_args()
    in_namespace()
    os.environ.update({"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1",
                       "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    paths = manifest_videos(REPO / "samples" / "val" / "val.jsonl", args.videos)
    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    plain, plain_url = start_server(REPO / "checkpoints" / "demo", work / "plain", "cpu", 1, work / "plain.log")
    started = time.perf_counter()
    contenders = {"plain": (plain_url, plain.pid),
                  f"ray x{args.replicas}": (start_ray(work / "ray", args.replicas, 8765), os.getpid())}
    print(f"servers up in {time.perf_counter() - started:.0f} s; {len(paths)} videos, {args.rounds} rounds",
          flush=True)
    runs: dict[tuple[str, int], list] = {}
    for _ in range(args.rounds):
        for concurrency in args.concurrency:
            for label, (url, pid) in contenders.items():
                runs.setdefault((label, concurrency), []).append(server_run(url, pid, paths, concurrency))
    plain.terminate()
    import ray

    ray.shutdown()
    reference = runs[("plain", args.concurrency[0])][0].captions
    lines = [f"{'contender':<10} {'conc':>4} {'p50 latency ms':>15} {'wall ms/video':>14} {'vs plain':>9}"]
    bad = []
    for (label, concurrency), got in runs.items():
        p50 = statistics.median(statistics.median(r.latencies_s) for r in got) * 1000
        per_video = statistics.median(r.wall_s for r in got) / len(paths) * 1000
        base = statistics.median(r.wall_s for r in runs[("plain", concurrency)]) / len(paths) * 1000
        lines.append(f"{label:<10} {concurrency:>4} {p50:>15.1f} {per_video:>14.1f} {per_video / base:>8.2f}x")
        bad += [f"{label} c{concurrency}: {name}" for r in got for name in differing(reference, r.captions)]
    for concurrency in args.concurrency:
        plain_p50 = statistics.median(statistics.median(r.latencies_s) for r in runs[("plain", concurrency)])
        for label in contenders:
            if label != "plain":
                ray_p50 = statistics.median(statistics.median(r.latencies_s) for r in runs[(label, concurrency)])
                lines.append(f"overhead {label} c{concurrency}: {1000 * (ray_p50 - plain_p50):+.1f} ms per request (p50)")
    print("\n".join(lines))
    if bad:
        print("captions differ: " + ", ".join(bad[:10]))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
