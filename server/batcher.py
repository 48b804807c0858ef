"""Dynamic batching: requests that arrive together share one model call, on one dedicated thread.

    batcher = Batcher(run_batch, max_batch_size=8, max_wait_s=0.01, queue_size=64)
    batcher.start()
    result = await batcher.submit(job, key="demo")   # jobs with equal keys may share a batch

A model thread takes the oldest waiting job, then keeps collecting jobs with the same key
(checkpoint) until the batch is full, ``max_wait_s`` has passed since it started waiting, or nothing
is queued and ``expect_more()`` says no more is coming (or a job of another key is waiting: the thread
does not idle while there is work); jobs for other keys wait for a later batch, in order. ``run_batch(jobs) -> results`` (one per job, same
order) runs on that thread, never on the event loop; its exception fails every job of the batch.
A full queue raises ``QueueFull`` at once, so overload answers 503 instead of piling up.

``workers`` model threads (default 1) take turns collecting, one at a time, and run their batches
side by side: the matrix products release the GIL, so a second thread keeps a second core busy while
the first is in Python (``run_batch`` must then be thread-safe; the server's is).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The batcher holds `queue_size` jobs already."""


class _Stop(Exception):
    """stop() was called: the model thread ends after the batch in hand."""


@dataclass
class _Pending:
    job: Any                          # what run_batch gets
    key: Hashable                     # jobs share a batch only with equal keys
    future: asyncio.Future            # the waiting request's; resolved from the model thread
    loop: asyncio.AbstractEventLoop   # the future's loop (call_soon_threadsafe needs it)


def _resolve(future: asyncio.Future, result: Any = None, error: BaseException | None = None) -> None:
    if future.done():   # the request was cancelled (client went away)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _answer(pending: _Pending, result: Any = None, error: BaseException | None = None) -> None:
    """Resolve a job's future from any thread (a loop that is already closed has no one to answer)."""
    try:
        pending.loop.call_soon_threadsafe(_resolve, pending.future, result, error)
    except RuntimeError:
        log.debug("event loop closed before a result could be delivered")


class Batcher:
    def __init__(self, run_batch: Callable[[list[Any]], list[Any]], max_batch_size: int, max_wait_s: float,
                 queue_size: int, on_batch: Callable[[int], None] | None = None,
                 expect_more: Callable[[], bool] | None = None, name: str = "capguard-model", workers: int = 1):
        self.run_batch = run_batch
        self.max_batch_size, self.max_wait_s = max_batch_size, max_wait_s
        self.on_batch = on_batch or (lambda size: None)
        # whether more jobs are on their way (requests still uploading or decoding): when it says no and
        # nothing is queued, the batch starts at once instead of waiting out max_wait_s for nobody
        self.expect_more = expect_more or (lambda: True)
        self._queue: queue.Queue[_Pending | None] = queue.Queue(maxsize=queue_size)
        self._held: deque[_Pending] = deque()   # taken from the queue for another key; served first next time
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._threads = [threading.Thread(target=self._loop, name=name if workers == 1 else f"{name}_{i}", daemon=True)
                         for i in range(workers)]
        self._collecting = threading.Lock()    # one thread collects a batch at a time
        self._stopping = False

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def alive(self) -> bool:
        return all(thread.is_alive() for thread in self._threads) and not self._stopping

    def depth(self) -> int:
        """Jobs waiting for the model (not counting the batch running now)."""
        return self._queue.qsize() + len(self._held)

    async def submit(self, job: Any, key: Hashable) -> Any:
        if self._stopping:
            raise QueueFull("the server is shutting down")
        loop = asyncio.get_running_loop()
        pending = _Pending(job, key, loop.create_future(), loop)
        try:
            self._queue.put_nowait(pending)
        except queue.Full:
            raise QueueFull(f"{self._queue.maxsize} requests are already waiting for the model") from None
        return await pending.future

    def stop(self, timeout_s: float = 10.0) -> None:
        """Finish the running batch, fail what is still waiting, end the thread."""
        self._stopping = True
        for _ in self._threads:   # one stop marker per thread
            try:
                self._queue.put(None, timeout=timeout_s)
            except queue.Full:
                break
        for thread in self._threads:
            if thread.ident is not None:   # started
                thread.join(timeout=timeout_s)
        leftovers = list(self._held)
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                leftovers.append(item)
        for item in leftovers:
            _answer(item, error=QueueFull("the server is shutting down"))

    # ------------------------------------------------------------------------------- model thread

    def _next(self, timeout: float | None) -> _Pending | None:
        """The next waiting job (held ones first); None on timeout. Raises _Stop once stop() was called."""
        if self._held:
            return self._held.popleft()
        try:
            item = self._queue.get(timeout=timeout) if timeout is None or timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None
        if item is None:
            raise _Stop
        return item

    def _collect(self) -> tuple[list[_Pending], bool]:
        """(the next batch, whether stop() was called meanwhile)."""
        try:
            first = self._next(None)
        except _Stop:
            return [], True
        batch, skipped, stop = [first], [], False
        deadline = time.perf_counter() + self.max_wait_s
        held_before = len(self._held)   # held jobs are looked at once each, without waiting
        while len(batch) < self.max_batch_size:
            if held_before > 0:
                held_before -= 1
                item = self._held.popleft()
            else:
                # jobs of another key already wait (a continuous engine's encode and score steps alternate):
                # idling for company would idle the model thread, so take only what is queued now
                wait = deadline - time.perf_counter() if self.expect_more() and not skipped else 0.0
                try:
                    item = self._next(wait)
                except _Stop:
                    stop = True
                    break
                if item is None:
                    break
            (batch if item.key == first.key else skipped).append(item)
        self._held.extendleft(reversed(skipped))
        return batch, stop

    def _loop(self) -> None:
        stop = False
        while not stop:
            with self._collecting:
                batch, stop = self._collect()
            if batch:
                self._run(batch)

    def _run(self, batch: list[_Pending]) -> None:
        self.on_batch(len(batch))
        try:
            results = self.run_batch([p.job for p in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} jobs")
        except BaseException as exc:  # noqa: BLE001 - the requests get the error; the thread lives on
            log.exception("batch of %d failed", len(batch))
            for p in batch:
                _answer(p, error=exc)
            return
        for p, result in zip(batch, results, strict=True):
            _answer(p, result)
