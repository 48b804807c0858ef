"""What the server's dynamic batching buys: videos/s at concurrency 1 and 8, and a naive loop beside them.

    .venv/bin/python bench/bench_server.py                          # checkpoints/demo, 32 videos
    .venv/bin/python bench/bench_server.py --checkpoint DIR --videos 64 --max-new-tokens 24

1. Renders N synthetic building clips (models.synth, 16 frames at 128x128, H.264).
2. Naive loop, no server: for each clip, sample_frames + stack.caption([frames]) one at a time. It
   runs in a worker thread, as the server's model work does: on this 2-core box with another job
   running, torch in the *main* thread (2 OpenMP threads) captioned 20-50x slower than in any other
   thread, an artefact that would flatter the server.
3. ``capguard serve`` as a subprocess on a free port; every clip POSTed over real HTTP, first by one
   client at a time (concurrency 1), then by 8 client threads (concurrency 8). The server batches
   concurrent requests into one stack.caption call (CAPGUARD_MAX_BATCH_SIZE, default 8).

Prints throughput, median latency and the mean batch size (from /metrics) of each run, and the
ratios c8/c1 and c1/naive. Without checkpoints/demo (before ``capguard train`` has made it) it
benchmarks a random-init ``init_checkpoint`` stack and says so: those generate every one of
max_new_tokens (no EOS), so they are a worst case for generation time.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def render_clips(out: Path, n: int, seed: int) -> list[Path]:
    import numpy as np

    from models.synth import render_frames, sample_attributes, write_video

    rng = np.random.default_rng(seed)
    return [write_video(render_frames(sample_attributes(rng), rng, num_frames=16, size=128), out / f"clip{i:03d}.mp4")
            for i in range(n)]


def naive_loop(checkpoint: Path, clips: list[Path], max_new_tokens: int | None, device: str) -> dict:
    from models.stack import load_stack
    from models.video import sample_frames

    stack = load_stack(checkpoint, device=device)
    tokens = None if max_new_tokens is None else [max_new_tokens]

    def one(path: Path) -> None:
        frames = sample_frames(path, stack.config.num_frames, max_side=stack.frame_side).frames
        stack.caption([frames], max_new_tokens=tokens)

    def loop() -> tuple[float, list[float]]:
        one(clips[0])   # warm-up
        latencies = []
        started = time.perf_counter()
        for path in clips:
            t0 = time.perf_counter()
            one(path)
            latencies.append(time.perf_counter() - t0)
        return time.perf_counter() - started, latencies

    with ThreadPoolExecutor(1) as thread:   # see the module docstring
        wall, latencies = thread.submit(loop).result()
    return {"videos_per_s": len(clips) / wall, "p50_ms": 1000 * statistics.median(latencies), "batch": 1.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, data_dir: Path, device: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    env = {**os.environ, "CAPGUARD_DATA_DIR": str(data_dir), "CAPGUARD_DEVICE": device, "HF_HUB_OFFLINE": "1"}
    script = Path(sys.executable).with_name("capguard")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "server.cli"]
    with log_path.open("wb") as log:
        process = subprocess.Popen([*command, "serve", "--port", str(port), "--checkpoint", str(checkpoint)],
                                   env=env, stdout=log, stderr=subprocess.STDOUT)
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


def server_run(url: str, clips: list[Path], concurrency: int, max_new_tokens: int | None) -> dict:
    import httpx

    data = {} if max_new_tokens is None else {"max_new_tokens": str(max_new_tokens)}
    payloads = [(p.name, p.read_bytes()) for p in clips]
    with httpx.Client(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:
        def post(payload) -> float:
            t0 = time.perf_counter()
            r = client.post(f"{url}/caption", files={"video": (payload[0], payload[1], "video/mp4")}, data=data)
            r.raise_for_status()
            return time.perf_counter() - t0

        sum0, count0 = batch_stats(client, url)
        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            latencies = list(pool.map(post, payloads))
        wall = time.perf_counter() - started
        sum1, count1 = batch_stats(client, url)
    return {"videos_per_s": len(clips) / wall, "p50_ms": 1000 * statistics.median(latencies),
            "batch": (sum1 - sum0) / max(1.0, count1 - count0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=REPO / "checkpoints" / "demo")
    parser.add_argument("--videos", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the checkpoint's own")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    with tempfile.TemporaryDirectory(prefix="capguard-bench-") as tmp:
        tmp = Path(tmp)
        checkpoint, note = args.checkpoint, ""
        if not (checkpoint / "capguard.json").is_file():
            from models.components import init_checkpoint

            checkpoint = init_checkpoint(tmp / "checkpoints" / "random-init", seed=args.seed)
            note = f" ({args.checkpoint} does not exist: random-init init_checkpoint stack)"
        clips = render_clips(tmp / "clips", args.videos + 2, args.seed)
        warmup, clips = clips[:2], clips[2:]
        print(f"checkpoint: {checkpoint}{note}")
        print(f"{len(clips)} clips, max_new_tokens={args.max_new_tokens or 'checkpoint default'}, "
              f"device={args.device}, {os.cpu_count()} CPUs")

        results = {"naive loop": naive_loop(checkpoint, clips, args.max_new_tokens, args.device)}
        process, url = start_server(checkpoint, tmp / "data", args.device, tmp / "serve.log")
        try:
            server_run(url, warmup, 2, args.max_new_tokens)
            for concurrency in (1, 8):
                results[f"server c{concurrency}"] = server_run(url, clips, concurrency, args.max_new_tokens)
        finally:
            process.terminate()
            process.wait(timeout=30)

    print(f"\n{'run':<12} {'videos/s':>9} {'p50 ms':>9} {'mean batch':>11}")
    for name, r in results.items():
        print(f"{name:<12} {r['videos_per_s']:>9.2f} {r['p50_ms']:>9.0f} {r['batch']:>11.2f}")
    c1, c8, naive = (results[k]["videos_per_s"] for k in ("server c1", "server c8", "naive loop"))
    print(f"\nc8/c1 throughput: {c8 / c1:.2f}x    server c1 / naive loop: {c1 / naive:.2f}x    "
          f"server c8 / naive loop: {c8 / naive:.2f}x")


if __name__ == "__main__":
    main()
