"""Phase 4: hanging, crashing and killed decoders, then kill -9 of the server mid-load and a restart
on the same data dir (no acknowledged caption lost, the guard window back).
"""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from fault_decoder import ABORT, HANG, SEGFAULT
from stress_inputs import make_clips
from stress_run import GUARD_MIN, GUARD_WINDOW, Answer, Run, children, is_decoder, is_zombie, stat_fields
from stress_sockets import connect, multipart, request_head

# ------------------------------------------------------------------------------------------- faults


def phase_faults(run: Run) -> None:
    phase = run.begin("faults")
    plan, server = run.plan, run.server
    clips = make_clips(run.tmp / "faults", 4, offset=200)

    # a hanging decoder answers 504 at the time limit; the other decoder serves meanwhile
    with ThreadPoolExecutor(2) as pool:
        hanging = pool.submit(run.post_video, HANG + b"\0" * 64, "hanging decoder", allowed={504})
        time.sleep(0.5)
        phase.count(run.post_video(clips[0], "normal beside a hanging decoder", allowed={200}))
        answer = hanging.result()
    phase.count(answer)
    phase.figures["hang answered after s"] = f"{answer.seconds:.1f} (limit {plan.decode_timeout_s:g})"
    if answer.status == 504 and answer.seconds > plan.decode_timeout_s + 15:
        phase.violate(f"the hanging decode took {answer.seconds:.1f} s to answer "
                      f"(limit {plan.decode_timeout_s})")

    # decoders that crash: 422 decoder_crashed, a fresh process takes over
    for magic, what in ((SEGFAULT, "segfaulting decoder"), (ABORT, "aborting decoder")):
        answer = run.post_video(magic + b"\0" * 64, what, allowed={422})
        phase.count(answer)
        if answer.code not in (None, "decoder_crashed"):
            phase.violate(f"{what}: code {answer.code}, expected decoder_crashed")
    # every decoder killed (one of them mid-decode): that request gets 422, the next ones are served
    with ThreadPoolExecutor(1) as pool:
        hanging = pool.submit(run.post_video, HANG + b"\1" * 64, "decoder killed mid-decode", allowed={422})
        deadline = time.monotonic() + 30
        while not any(run.tmp_dir.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)   # the upload is stored: its decode is starting
        time.sleep(0.5)
        for pid in children(server.pid):
            if is_decoder(pid):   # not a vLLM engine core (CAPGUARD_ENGINE=vllm): this step is about decoders
                os.kill(pid, signal.SIGKILL)
        answer = hanging.result()
    phase.count(answer)
    phase.figures["killed mid-decode answered after s"] = f"{answer.seconds:.1f}"
    for clip in clips:
        phase.count(run.post_video(clip, "after the decoders were killed", allowed={200}))
    run.settle(phase)

    # kill -9 mid-load, restart on the same data dir
    fingerprint = next(c["fingerprint"] for c in run.client().get("/checkpoints").json()["checkpoints"]
                       if c["active"])
    pool_clips = make_clips(run.tmp / "kill", plan.kill_after * 2, offset=300)
    by_sha = {hashlib.sha256(c).hexdigest(): c for c in pool_clips}
    stop = threading.Event()
    acked_here = Counter()
    lock = threading.Lock()

    def client(i: int) -> list[Answer]:
        answers = []
        n = i
        while not stop.is_set():
            answer = run.post_video(pool_clips[n % len(pool_clips)], f"kill-phase client {i}",
                                    allowed={200, 503})
            n += plan.kill_clients
            answers.append(answer)
            if answer.status is None:
                break
            if answer.status == 200:
                with lock:
                    acked_here[answer.body["video_sha256"]] += 1
        return answers

    with ThreadPoolExecutor(plan.kill_clients) as pool:
        futures = [pool.submit(client, i) for i in range(plan.kill_clients)]
        while sum(acked_here.values()) < plan.kill_after and not all(f.done() for f in futures):
            time.sleep(0.05)
        # two uploads stuck halfway, so the killed server leaves temp files behind for the restart to find
        body = multipart(pool_clips[0])
        stuck = [connect(server.port) for _ in range(2)]
        for sock in stuck:
            sock.sendall(request_head(server.port, len(body)) + body[:len(body) // 2])
        deadline = time.monotonic() + 10
        while len(list(run.tmp_dir.iterdir())) < len(stuck) and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = children(server.pid)
        tmp_before_kill = len(list(run.tmp_dir.iterdir()))
        server.kill9()
        for sock in stuck:
            sock.close()
        phase.tried += len(stuck)
        phase.cut_on_purpose += len(stuck)
        stop.set()
        for future in futures:
            for answer in future.result():
                if answer.status is None:
                    phase.tried += 1
                    phase.cut_on_purpose += 1
                else:
                    phase.count(answer)
    last_guard = run.last_guard or {}
    phase.figures["acked before kill -9"] = str(sum(acked_here.values()))
    phase.figures["temp uploads left by the killed server"] = str(len(list(run.tmp_dir.iterdir())))
    phase.figures["uploads in flight at kill"] = str(tmp_before_kill)
    deadline = time.monotonic() + 15
    while any(stat_fields(p) is not None for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    orphans = [p for p in workers if stat_fields(p) is not None and not is_zombie(p)]
    if orphans:
        phase.leaked_workers += len(orphans)
        phase.violate(f"decoder processes {orphans} outlived the killed server")
        for pid in orphans:
            os.kill(pid, signal.SIGKILL)

    logged, integrity = run.caption_log()
    phase.lost = run.lost_records(logged)
    if phase.lost:
        phase.violate(f"{phase.lost} acknowledged captions are missing from the caption log after kill -9")
    if integrity != "ok":
        phase.violate(f"PRAGMA integrity_check after kill -9: {integrity}")
    phase.figures["integrity_check after kill -9"] = integrity
    with sqlite3.connect(run.data_dir / "capguard.db") as db:
        distinct = db.execute("SELECT COUNT(DISTINCT video_sha256) FROM captions WHERE checkpoint = ? AND "
                              "fingerprint = ?", (server.checkpoint, fingerprint)).fetchone()[0]
    db.close()

    phase.figures["restart s"] = f"{server.start():.1f}"
    run.sampler.pid = server.pid
    expected = min(GUARD_WINDOW, distinct)
    gauge = run.metrics().get(("capguard_window_captions", (("checkpoint", server.checkpoint),)))
    listed = next(c for c in run.client().get("/checkpoints").json()["checkpoints"] if c["active"])
    seen = by_sha[next(iter(acked_here))] if acked_here else pool_clips[0]
    again = run.post_video(seen, "seen video after restart", allowed={200})
    phase.count(again)
    window = (again.body or {}).get("guard", {}).get("window_captions")
    status = (again.body or {}).get("guard", {}).get("status")
    phase.figures["guard window before/after restart"] = (f"{last_guard.get('window_captions')}/{window} "
                                                           f"(log: {distinct} videos; {status})")
    if gauge != expected or window != expected:
        phase.violate(f"guard window after restart: gauge {gauge}, response {window}; the log holds "
                      f"{distinct} distinct videos, so {expected} expected")
    if window is not None and window < (last_guard.get("window_captions") or 0):
        phase.violate(f"the guard window shrank over the restart: {last_guard.get('window_captions')} "
                      f"-> {window}")
    if status != listed["guard_status"] or (status == "warming_up") != (expected < GUARD_MIN):
        phase.violate(f"guard status after restart: /caption {status}, "
                      f"/checkpoints {listed['guard_status']}, window {expected}")
    run.settle(phase)
