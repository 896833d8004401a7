"""Exports of several adapters (manifest format 2): which graphs each adapter runs, and one image
encoded once by the shared trunk, each adapter's embedding computed on first use.

An adapter's ``encoder`` in the manifest is a chain of graph keys: ``["trunk", "head_<NAME>"]``
(the first takes the preprocessed image, each next one the previous output) or
``["encoder_<NAME>"]`` for an adapter with its own whole encoder. Outputs are cached per chain
prefix, so the trunk runs once per image and a head shared by several adapters runs once too.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple

import numpy as np

from ..errors import PeftExportError


@dataclass(frozen=True)
class AdapterRoute:
    """The graphs one adapter runs: its encoder chain and its decoders (graph keys of the manifest)."""

    encoder: Tuple[str, ...]
    decoder: Optional[str]
    decoder_lowres: Optional[str]
    ais_decoder: Optional[str] = None  # micro-sam's instance decoder, when the adapter has one
    family: Optional[Tuple[str, str, str]] = None  # its split_image, split_prompts, split_masks keys


def adapter_routes(manifest: Dict[str, Any]) -> Dict[str, AdapterRoute]:
    """{name: route} of a format-2 manifest; {} for single-model exports."""
    routes = {}
    for name, entry in (manifest.get("adapters") or {}).items():
        chain = tuple(entry.get("encoder") or ())
        if not chain:
            raise PeftExportError(f"manifest.json: adapter {name} lists no encoder graphs")
        family = tuple(entry.get(g) for g in ("split_image", "split_prompts", "split_masks"))
        routes[name] = AdapterRoute(chain, entry.get("decoder"), entry.get("decoder_lowres"), entry.get("ais_decoder"),
                                    family if all(family) else None)  # type: ignore[arg-type]
    return routes


def select_routes(routes: Dict[str, AdapterRoute], names: Optional[Sequence[str]]) -> Dict[str, AdapterRoute]:
    """The routes of ``names`` (all when None), in the export's order; unknown names refused."""
    if names is None:
        return routes
    if isinstance(names, str):
        names = [names]
    for n in names:
        pick_adapter(n, tuple(routes))
    if not names:
        raise PeftExportError("adapters: give at least one adapter name (or None for all)")
    return {n: r for n, r in routes.items() if n in names}


def choose_adapter_graphs(
    manifest: Dict[str, Any], routes: Dict[str, AdapterRoute], precision: str,
    graph_file: Callable[[Dict[str, Any], str], Path],
) -> Dict[str, Tuple[str, Path]]:
    """{graph key: (precision, file)} for every graph an adapter runs.

    The first graph of each chain (trunk, or an adapter's own encoder) must have ``precision``;
    heads and decoders use it when they have it, else fp32.
    """
    graphs = manifest["graphs"]
    chosen: Dict[str, Tuple[str, Path]] = {}
    for name, route in routes.items():
        keys = [(k, i == 0) for i, k in enumerate(route.encoder)]
        keys += [(k, False) for k in (route.decoder_lowres, route.decoder, route.ais_decoder) if k]
        keys += [(k, False) for k in route.family or ()]
        if not (route.decoder or route.decoder_lowres or route.family):
            raise PeftExportError(f"manifest.json: adapter {name} lists no decoder graph")
        for key, strict in keys:
            if key in chosen:
                continue
            variants = graphs.get(key) or {}
            prec = precision if precision in variants or strict else "fp32"
            if prec not in variants:
                have = ", ".join(sorted(variants)) or "none"
                raise PeftExportError(f"precision: graph {key} of adapter {name} has no {prec} file (has: {have})")
            chosen[key] = (prec, graph_file(variants[prec], key))
    return chosen


def pick_adapter(adapter: Optional[str], names: Sequence[str]) -> Optional[str]:
    """The adapter to use: ``adapter`` checked against ``names``; may be omitted only when there is one."""
    if not names:
        if adapter is not None:
            raise PeftExportError(f"adapter: this export holds one model, not named adapters (got {adapter!r})")
        return None
    if adapter is None:
        if len(names) == 1:
            return names[0]
        raise PeftExportError(f"adapter: this export holds adapters {', '.join(names)}; pass adapter=NAME")
    if adapter not in names:
        raise PeftExportError(f"adapter: unknown {adapter!r} (this export holds {', '.join(names)})")
    return adapter


def resolve_embedding(emb: Any, adapter: Optional[str], names: Sequence[str]) -> Any:
    """The ``ImageEmbedding`` to decode with: ``emb`` (an ``EncodedImage`` or an ``ImageEmbedding``)
    for ``adapter``, checked against the export's adapter ``names``."""
    if isinstance(emb, EncodedImage):
        return emb.embedding(pick_adapter(adapter, names))
    if adapter is not None and emb.adapter is not None and adapter != emb.adapter:
        raise PeftExportError(f"adapter: embedding= is adapter {emb.adapter!r}'s, adapter={adapter!r} was asked")
    name = pick_adapter(adapter if adapter is not None else emb.adapter, names)
    return emb if name == emb.adapter else dataclasses.replace(emb, adapter=name)


class EncodedImage:
    """One image through the shared trunk; each adapter's embedding is computed on first use and kept.

    Its image never changes; its cache only fills (every value is read-only), so threads may
    share it: each chain prefix has its own lock (taken longest first), so a head runs once
    however many threads ask for it, and different heads run at the same time.
    """

    def __init__(
        self,
        image: np.ndarray,
        original_size: Tuple[int, int],
        input_size: Tuple[int, int],
        routes: Dict[str, AdapterRoute],
        run: Callable[[str, np.ndarray], np.ndarray],
        make_embedding: Callable[[np.ndarray, Tuple[int, int], Tuple[int, int], str], Any],
    ) -> None:
        self.original_size, self.input_size = original_size, input_size
        self.adapters = tuple(routes)
        self._routes, self._run, self._make = routes, run, make_embedding
        self._image: Optional[np.ndarray] = image
        prefixes = {r.encoder[:i] for r in routes.values() for i in range(1, len(r.encoder) + 1)}
        self._locks = {p: threading.Lock() for p in prefixes}
        self._cache: Dict[Tuple[str, ...], np.ndarray] = {}
        self._embeddings: Dict[str, Any] = {}

    def _output(self, chain: Tuple[str, ...]) -> np.ndarray:
        if not chain:
            if self._image is None:
                raise PeftExportError("encode: the preprocessed image was released")
            return self._image
        with self._locks[chain]:
            out = self._cache.get(chain)
            if out is None:
                out = np.asarray(self._run(chain[-1], self._output(chain[:-1])), dtype=np.float32)
                out.setflags(write=False)
                self._cache[chain] = out
                self._release_image()
            return out

    def _release_image(self) -> None:
        # Once every chain's first graph has run, the preprocessed image (12 MB at 1024) is not needed.
        if all(r.encoder[:1] in self._cache for r in self._routes.values()):
            self._image = None

    def run_trunk(self) -> None:
        """Run the graphs that read the image and feed heads (the trunk); own encoders stay lazy."""
        for chain in dict.fromkeys(r.encoder[:1] for r in self._routes.values() if len(r.encoder) > 1):
            self._output(chain)

    def embedding(self, adapter: str):
        """The adapter's ``ImageEmbedding`` (computed now if it was not yet)."""
        emb = self._embeddings.get(adapter)
        if emb is None:
            route = self._routes.get(adapter)
            if route is None:
                raise PeftExportError(f"adapter: unknown {adapter!r} (this export holds {', '.join(self.adapters)})")
            out = self._output(route.encoder)
            emb = self._embeddings.setdefault(adapter, self._make(out, self.original_size, self.input_size, adapter))
        return emb

    def computed(self) -> Tuple[str, ...]:
        """The adapters whose embeddings exist already (lazy heads not yet run are missing)."""
        return tuple(n for n in self.adapters if self._routes[n].encoder in self._cache)

    def prefetch(self, adapters: Iterable[str]) -> None:
        for name in adapters:
            self.embedding(name)
