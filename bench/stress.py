"""Hardening run: a real ``capguard serve`` under fuzzed uploads, load, broken clients, kill -9, schemathesis.

    .venv/bin/python bench/stress.py --quick     # CI-sized (40-60 s on 2 cores); tests/test_stress.py runs it
    .venv/bin/python bench/stress.py             # full: 1000 fuzz cases, 16 clients x 60 s, ...
    .venv/bin/python bench/stress.py --checkpoint-root checkpoints --checkpoint demo   # a trained stack

It starts ``capguard serve`` as a subprocess on a free port, with a temp data dir, two decoder processes
running bench/fault_decoder.py's decoder (which decodes like capguard.models.video unless a file starts with
one of its magic words: then the worker really segfaults, aborts or hangs), and runs five phases:

1. fuzz    >= 1000 (quick: ~100) uploads: seed videos in h264/mp4, mpeg4/avi, vp9/webm, av1/mkv with bit
           flips, truncations, spliced garbage, corrupted headers (moov/EBML/RIFF and the first 1 KB),
           duplicated and zeroed chunks; non-videos; decompression bombs (a frame size or duration
           declared far beyond the limits) that must be refused (413) with the decoders' RSS bounded.
2. load    N clients posting valid videos for T seconds, then a burst larger than the queue: only 200 and
           503 allowed; latency percentiles, throughput and the server's RSS growth.
3. slow    raw sockets: uploads cut off mid-body (with Content-Length, chunked, reset), slow-drip bodies,
           a Content-Length larger or smaller than the body, a 10 MB form field, idle half-open
           connections, and more stuck uploads than the server has file descriptors (it runs with the
           common default limit of 1024): those it cannot store get 503, then everything is served again.
4. faults  a hanging decoder (504 within the time limit), crashing decoders, decoders killed mid-decode,
           then kill -9 of the server mid-load and a restart on the same data dir: every acknowledged
           caption is in the caption log, the log passes PRAGMA integrity_check, the guard window is back.
5. schema  schemathesis (positive and negative cases) against the served OpenAPI schema: no 5xx, every
           response conforms to the schema.

After each phase it waits for the server to go idle and counts what is left over: temp uploads in
data_dir/tmp, decoder processes beyond the configured two (children of the server, from /proc),
capguard_queue_depth. At the end it prints one table and exits 1 if any invariant broke: zero server
deaths, zero leaks, zero lost records, zero 5xx, every error in the documented JSON shape.

This file is the entry point (arguments, the phase loop, the final table); the rest lives next to it:
stress_run.py (plan, counters, /proc, the server process, the shared Run), stress_inputs.py (seed videos,
bombs, non-videos, mutations), stress_http.py (fuzz, load), stress_sockets.py (slow), stress_faults.py
(faults) and stress_schema.py (schema); bench/serving.py starts servers for every benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from stress_faults import phase_faults
from stress_http import phase_fuzz, phase_load
from stress_run import FULL, QUICK, PhaseStats, Plan, Run, children, memory_mb, stat_fields
from stress_schema import phase_schema
from stress_sockets import phase_slow

# ------------------------------------------------------------------------------------------- the end


def finish(run: Run) -> PhaseStats:
    """Graceful stop, then the caption log and the leftovers once more."""
    phase = run.begin("shutdown")
    workers = children(run.server.pid)
    phase.figures["server peak RSS (VmHWM) MB"] = f"{memory_mb(run.server.pid, 'VmHWM'):.0f}"
    code = run.server.stop()
    phase.figures["exit status on SIGTERM"] = str(code)
    # uvicorn re-raises the signal once it has shut down cleanly, so -15 after its last log line is fine too
    if code not in (0, -signal.SIGTERM) or "Application shutdown complete" not in run.server.log_tail(10):
        phase.violate(f"capguard serve exited with {code} on SIGTERM without a clean shutdown")
    deadline = time.monotonic() + 10
    while any(stat_fields(p) is not None for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [p for p in workers if stat_fields(p) is not None]
    phase.leaked_workers = len(left)
    if left:
        phase.violate(f"decoder processes {left} outlived the server's shutdown")
    tmp = list(run.tmp_dir.iterdir())
    phase.leaked_tmp = len(tmp)
    logged, integrity = run.caption_log()
    phase.lost = run.lost_records(logged)
    phase.figures["integrity_check at the end"] = integrity
    phase.figures["caption log rows / acknowledged"] = f"{sum(logged.values())} / {sum(run.acked.values())}"
    if integrity != "ok":
        phase.violate(f"PRAGMA integrity_check at the end: {integrity}")
    if phase.lost:
        phase.violate(f"{phase.lost} acknowledged captions are missing from the caption log")
    return phase


def table(run: Run, machine: str) -> str:
    phases = run.phases
    columns = [p.name for p in phases] + ["total"]
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, values: list, total=None) -> None:
        cells = ["-" if v is None else str(v) for v in values]
        rows.append((label, cells + ["-" if total is None else str(total)]))

    def summed(label: str, get: Callable[[PhaseStats], int]) -> None:
        values = [get(p) for p in phases]
        row(label, values, sum(values))

    summed("cases tried", lambda p: p.tried)
    summed("200", lambda p: p.answers.get("200", 0))
    error_keys = sorted({k for p in phases for k in p.answers if k != "200"},
                        key=lambda k: (int(k.split()[0]), k))
    for group, label in (("4", "4xx (all)"), ("503", "503 (all)"), ("504", "504 (all)")):
        for key in (k for k in error_keys if k.startswith(group)):
            summed(f"  {key}", lambda p, key=key: p.answers.get(key, 0))
        summed(label, lambda p, group=group: sum(n for k, n in p.answers.items() if k.startswith(group)))
    for key in (k for k in error_keys if k[:1] == "5" and k[:3] not in ("503", "504")):
        summed(f"  {key}", lambda p, key=key: p.answers.get(key, 0))
    summed("5xx (other)", lambda p: p.server_errors)
    summed("connection errors", lambda p: p.conn_errors)
    summed("cut on purpose (client/kill)", lambda p: p.cut_on_purpose)
    summed("server deaths", lambda p: p.deaths)
    summed("leaked temp files", lambda p: p.leaked_tmp)
    summed("leaked decoder processes", lambda p: p.leaked_workers)
    summed("queue slots left", lambda p: p.queue_left)
    lost = [p.lost for p in phases]
    row("records lost", lost, max((v for v in lost if v is not None), default=0))
    row("peak RSS server MB", [f"{p.peak_server_mb:.0f}" for p in phases],
        f"{max(p.peak_server_mb for p in phases):.0f}")
    row("peak RSS server+decoders MB", [f"{p.peak_total_mb:.0f}" for p in phases],
        f"{max(p.peak_total_mb for p in phases):.0f}")
    for label in dict.fromkeys(k for p in phases for k in p.figures):
        row(label, [p.figures.get(label) for p in phases])

    width0 = max(len(label) for label, _ in rows)
    widths = [max(len(c), *(len(cells[i]) for _, cells in rows)) for i, c in enumerate(columns)]
    lines = [f"{'':<{width0}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(columns, widths, strict=True))]
    lines.append("-" * len(lines[0]))
    for label, cells in rows:
        cells = "  ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True))
        lines.append(f"{label:<{width0}}  {cells}")
    return "\n".join([machine, *lines])


def summary(run: Run) -> dict:
    phases = run.phases
    return {
        "tried": sum(p.tried for p in phases),
        "answers": sum((p.answers for p in phases), Counter()),
        "deaths": sum(p.deaths for p in phases),
        "leaked_tmp": sum(p.leaked_tmp for p in phases),
        "leaked_workers": sum(p.leaked_workers for p in phases),
        "queue_left": sum(p.queue_left for p in phases),
        "lost": max((p.lost for p in phases if p.lost is not None), default=0),
        "server_errors": sum(p.server_errors for p in phases),
        "conn_errors": sum(p.conn_errors for p in phases),
        "peak_server_mb": max(p.peak_server_mb for p in phases),
        "peak_total_mb": max(p.peak_total_mb for p in phases),
        "violations": [v for p in phases for v in p.violations],
        "phases": {p.name: {"tried": p.tried, "answers": dict(p.answers), "figures": p.figures,
                            "conn_errors": p.conn_errors, "leaked_tmp": p.leaked_tmp,
                            "leaked_workers": p.leaked_workers, "queue_left": p.queue_left, "lost": p.lost,
                            "deaths": p.deaths, "violations": p.violations} for p in phases},
    }


PHASES = {"fuzz": phase_fuzz, "load": phase_load, "slow": phase_slow, "faults": phase_faults,
          "schema": phase_schema}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the CI-sized run")
    parser.add_argument("--checkpoint-root",
                        help="serve checkpoints from here (default: a fresh init_checkpoint stack)")
    parser.add_argument("--checkpoint", default="stress", help="checkpoint name under the root")
    parser.add_argument("--phases", default=",".join(PHASES),
                        help=f"comma-separated subset of {','.join(PHASES)}")
    parser.add_argument("--fuzz-cases", type=int, help="override the plan's number of fuzz uploads")
    parser.add_argument("--load-clients", type=int)
    parser.add_argument("--load-seconds", type=float)
    parser.add_argument("--max-new-tokens", type=int, default=4,
                        help="per caption: keeps model time small (0: the checkpoint's own)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (server log, data dir)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    overrides = {k: v for k, v in (("fuzz_cases", args.fuzz_cases), ("load_clients", args.load_clients),
                                   ("load_seconds", args.load_seconds)) if v is not None}
    plan = Plan(**{**plan.__dict__, **overrides})
    unknown = set(args.phases.split(",")) - set(PHASES)
    if unknown:
        parser.error(f"unknown phase(s) {sorted(unknown)}; choose from {list(PHASES)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)   # the flood's sockets are ours too
    want = 4 * plan.flood if hard == resource.RLIM_INFINITY else min(hard, 4 * plan.flood)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))

    tmp = Path(tempfile.mkdtemp(prefix="capguard-stress-"))
    run = Run(args, plan, tmp)
    started = time.monotonic()
    run.sampler.start()
    print(f"capguard stress ({'quick' if args.quick else 'full'}): temp dir {tmp}", flush=True)
    print(f"server ready in {run.server.start():.1f} s at {run.server.url}", flush=True)
    run.sampler.pid = run.server.pid
    try:
        for name in args.phases.split(","):
            try:
                PHASES[name](run)
            except Exception:  # noqa: BLE001 - a broken phase is reported, the others still run
                phase = run.phases[-1] if run.phases and run.phases[-1].name == name else run.begin(name)
                phase.violate(f"phase {name} crashed:\n{traceback.format_exc()}")
                if not run.server.alive():
                    run.server.start()
                    run.sampler.pid = run.server.pid
        finish(run)
    finally:
        run.sampler.stop()
        if run.server.alive():
            run.server.stop()
    machine = (f"{time.strftime('%Y-%m-%d %H:%M')}  {os.cpu_count()} CPUs  python {sys.version.split()[0]}  "
               f"device {args.device}  wall {time.monotonic() - started:.0f} s  "
               f"command: {' '.join(['bench/stress.py', *(argv if argv is not None else sys.argv[1:])])}")
    print()
    print(table(run, machine))
    result = summary(run)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    if result["violations"]:
        print(f"\nFAIL: {len(result['violations'])} broken invariant(s):")
        for message in result["violations"]:
            print(f"  - {message}")
        print(f"\nserver log: {run.server.log_path}")
    else:
        print("\nPASS: no server deaths, no leaks, no lost records, no 5xx, "
              "every error in the documented shape")
    if not args.keep and not result["violations"]:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if result["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
