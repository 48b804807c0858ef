"""Decoding in worker processes, so that a decoder crash costs one request, never the server.

FFmpeg and decord are C code fed with untrusted files; decord is known to abort on some damaged
ones. Each ``DecodeWorker`` is a separate Python process (a fresh interpreter talking over a
socketpair with multiprocessing's Connection protocol); the pool hands one idle worker to each
decode. When the worker dies mid-decode (segfault, abort, OOM kill) the socket reports EOF, the
request gets ``decoder_crashed`` and a fresh worker takes the dead one's place; when it takes longer
than the time limit it is killed and replaced (``decode_timeout``). Other decodes run in other
workers and never notice.

    pool = DecodePool(2, "capguard.models.video:sample_frames", timeout_s=30, max_pending=64); pool.start()
    video = await pool.decode(path, num_frames=8, limits=VideoLimits(), max_side=128)
    video.frames.shape    # (8, H, W, 3) uint8

Workers run ``decoder(path, num_frames, limits, max_side=...)``; it is a setting so tests can plug
in a decoder that really crashes. Frames come back as raw bytes after a JSON header (8 frames at the
models' sizes are well under a megabyte); nothing the worker sends is unpickled.

This module imports nothing of the web stack or torch: the workers import it too.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import math
import os
import queue
import resource
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import BufferTooShort
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from capguard.server.childproc import describe_exit, start_child

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 120.0   # a worker imports av (and the decoder's module) before it says it is ready
MAX_HEADER_BYTES = 1 << 20  # a reply's JSON part: indices, timestamps, an error message


@dataclass
class DecodedVideo:
    frames: np.ndarray          # (T, H, W, 3) uint8 RGB
    indices: list[int]          # (T,) frame index of each sampled frame
    timestamps_s: list[float]   # (T,) presentation time of each, seconds
    seconds: float              # decode time inside the worker


class DecodeFailed(Exception):
    """The decode did not give frames; `code` is a capguard.models.video code, decoder_crashed or decode_timeout."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def import_function(spec: str) -> Callable:
    """"package.module:function" -> the function. Example: "capguard.models.video:sample_frames"."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"decoder must look like 'package.module:function', got {spec!r}")
    return getattr(importlib.import_module(module), name)


def _send_json(conn: Connection, message: dict) -> None:
    conn.send_bytes(json.dumps(message).encode())


def _worker_main(conn: Connection, decoder: str, nice: int = 0) -> None:
    """Body of a decode process: import the decoder once, then answer jobs until told to stop.

    Replies are JSON plus raw frame bytes, never pickles: a decoder that an exploit took over must
    not be able to run code in the server by what it sends back.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is for the server, which stops us itself
    if nice:
        os.nice(nice)   # decode_nice: see Settings
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))   # a decoder crashing on bad uploads leaves no core files
    decode = import_function(decoder)
    _send_json(conn, {"ready": os.getpid()})
    while True:
        try:
            job = conn.recv()   # from the server: trusted
        except (EOFError, OSError):
            return  # the server is gone
        if job is None:
            return
        path, num_frames, limits, max_side = job
        started = time.perf_counter()
        try:
            sampled = decode(path, num_frames, limits, max_side=max_side)
            frames = np.ascontiguousarray(sampled.frames, dtype=np.uint8)   # (T, H, W, 3)
            _send_json(conn, {"ok": True, "shape": list(frames.shape), "indices": [int(i) for i in sampled.indices],
                              "timestamps_s": [float(t) for t in sampled.timestamps_s],
                              "seconds": time.perf_counter() - started})
            conn.send_bytes(frames.reshape(-1))   # flat: Connection measures a buffer by len(), its first axis
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the request that caused it
            code = getattr(exc, "code", None)
            if not isinstance(code, str):
                code, message = "decode_failed", f"the decoder failed ({type(exc).__name__}: {exc})"
            else:
                message = str(exc)
            _send_json(conn, {"ok": False, "code": code, "message": message.replace(os.fspath(path), "the upload")})


def worker_entry(argv: list[str]) -> None:
    """What a fresh interpreter runs (server/childproc.py): argv = [socket fd, decoder, nice]; wrap the socket,
    serve."""
    fd, decoder, nice = argv
    _worker_main(Connection(int(fd)), decoder, int(nice))


def _death(process: subprocess.Popen) -> str:
    """How a worker ended, e.g. "killed by SIGSEGV" or "exited with status 1"."""
    try:
        code = process.wait(timeout=2)
    except subprocess.TimeoutExpired:
        return "stopped answering"
    return describe_exit(code)


class DecodeWorker:
    """One decoder process (a fresh Python interpreter) and the parent's end of its socket."""

    def __init__(self, decoder: str, nice: int = 0):
        parent, child = socket.socketpair()
        with child:
            self.process = start_child("capguard.server.decode:worker_entry",
                                       [str(child.fileno()), decoder, str(nice)], pass_fds=[child.fileno()])
        self.conn = Connection(parent.detach())
        self.ready = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        if self.ready:
            return
        try:
            if not self.conn.poll(timeout_s):
                raise DecodeFailed("decoder_unavailable", f"a decode worker did not start in {timeout_s:.0f} s")
            self.ready = "ready" in json.loads(self.conn.recv_bytes(MAX_HEADER_BYTES))
        except (EOFError, OSError, ValueError):
            raise DecodeFailed("decoder_unavailable",
                               f"a decode worker failed to start ({_death(self.process)}); "
                               "check the decoder setting and the server log") from None

    def run(self, job: tuple, timeout_s: float, max_frame_bytes: int) -> DecodedVideo:
        self.wait_ready()
        self.conn.send(job)
        if not self.conn.poll(timeout_s):
            raise DecodeFailed("decode_timeout", f"decoding took longer than {timeout_s:g} s and was stopped; "
                                                 "upload a shorter or smaller video")
        try:
            header = json.loads(self.conn.recv_bytes(MAX_HEADER_BYTES))
            if not header["ok"]:
                raise DecodeFailed(str(header["code"]), str(header["message"]))
            shape = tuple(int(n) for n in header["shape"])
            if len(shape) != 4 or shape[3] != 3 or math.prod(shape) > max_frame_bytes:
                raise ValueError(f"frames of shape {shape} (limit {max_frame_bytes} bytes)")
            frames = np.empty(shape, dtype=np.uint8)                    # (T, H, W, 3), writable
            if self.conn.recv_bytes_into(frames.reshape(-1)) != frames.nbytes:   # a flat view: fills `frames`
                raise ValueError("frame bytes do not match the announced shape")
            return DecodedVideo(frames, [int(i) for i in header["indices"]],
                                [float(t) for t in header["timestamps_s"]], float(header["seconds"]))
        except (EOFError, OSError):
            raise DecodeFailed("decoder_crashed", f"the decoder process died on this upload "
                                                  f"({_death(self.process)}); the file is probably damaged") from None
        except (ValueError, KeyError, TypeError, BufferTooShort) as exc:
            raise DecodeFailed("decoder_crashed", f"the decoder process answered nonsense ({exc})") from None

    def stop(self, kill: bool = False) -> None:
        if not kill and self.alive():
            try:
                self.conn.send(None)
                self.process.wait(timeout=1)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.alive():
            self.process.kill()
        self.process.wait(timeout=5)
        self.conn.close()


class DecodePool:
    """`size` worker processes; decodes wait in a thread pool of the same size (one thread per worker)."""

    def __init__(self, size: int, decoder: str, timeout_s: float, max_pending: int,
                 on_restart: Callable[[str], None] | None = None, nice: int = 0):
        self.size, self.decoder, self.timeout_s, self.max_pending = size, decoder, timeout_s, max_pending
        self.nice = nice
        self.on_restart = on_restart or (lambda reason: None)
        self._idle: queue.SimpleQueue[DecodeWorker] = queue.SimpleQueue()
        self._threads = ThreadPoolExecutor(max_workers=size, thread_name_prefix="capguard-decode")
        self._lock = threading.Lock()
        self._workers: set[DecodeWorker] = set()
        self.pending = 0    # decodes admitted and not finished (event loop only)
        self.closed = False

    def _spawn(self) -> DecodeWorker:
        worker = DecodeWorker(self.decoder, self.nice)
        with self._lock:
            self._workers.add(worker)
        return worker

    def _retire(self, worker: DecodeWorker, reason: str) -> DecodeWorker:
        log.warning("replacing decode worker pid %s (%s)", worker.pid, reason)
        worker.stop(kill=True)
        with self._lock:
            self._workers.discard(worker)
        self.on_restart(reason)
        return self._spawn()

    def start(self) -> None:
        """Start every worker and wait until each has imported its decoder."""
        workers = [self._spawn() for _ in range(self.size)]
        for worker in workers:
            worker.wait_ready()
            self._idle.put(worker)
        log.info("decode pool: %d workers running %s", self.size, self.decoder)

    def decode_blocking(self, path: str, num_frames: int, limits: Any, max_side: int | None) -> DecodedVideo:
        worker = self._idle.get()
        try:
            if not worker.alive():     # died while idle (e.g. OOM killer): not this upload's fault
                worker = self._retire(worker, "died_idle")
            side_pixels = max_side * max_side if max_side else limits.max_pixels
            return worker.run((path, num_frames, limits, max_side), self.timeout_s,
                              max_frame_bytes=num_frames * min(side_pixels, limits.max_pixels) * 3)
        except DecodeFailed as exc:
            if exc.code == "decoder_crashed":
                worker = self._retire(worker, "crash")
            elif exc.code == "decode_timeout":
                worker = self._retire(worker, "timeout")
            elif exc.code == "decoder_unavailable":
                worker = self._retire(worker, "startup")
            raise
        except (BrokenPipeError, OSError) as exc:
            worker = self._retire(worker, "crash")
            raise DecodeFailed("decoder_crashed", f"the decoder process went away ({exc})") from None
        finally:
            self._idle.put(worker)

    async def decode(self, path: str, num_frames: int, limits: Any, max_side: int | None) -> DecodedVideo:
        """Decode in a worker; raises DecodeFailed. Call from the event loop only (it counts `pending`)."""
        if self.closed:
            raise DecodeFailed("decoder_unavailable", "the decode pool is shut down")
        self.pending += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._threads, self.decode_blocking, path, num_frames, limits,
                                              max_side)
        finally:
            self.pending -= 1

    @property
    def full(self) -> bool:
        return self.pending >= self.max_pending

    def alive(self) -> bool:
        with self._lock:
            return not self.closed and any(w.alive() for w in self._workers)

    def close(self) -> None:
        self.closed = True
        self._threads.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            workers, self._workers = list(self._workers), set()
        for worker in workers:
            worker.stop()
