"""VolumeEmbeddings: every plane of a stack encoded once, kept in memory or in a zarr store on disk.

A plane that fits the model input is encoded whole (resized like ``SamSession.encode``); a larger
one, or any plane when ``tile``/``halo``/``scale`` are given, tile by tile (``runtime.tiling``).
All planes are normalised with the whole stack's intensity statistics (``IntensityRange`` over a
sample of planes), so a plane holding only background is not stretched into noise.

The zarr store (``store=PATH``) holds ``features`` (planes x tiles x 256 x g x g, float32), ``done``
(one flag per plane, set after its features are written) and the identity of what made it (the
encoder graphs' sha256, precision, adapter, tiles, and the stack: its shape and a sha256 of a
sample of its pixels, its intensity statistics). Reopening a
store with the same export and stack runs no encoder for the planes it holds; a store made by
another export, precision, tiling or stack is refused with what differs.

``compute(progress=, cancel=)`` embeds the missing planes (a progress callback ``(done, total)``, a
cancel flag: a ``threading.Event`` or a callable); ``start()`` does it in a background thread.
Planes asked for before they are embedded (``embedding(z)``) are encoded on demand.

On a SAM 2 session a plane's embedding is a ``Sam2Embedding`` (the image embedding and its two high-res
feature maps), made by the session's ``encode_tile`` as SAM's are: automatic 3D and tracking run on it the
same way; its store adds ``high_res_0`` (planes x tiles x 32 x 4g x 4g) and ``high_res_1`` (x 64 x 2g x 2g).
SAM 2's propagation (``sam2_propagate``) uses only the stack and its intensity statistics: it encodes each
plane as it reaches it.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from ..errors import PeftExportError
from ..runtime.adapters import pick_adapter, resolve_embedding
from ..runtime.embedding import ImageEmbedding
from ..runtime.tiled import TiledImage
from ..runtime.tiling import INTENSITY_SAMPLE, IntensityRange, TileGrid, TileSpec, tile_spec
from .stacks import Stack

STORE_FORMAT = 1
INTENSITY_PLANES = 16  # planes sampled for the stack's intensity statistics

Progress = Optional[Callable[[int, int], None]]
Cancel = Optional[Any]  # threading.Event, or a callable returning True to stop


def is_sam2(session: Any) -> bool:
    """A session on a SAM 2 export (``Sam2Session``): it propagates with its memory; its plane embeddings are
    ``Sam2Embedding``s."""
    return (getattr(session, "manifest", None) or {}).get("family") == "sam2"


def cancelled(cancel: Cancel) -> bool:
    if cancel is None:
        return False
    return bool(cancel.is_set() if hasattr(cancel, "is_set") else cancel())


def stack_sample(stack: Stack) -> np.ndarray:
    """Up to 16 planes of the stack, evenly spaced and subsampled to ~4 M pixels, side by side."""
    n = stack.n_planes
    planes = sorted({int(round(i)) for i in np.linspace(0, n - 1, min(n, INTENSITY_PLANES))})
    h, w = stack.plane_shape
    step = max(1, int(math.ceil(math.sqrt(len(planes) * h * w / INTENSITY_SAMPLE))))
    return np.concatenate([stack.read(z, slice(None, None, step), slice(None, None, step)) for z in planes], axis=1)


def stack_intensity(stack: Stack, rule: Optional[dict], sample: Optional[np.ndarray] = None) -> IntensityRange:
    """The intensity rule with statistics of the whole stack (``stack_sample``)."""
    return IntensityRange(stack_sample(stack) if sample is None else sample, rule)


def fingerprint(stack: Stack, sample: Optional[np.ndarray] = None) -> str:
    """sha256 of the stack's shape, dtype and ``stack_sample`` pixels: which stack a store belongs to."""
    import hashlib

    sample = np.ascontiguousarray(stack_sample(stack) if sample is None else sample)
    digest = hashlib.sha256(f"{stack.shape}{stack.dtype}".encode())
    digest.update(sample.tobytes())
    return digest.hexdigest()


def plane_spec(manifest: Dict[str, Any], plane_shape: Tuple[int, int], tile: Optional[int] = None,
               halo: Optional[int] = None, scale: Optional[float] = None, adapter: Optional[str] = None) -> TileSpec:
    """Whole planes (resized to the model input) when they fit it and no tiling was asked for; else
    the tiles of ``runtime.tiling`` (default: the export's training scale)."""
    size = int(manifest["image_size"])
    if tile is None and halo is None and scale is None and max(plane_shape) <= size:
        return TileSpec(max(plane_shape), 0, size)
    return tile_spec(manifest, tile, halo, scale, adapter)


def encoder_identity(session: Any, adapter: Optional[str]) -> Dict[str, Any]:
    """What makes the embeddings: the encoder graphs (sha256 from the manifest) and their precision."""
    graphs = session.manifest["graphs"]
    keys = list(session._routes[adapter].encoder) if adapter is not None else ["encoder"]
    chosen = session._chosen
    shas = []
    for key in keys:
        prec, path = chosen[key]
        shas.append(((graphs.get(key) or {}).get(prec) or {}).get("sha256") or f"{key}:{Path(path).name}")
    return {"model_type": session.manifest.get("model_type"), "image_size": session.image_size,
            "precision": chosen[keys[0]][0], "adapter": adapter, "encoder_sha256": shas,
            "intensity_rule": session._intensity_rule, "pixel_mean": list(session._pixel_mean),
            "pixel_std": list(session._pixel_std),
            "interpolation": getattr(session, "_interpolation", None) or session.manifest["preprocessing"].get(
                "interpolation")}  # Sam2Session: SAM 2's antialiased resize, as its manifest records


class VolumeEmbeddings:
    """The embeddings of every plane of ``stack`` for ``session`` (in memory, in ``store``, or, with
    ``keep=False``, computed each time they are asked for: automatic segmentation of a stack too
    large to keep them)."""

    def __init__(self, session: Any, stack: Stack, store: Optional[str | Path] = None, tile: Optional[int] = None,
                 halo: Optional[int] = None, scale: Optional[float] = None, adapter: Optional[str] = None,
                 keep: bool = True, intensity: Optional[IntensityRange] = None) -> None:
        self.session, self.stack = session, stack
        self.adapter = pick_adapter(adapter, session.adapters)
        self.plane_shape = stack.plane_shape
        self.spec = plane_spec(session.manifest, self.plane_shape, tile, halo, scale, self.adapter)
        self.grid = TileGrid(self.plane_shape, self.spec)
        sample = stack_sample(stack) if intensity is None or store is not None else None
        self.intensity = intensity or stack_intensity(stack, session._intensity_rule, sample)
        self.fingerprint = fingerprint(stack, sample) if store is not None else None
        self.encoder_runs = 0
        self.keep = keep or store is not None
        self._memory: Dict[Tuple[int, int], ImageEmbedding] = {}
        self._locks: Dict[int, threading.Lock] = {}
        self._guard = threading.Lock()
        self.store_path = Path(store) if store is not None else None
        self._features = self._done = None
        self._high_res: Optional[Tuple[Any, Any]] = None  # SAM 2: the store's two high-res feature maps
        self._done_cache: Optional[np.ndarray] = None
        if self.store_path is not None:
            self._open_store()

    # ---- identity and the store -------------------------------------------------------------

    def identity(self) -> Dict[str, Any]:
        return {"format": STORE_FORMAT, "encoder": encoder_identity(self.session, self.adapter),
                "planes": self.stack.n_planes, "plane_shape": list(self.plane_shape), "stack": self.fingerprint,
                "tiles": {"tile": self.spec.tile, "halo": self.spec.halo, "count": len(self.grid)},
                "intensity": self.intensity.record()}

    def _open_store(self) -> None:
        import zarr

        path, want = self.store_path, self.identity()
        g = self.session.image_size // 16
        if path.exists():
            try:
                group = zarr.open_group(str(path), mode="r+")
                have = dict(group.attrs.get("peftexport_embeddings") or {})
            except Exception:  # noqa: BLE001 - not a zarr group at all
                have = {}
            if not have:
                raise PeftExportError(f"{path}: exists and is not an embeddings store of peftexport; give another "
                                      "path or remove it")
            diff = [k for k in want if _json(have.get(k)) != _json(want[k])]
            if diff:
                what = ", ".join(_describe_difference(k, have.get(k), want[k]) for k in diff)
                raise PeftExportError(f"{path}: these embeddings were made differently ({what}); use another "
                                      "embeddings path, or delete this one to embed again")
            self._features, self._done = group["features"], group["done"]
            if is_sam2(self.session):
                self._high_res = (group["high_res_0"], group["high_res_1"])
            self._done_cache = np.asarray(self._done[:], bool)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        group = zarr.open_group(str(path), mode="w", zarr_format=2)
        n, t = self.stack.n_planes, len(self.grid)
        self._features = group.create_array("features", shape=(n, t, 256, g, g), chunks=(1, 1, 256, g, g),
                                            dtype="float32", fill_value=0)
        if is_sam2(self.session):  # the decoder's high-res inputs: (32, 4g, 4g) and (64, 2g, 2g)
            self._high_res = tuple(group.create_array(f"high_res_{i}", shape=(n, t, c, s, s), chunks=(1, 1, c, s, s),
                                                      dtype="float32", fill_value=0)
                                   for i, (c, s) in enumerate(((32, 4 * g), (64, 2 * g))))
        self._done = group.create_array("done", shape=(n,), chunks=(n,), dtype="uint8", fill_value=0)
        self._done_cache = np.zeros(n, bool)
        group.attrs["peftexport_embeddings"] = want
        group.attrs["source"] = self.stack.source

    # ---- planes -----------------------------------------------------------------------------

    def is_embedded(self, z: int) -> bool:
        if self._done_cache is not None:
            return bool(self._done_cache[z])
        return all((z, k) in self._memory for k in range(len(self.grid)))

    @property
    def n_embedded(self) -> int:
        return sum(self.is_embedded(z) for z in range(self.stack.n_planes))

    def _check_plane(self, z: int) -> int:
        z = int(z)
        if not 0 <= z < self.stack.n_planes:
            raise PeftExportError(f"plane {z}: outside the stack (0..{self.stack.n_planes - 1})")
        return z

    def _sizes(self, k: int) -> Tuple[Tuple[int, int], Tuple[int, int]]:
        from ..runtime.preprocess import preprocess_shape

        tile = self.grid.tiles[k]
        h, w = tile.shape
        size = self.spec.image_size
        new = preprocess_shape(h, w, size) if max(h, w) == self.spec.tile else (round(h * self.spec.scale),
                                                                               round(w * self.spec.scale))
        return (h, w), (int(new[0]), int(new[1]))

    def _encode(self, z: int, k: int) -> Any:
        """Tile ``k`` of plane ``z`` through the session's ``encode_tile`` (SAM's or SAM 2's own preprocessing)."""
        y0, y1, x0, x1 = self.grid.tiles[k].outer
        s = self.session
        pixels = self.stack.read(z, slice(y0, y1), slice(x0, x1))
        emb = resolve_embedding(s.encode_tile(pixels, self.intensity, self.spec), self.adapter, s.adapters)
        self.encoder_runs += 1
        return emb

    def _plane_lock(self, z: int) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(z, threading.Lock())

    def embed_plane(self, z: int) -> bool:
        """Encode plane ``z`` (every tile) unless it is embedded; True when the encoder ran."""
        z = self._check_plane(z)
        with self._plane_lock(z):
            if self.is_embedded(z):
                return False
            embs = [self._encode(z, k) for k in range(len(self.grid))]
            if self._features is not None:
                self._features[z] = np.concatenate([e.embedding for e in embs])
                for i, feats in enumerate(self._high_res or ()):
                    feats[z] = np.concatenate([e.high_res_feats[i] for e in embs])
                self._done[z] = 1  # after the features: a plane cut midway is embedded again
                self._done_cache[z] = True
            elif self.keep:
                for k, e in enumerate(embs):
                    self._memory[(z, k)] = e
            else:
                self._transient = (z, embs)
            return True

    def embedding(self, z: int, tile: int = 0) -> ImageEmbedding:
        """Plane ``z``'s embedding (of tile number ``tile`` for tiled planes), encoded now if needed."""
        z = self._check_plane(z)
        if not self.keep:
            last = getattr(self, "_transient", None)
            if last is None or last[0] != z:
                self._transient = (z, [self._encode(z, k) for k in range(len(self.grid))])
            return self._transient[1][tile]
        self.embed_plane(z)
        if self._features is None:
            return self._memory[(z, tile)]
        original, inp = self._sizes(tile)
        emb = np.asarray(self._features[z, tile][None], np.float32)
        emb.setflags(write=False)
        if self._high_res is not None:
            from ..runtime.sam2_session import Sam2Embedding

            high = tuple(np.asarray(f[z, tile][None], np.float32) for f in self._high_res)
            for a in high:
                a.setflags(write=False)
            return Sam2Embedding(emb, high, original)  # type: ignore[return-value]
        return ImageEmbedding(emb, original, inp, self.adapter)

    def compute(self, progress: Progress = None, cancel: Cancel = None, planes: Optional[Any] = None) -> int:
        """Embed every plane (or ``planes``) not embedded yet; returns how many were encoded now.
        Stops early, keeping what is done, when ``cancel`` is set."""
        todo = [int(z) for z in (planes if planes is not None else range(self.stack.n_planes))]
        ran = 0
        for i, z in enumerate(todo):
            if cancelled(cancel):
                break
            ran += self.embed_plane(z)
            if progress is not None:
                progress(i + 1, len(todo))
        return ran

    def start(self, progress: Progress = None) -> "EmbeddingJob":
        """``compute`` in a background thread; the job can be cancelled and waited for."""
        return EmbeddingJob(self, progress)

    def plane(self, z: int) -> "PlaneTiles":
        """Plane ``z`` as a ``TiledImage`` whose tiles use these embeddings."""
        return PlaneTiles(self, self._check_plane(z))


class EmbeddingJob:
    """``VolumeEmbeddings.compute`` running in a daemon thread."""

    def __init__(self, volume: VolumeEmbeddings, progress: Progress = None) -> None:
        self.event = threading.Event()
        self.error: Optional[BaseException] = None
        self.encoded = 0

        def run() -> None:
            try:
                self.encoded = volume.compute(progress=progress, cancel=self.event)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller by wait()
                self.error = exc

        self.thread = threading.Thread(target=run, name="peftexport-embed-volume", daemon=True)
        self.thread.start()

    def cancel(self) -> None:
        self.event.set()

    @property
    def done(self) -> bool:
        return not self.thread.is_alive()

    def wait(self, timeout: Optional[float] = None) -> int:
        """Wait for the thread; re-raises its error; returns the number of planes it encoded."""
        self.thread.join(timeout)
        if self.error is not None:
            raise self.error
        return self.encoded


class PlaneTiles(TiledImage):
    """One plane of a ``VolumeEmbeddings`` as a ``TiledImage``: prompts, AIS and segment-everything
    of ``runtime.tiled`` on the volume's (stored) embeddings."""

    def __init__(self, volume: VolumeEmbeddings, z: int) -> None:
        super().__init__(volume.session, volume.stack.plane_view(z), volume.spec, volume.adapter, cache=0,
                         intensity=volume.intensity)
        self.grid = volume.grid
        self.volume, self.z = volume, z

    def embedding(self, tile: Any) -> ImageEmbedding:
        return self.volume.embedding(self.z, self.grid.tiles.index(tile))


def _json(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value))


def _describe_difference(key: str, have: Any, want: Any) -> str:
    if key == "encoder" and isinstance(have, dict):
        parts = [f"{k} {have.get(k)!r}, not {want.get(k)!r}" for k in want if _json(have.get(k)) != _json(want[k])]
        return "encoder: " + "; ".join(parts)
    return f"{key} {have!r}, not {want!r}"
