"""Work off the GUI thread: napari's ``thread_worker`` for the embedding and "Segment all", and
a small cache of embeddings per image layer, slice and adapter.

ONNX Runtime and OpenVINO release the GIL while they run, so the viewer keeps drawing and
answering clicks while the encoder works.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, Callable, Hashable, Optional

from napari.qt.threading import thread_worker

EMBEDDINGS_KEPT = 32  # vit_b: 4 MiB each; switching slices back and forth stays instant


class EmbeddingCache:
    """Least-recently-used embeddings, keyed by (layer id, slice index, adapter)."""

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

    def drop_layer(self, layer_id: int) -> None:
        """Forget one layer's embeddings (its data changed)."""
        for key in [k for k in self._items if k[0] == layer_id]:
            del self._items[key]

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items


def _timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict:
    start = time.perf_counter()
    try:
        result = fn(*args, **kwargs)
    except Exception as exc:  # shown in the widget's status line, not as a traceback in the event loop
        return {"error": exc}
    return {"result": result, "start": start, "end": time.perf_counter()}


def start_worker(fn: Callable[..., Any], *args: Any, on_done: Callable[[dict], None],
                 on_error: Callable[[Exception], None], **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` in a worker thread; ``on_done`` gets {"result", "start", "end"}
    (perf_counter seconds) on the GUI thread, ``on_error`` the exception."""
    worker = thread_worker(_timed, start_thread=False)(fn, *args, **kwargs)
    worker.returned.connect(lambda out: on_error(out["error"]) if "error" in out else on_done(out))
    worker.start()
    return worker
