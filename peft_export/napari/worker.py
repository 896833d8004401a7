"""Work off the GUI thread: tasks in napari's ``thread_worker`` with progress and cancel, whose
results are dropped once they no longer belong to what the viewer shows, and a cache of embeddings.

ONNX Runtime and OpenVINO release the GIL while they run, so the viewer keeps drawing and
answering clicks while the encoder works.

A task's work gets the ``Task``: ``task.step(done, total)`` reports progress (the widget's bar
shows it) and raises ``Cancelled`` once the user pressed Cancel, so long loops stop between
steps; a step that cannot be interrupted (one encoder run) finishes and its result is dropped.
When a task returns, ``Tasks`` hands its result on only if it was not cancelled, not replaced by
a newer task of the same key, and its target (``current.Target``) is still valid by the widget's
rule; otherwise it is dropped.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Hashable, Iterator, List, Optional

from napari.qt.threading import thread_worker
from qtpy.QtCore import QObject, Signal

EMBEDDINGS_KEPT = 32  # vit_b: 4 MiB each; switching slices back and forth stays instant


class Cancelled(Exception):
    """Raised by ``Task.step`` inside a task's work once the task was cancelled."""


class _Relay(QObject):
    """Carries progress from worker threads to the GUI thread (a queued Qt signal)."""

    progressed = Signal(object, int, int)


class Task:
    """One piece of work in a worker thread: what it is (``what``, shown in the status line), the
    ``target`` its result belongs to (None: always valid) and a ``key`` that identifies it."""

    def __init__(self, what: str, target: Any, key: Hashable, relay: _Relay) -> None:
        self.what, self.target, self.key = what, target, key
        self.progress = (0, 0)  # (done, total); total 0: no steps reported
        self.worker: Any = None
        self._relay = relay
        self._cancel = threading.Event()

    def step(self, done: int, total: int) -> None:
        """Report progress (from the work's thread); raises ``Cancelled`` once cancelled."""
        if self._cancel.is_set():
            raise Cancelled(self.what)
        self._relay.progressed.emit(self, int(done), int(total))

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()


def _timed(work: Callable[[Task], Any], task: Task) -> dict:
    start = time.perf_counter()
    try:
        result = work(task)
    except Exception as exc:  # reported on the GUI thread (status line), not as a traceback in the event loop
        return {"error": exc}
    return {"result": result, "start": start, "end": time.perf_counter()}


class Tasks:
    """The running tasks of one widget.

    ``valid(target)`` is the widget's rule for results that still apply; ``on_change()`` runs on
    the GUI thread whenever a task starts, ends or reports progress; ``on_dropped(task, why)``
    when a result is dropped.
    """

    def __init__(self, valid: Callable[[Any], bool], on_change: Callable[[], None],
                 on_dropped: Callable[[Task, str], None]) -> None:
        self._valid, self._on_change, self._on_dropped = valid, on_change, on_dropped
        self._running: List[Task] = []
        self._relay = _Relay()
        self._relay.progressed.connect(self._progressed)

    def __iter__(self) -> Iterator[Task]:
        return iter(list(self._running))

    def __len__(self) -> int:
        return len(self._running)

    def running(self, key: Hashable) -> Optional[Task]:
        """The running, not cancelled task of ``key``, if any."""
        return next((t for t in self._running if t.key == key and not t.cancelled), None)

    def start(self, what: str, work: Callable[[Task], Any], *, on_done: Callable[[dict], None],
              on_error: Callable[[Exception], None], target: Any = None, key: Optional[Hashable] = None,
              replace: bool = False) -> Task:
        """Run ``work(task)`` in a worker thread. ``on_done`` gets {"result", "start", "end"}
        (perf_counter seconds), ``on_error`` the exception, both on the GUI thread and only while
        the result applies. A running task of the same ``key`` is returned instead of starting
        another, or cancelled first with ``replace``."""
        key = key if key is not None else (what, target)
        if replace:
            self.cancel(lambda t: t.key == key)
        elif self.running(key) is not None:
            return self.running(key)
        task = Task(what, target, key, self._relay)

        def returned(out: dict) -> None:
            if task in self._running:
                self._running.remove(task)
            why = self._stale(task)
            if why:
                self._on_dropped(task, why)
            elif "error" in out:
                on_error(out["error"])
            else:
                on_done(out)
            self._on_change()

        def finished() -> None:  # after ``returned``; alone only when the work raised a BaseException
            if task in self._running:
                self._running.remove(task)
                self._on_change()

        task.worker = thread_worker(_timed, start_thread=False)(work, task)
        task.worker.returned.connect(returned)
        task.worker.finished.connect(finished)
        self._running.append(task)
        task.worker.start()
        self._on_change()
        return task

    def _stale(self, task: Task) -> str:
        if task.cancelled:
            return "cancelled"
        if task.target is not None and not self._valid(task.target):
            return "no longer current"
        return ""

    def cancel(self, which: Callable[[Task], bool] = lambda task: True) -> int:
        """Cancel the running tasks ``which`` selects (all by default); returns how many."""
        chosen = [t for t in self._running if which(t) and not t.cancelled]
        for task in chosen:
            task.cancel()
        if chosen:
            self._on_change()
        return len(chosen)

    def _progressed(self, task: Task, done: int, total: int) -> None:
        task.progress = (done, total)
        self._on_change()


class EmbeddingCache:
    """Least-recently-used embeddings. Keys are a ``current.Target`` or (Target, tile index)."""

    def __init__(self, size: int = EMBEDDINGS_KEPT) -> None:
        self.size = size
        self._items: "OrderedDict[Hashable, Any]" = OrderedDict()

    def get(self, key: Hashable) -> Optional[Any]:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, key: Hashable, embedding: Any) -> None:
        self._items[key] = embedding
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def drop(self, which: Callable[[Any], bool]) -> None:
        """Forget the entries whose target ``which(target)`` selects."""
        for key in [k for k in self._items if which(target_of(k))]:
            del self._items[key]

    def clear(self) -> None:
        self._items.clear()

    def targets(self) -> list:
        """The target of every entry, least recently used first."""
        return [target_of(k) for k in self._items]

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items


def target_of(key: Hashable) -> Any:
    """The target of a cache key (a Target, or the first item of (Target, tile index))."""
    return key[0] if isinstance(key, tuple) else key
