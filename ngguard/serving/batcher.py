"""A request batcher: concurrent calls are collected for a few milliseconds and run as one batch.

    batcher = Batcher(run, max_batch=16, wait_ms=5)     # run(items) -> one result per item
    future = batcher.submit(item, key=max_new_tokens)   # from any thread
    answer = future.result()
    futures = batcher.submit_many(items, key=max_new_tokens)   # several at once: they share a batch
    batcher.close()

One worker thread takes the oldest waiting request, then keeps collecting requests with the same
``key`` (requests that can share a batch, e.g. the same ``max_new_tokens``) until ``max_batch`` are
there, or no request has arrived for ``wait_ms``, or ``max_wait_ms`` (default 10 x ``wait_ms``) have
passed since the oldest arrived, and calls ``run`` with them in arrival order. So a lone request waits
``wait_ms`` for company, and a burst of requests (arriving faster than one per ``wait_ms``) is
collected into one batch instead of starting with whatever came in the first ``wait_ms``. While
``run`` works, new requests queue up, so under load batches fill without waiting (a request that
waited through a batch starts the next one at once).
Requests with another key wait for a later batch (oldest first, never starved). If ``run`` raises,
every request of that batch gets the exception. ``close`` finishes the batch in progress and fails
the requests still waiting with ``BatcherClosed``.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

from loguru import logger

__all__ = ["Batcher", "BatcherClosed"]


class BatcherClosed(RuntimeError):
    """The batcher was closed before this request ran."""


@dataclass
class _Request:
    item: Any
    key: Hashable
    future: Future
    arrived: float = field(default_factory=time.monotonic)


_STOP = object()


class Batcher:
    """Collects ``submit``-ted items into batches for ``run(items) -> results`` (same length, same
    order). ``max_batch``: most items per call; ``wait_ms``: how long an idle worker waits for the next
    item before it starts a batch; ``max_wait_ms``: how long the oldest item may wait in all (None:
    10 x ``wait_ms``)."""

    def __init__(self, run: Callable[[list[Any]], Sequence[Any]], *, max_batch: int = 16, wait_ms: float = 5.0,
                 max_wait_ms: float | None = None, name: str = "ngguard-batcher"):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
        if not 0 <= float(wait_ms) <= 10_000:
            raise ValueError(f"wait_ms must be in 0..10000, got {wait_ms!r}")
        max_wait_ms = 10 * float(wait_ms) if max_wait_ms is None else float(max_wait_ms)
        if not float(wait_ms) <= max_wait_ms <= 100_000:
            raise ValueError(f"max_wait_ms must be in wait_ms..100000 ({wait_ms}..100000), got {max_wait_ms!r}")
        self._run = run
        self.max_batch = max_batch
        self.wait_s = float(wait_ms) / 1000.0
        self.max_wait_s = max_wait_ms / 1000.0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._close_lock = threading.Lock()
        self.batches = 0  # batches run so far (for tests and logs)
        self.largest = 0  # largest batch run so far
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: Any, key: Hashable = None) -> Future:
        """Queue ``item``; the returned future gets its result (or the batch's exception)."""
        return self.submit_many([item], key)[0]

    def submit_many(self, items: Sequence[Any], key: Hashable = None) -> list[Future]:
        """Queue ``items`` together, one future each: the worker sees them at once, so they share a batch
        (as far as ``max_batch`` allows) however the submitting thread is scheduled; ``submit`` in a loop
        lets a busy machine split them."""
        requests = [_Request(item, key, Future()) for item in items]
        with self._close_lock:
            if self._closed:
                raise BatcherClosed("the batcher is closed")
            self._queue.put(requests)
        return [r.future for r in requests]

    def close(self, timeout: float | None = 60.0) -> None:
        """Stop the worker after the batch in progress; waiting requests fail with BatcherClosed.
        Waits up to ``timeout`` seconds for the worker to end (0: not at all; calling ``close`` again
        waits again)."""
        with self._close_lock:
            if not self._closed:
                self._closed = True
                self._queue.put(_STOP)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    # ---- the worker ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        pending: deque[_Request] = deque()
        while True:
            stopping = self._drain(pending, block=not pending)
            if not pending and not stopping:
                continue
            first = pending[0] if pending else None
            latest = max((r.arrived for r in pending), default=0.0)
            while first is not None and not stopping and self._count(pending, first.key) < self.max_batch:
                # no arrival for wait_s, or the oldest has waited max_wait_s: start the batch
                left = min(latest + self.wait_s, first.arrived + self.max_wait_s) - time.monotonic()
                if left <= 0:
                    break
                seen = len(pending)
                stopping = self._drain(pending, block=True, timeout=left)
                latest = max([latest] + [pending[i].arrived for i in range(seen, len(pending))])
            if stopping:  # no new batch once close() was called
                self._fail(pending)
                return
            self._execute(self._take(pending, first.key))

    def _drain(self, pending: deque, *, block: bool, timeout: float | None = None) -> bool:
        """Move queued requests into ``pending`` (waiting for the first one if ``block``). True if
        the stop marker was seen."""
        try:
            req = self._queue.get(block=block, timeout=timeout) if block else self._queue.get_nowait()
        except queue.Empty:
            return False
        while True:
            if req is _STOP:
                return True
            pending.extend(req)  # one ``submit_many`` call's requests, together
            try:
                req = self._queue.get_nowait()
            except queue.Empty:
                return False

    @staticmethod
    def _count(pending: deque, key: Hashable) -> int:
        return sum(1 for r in pending if r.key == key)

    def _take(self, pending: deque, key: Hashable) -> list[_Request]:
        batch, rest = [], deque()
        while pending:
            r = pending.popleft()
            (batch if r.key == key and len(batch) < self.max_batch else rest).append(r)
        pending.extend(rest)
        return batch

    def _execute(self, batch: list[_Request]) -> None:
        batch = [r for r in batch if r.future.set_running_or_notify_cancel()]
        if not batch:
            return
        try:
            results = list(self._run([r.item for r in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"batcher: run returned {len(results)} results for {len(batch)} requests")
        except BaseException as e:  # noqa: BLE001 - handed to every caller of the batch
            logger.debug("batch of {} failed: {}", len(batch), e)
            for r in batch:
                r.future.set_exception(e)
            return
        self.batches += 1
        self.largest = max(self.largest, len(batch))
        for r, out in zip(batch, results):
            r.future.set_result(out)

    @staticmethod
    def _fail(pending: deque) -> None:
        while pending:
            r = pending.popleft()
            if r.future.set_running_or_notify_cancel():
                r.future.set_exception(BatcherClosed("the batcher was closed before this request ran"))
