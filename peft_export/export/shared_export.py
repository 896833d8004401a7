"""``merge_and_export_adapters``: several adapters of one base in one export, sharing the frozen trunk.

Layout (``manifest.json`` format 2; single-adapter exports stay format 1, unchanged):

* ``trunk.onnx``: patch embedding, positional embedding and the blocks before the split
  (the first block any sharing adapter changes); its weights are proven bit-identical to the
  base's and to every sharing adapter's merged weights (``sharing``);
* ``head_<NAME>.onnx`` per adapter: the remaining blocks and the neck, merged. Adapters
  whose heads are bit-identical share one file (``head_base.onnx`` when it is the base's:
  decoder-only adapters share the whole encoder);
* ``encoder_<NAME>.onnx`` for an adapter that cannot share (it trains the patch embedding);
* per adapter the decoder family (``split_image_<NAME>``, ``split_prompts_<NAME>``,
  ``split_masks_<NAME>``: predict and segment-everything), ``click_decoder_<NAME>`` (the browser
  page's, after the same split_image) and, with ``meta_decoder``, ``decoder_<NAME>``.

Every precision of every adapter is parity-checked as it runs: ``head(trunk(x))`` (or its own
encoder) and its decoders against that adapter's unmerged torch model, with the thresholds of
single exports. As for single exports, everything is written to a temporary directory that
replaces ``out_dir`` at the end; an optional graph that fails its gate is left out and listed in
``refused`` (``strict``: nothing written). Longer than 400 lines because the writer's refusal
rules and the per-adapter graph chains read best together.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from ..errors import PeftExportError
from ..fsutil import atomic_dir
from ..models import load_sam
from ..models.encoder_split import frozen_trunk
from ..peft.adapters import AdaptedModel
from . import onnx_graphs as og
from .click_decoder import CLICK_GRAPH, CLICK_NOTE, export_click_graph, verify_click_decoder
from . import trunk_graphs as tg
from .manifest import build_manifest, graph_entry, graph_io, training_scale_record, write_manifest
from .pipeline import _check_options, _check_out_dir, decoder_flavours, encoder_filename, export_source, merge_for_export
from .quantize import onnx_bytes, quantize_int8
from .refusals import refusal_line, refusal_record
from .split_decoder import SPLIT_GRAPHS, SPLIT_NOTE, export_split_graph, verify_split_decoder
from .sharing import (
    check_adapter_name,
    check_same_base,
    head_state,
    plan_sharing,
    prove_trunk,
    source_kind,
    state_digest,
    trunk_state,
)
from .gates import cosine, judge, ort_session
from .verify import _encoder_stats, build_reference, format_parity_table, verify_export

MULTI_FORMAT_VERSION = 2  # format 1 readers must refuse: they would look for "encoder"


def holds(split: int, depth: int, part: str) -> str:
    """What a trunk or head graph holds, in words (for the manifest and the log)."""
    if part == "trunk":
        return "patch_embed, pos_embed" + (f", blocks 0-{split - 1}" if split > 0 else "")
    return (f"blocks {split}-{depth - 1}, " if split < depth else "") + "neck"


class _Writer:
    """Exports graphs into the temporary directory, checks each, and collects manifest entries."""

    def __init__(self, tmp: Path, out_dir: Path, precisions: Sequence[str], opset: int, exporter: str,
                 attention: str, log: Callable[[str], None], strict: bool = False, meta_decoder: bool = False) -> None:
        self.tmp, self.out_dir, self.precisions = tmp, out_dir, precisions
        self.opset, self.exporter, self.attention, self.log = opset, exporter, attention, log
        self.strict, self.meta_decoder = strict, meta_decoder
        self.graphs: dict[str, dict] = {}
        self.refused: list[dict] = []  # manifest["refused"]: optional graphs that failed their gate
        self.rows: list[tuple[str, str, dict]] = []
        self.used_exporter = exporter

    def encoder_graphs(self, key: str, export: Callable[[Path, str, str], str]) -> dict[str, tuple[str, float]]:
        """Export ``key`` at every precision: {precision: (filename, seconds)}; int8 from fp32.

        ``export(path, precision, attention)``: fp32 (and the int8 quantised from it) with the
        chosen attention form, fp16 always plain (as for single exports).
        """
        files: dict[str, tuple[str, float]] = {}
        t = time.perf_counter()
        self.used_exporter = export(self.tmp / encoder_filename("fp32", key), "fp32", self.attention)
        files["fp32"] = (encoder_filename("fp32", key), time.perf_counter() - t)
        if "fp16" in self.precisions:
            t = time.perf_counter()
            export(self.tmp / encoder_filename("fp16", key), "fp16", "plain")
            files["fp16"] = (encoder_filename("fp16", key), time.perf_counter() - t)
        if "int8" in self.precisions:
            t = time.perf_counter()
            quantize_int8(self.tmp / files["fp32"][0], self.tmp / encoder_filename("int8", key))
            files["int8"] = (encoder_filename("int8", key), time.perf_counter() - t)
        return files

    def required(self, key: str, precision: str) -> bool:
        """fp32 encoder graphs and Meta's decoders are the reference (as for single exports); the
        family too when it is the adapter's only decoder (no --meta-decoder)."""
        kind = key.split("_")[0]
        if precision != "fp32" or kind in ("click", "ais"):
            return False
        return kind in ("trunk", "head", "encoder", "decoder") or (kind == "split" and not self.meta_decoder)

    def add(self, key: str, precision: str, filename: str, parity: dict, seconds: float, verify_s: float,
            io: tuple, extra: dict | None = None, row: str | None = None) -> bool:
        """Record a checked graph; False: an optional graph failed its gate and was left out (refused)."""
        parity.update(export_seconds=round(seconds, 2), verify_seconds=round(verify_s, 2))
        self.rows.append((row or key, precision, parity))
        self.log(f"  {row or key:<24} {precision:<5} exported {seconds:6.1f} s, verified {verify_s:5.1f} s, "
                 f"{onnx_bytes(self.tmp / filename) / 1e6:8.1f} MB  {'ok' if parity['passed'] else 'FAILED'}")
        if not parity["passed"]:
            if self.strict or self.required(key, precision):
                self.log(format_parity_table(self.rows))
                raise PeftExportError(f"{self.out_dir}: {row or key} {precision} failed verification "
                                      f"({'; '.join(parity['failures'])}); nothing written"
                                      + ("" if self.required(key, precision) else " (--strict)"))
            self.refuse(key, precision, filename, parity, extra)
            return False
        if key.split("_")[0] in ("trunk", "head", "encoder") and precision != "fp16":
            extra = dict(extra or {}, attention=self.attention)
        if key not in self.graphs or precision not in self.graphs[key]:
            self.graphs.setdefault(key, {})[precision] = graph_entry(self.tmp, key, filename, 0, parity, extra, io)
        return True

    def refuse(self, key: str, precision: str, filename: str | None, parity: dict | None, extra: dict | None = None,
               reason: str | None = None) -> None:
        """Leave ``key`` at ``precision`` out: its files removed, a ``refused`` record and a log line."""
        if filename:
            for p in (self.tmp / filename, self.tmp / (filename + ".data")):
                p.unlink(missing_ok=True)
        self.graphs.get(key, {}).pop(precision, None)
        if key in self.graphs and not self.graphs[key]:
            del self.graphs[key]
        entry = refusal_record(key, precision, "onnxruntime", parity, extra, reason)
        self.refused.append(entry)
        self.log(f"refused: {refusal_line(entry)}")

    def drop_fp32(self, keys: Sequence[str]) -> None:
        """fp32 graphs that were only made to quantise int8 from."""
        if "fp32" in self.precisions:
            return
        for key in keys:
            for p in (self.tmp / encoder_filename("fp32", key), self.tmp / (encoder_filename("fp32", key) + ".data")):
                p.unlink(missing_ok=True)


def _load_base(adapters: Mapping[str, AdaptedModel]):
    """The base model of the adapter runs (None when every adapter is a micro-sam checkpoint)."""
    for a in adapters.values():
        if source_kind(a) == "adapter":
            b = a.base
            sam, _ = load_sam(b.model_type, b.checkpoint, b.image_size, seed=b.seed, warn_random=False)
            return sam.eval(), f"the base ({b.checkpoint or f'random init, seed {b.seed}'}, sha256 {b.sha256[:12]})"
    return None, None


def _run(path: Path, feeds: dict) -> np.ndarray:
    return ort_session(path).run(None, feeds)[0]


def _features_parity(feats: np.ndarray, torch_feats: torch.Tensor, precision: str) -> dict:
    from ..merge import error_stats

    out = torch.from_numpy(np.nan_to_num(feats)).float()
    stats = {"embeddings": error_stats(torch_feats, out), "embeddings_cosine": cosine(torch_feats, out),
             "finite": bool(np.isfinite(feats).all()), "what": "trunk_features vs torch trunk"}
    stats["embeddings_max_rel"] = stats["embeddings"]["max_rel"]
    return judge(stats, precision, ("embeddings_max_rel", "embeddings_cosine"))


def merge_and_export_adapters(
    adapters: Mapping[str, AdaptedModel],
    out_dir: str | os.PathLike,
    formats: Sequence[str] = ("onnx",),
    precisions: Sequence[str] = ("fp32",),
    opset: int = 17,
    overwrite: bool = False,
    progress: bool = True,
    exporter: str = "torchscript",
    shared_trunk: bool | None = None,
    preprocess_in_graph: bool = False,
    attention: str = "plain",
    meta_decoder: bool = False,
    strict: bool = False,
) -> dict:
    """Export several adapters ({name: AdaptedModel}) of one base into one directory; returns the manifest.

    ``shared_trunk``: True requires one trunk for all (refused, with the reason, when an
    adapter trains the patch or positional embedding); None (default) shares among those
    that can; False gives each adapter its own whole encoder. ``attention``: how fp32 encoder
    graphs (trunk, heads, own encoders; and the int8 quantised from them) write attention,
    ``plain``, ``folded`` or ``fused``, as for single exports. ``meta_decoder``: also Meta's
    ``decoder`` per adapter (each adapter has the family either way).

    ``strict``: any refused graph fails the export (nothing written); by default an optional graph
    (int8 / fp16 encoder graphs, the decoder family, click or AIS decoder) that fails its gate is left
    out with what runs after it, and listed in ``manifest["refused"]``, as for single exports.
    """
    formats, precisions = tuple(dict.fromkeys(formats)), tuple(dict.fromkeys(precisions))
    _check_options(formats, precisions, opset, exporter, attention)
    if "bf16" in precisions:
        raise PeftExportError("--precision bf16: not available for several adapters yet; export each adapter alone")
    if "tensorrt" in formats:
        raise PeftExportError("--format tensorrt: not available for several adapters yet; export each adapter alone")
    if preprocess_in_graph:
        raise PeftExportError("--preprocess-in-graph: not available for several adapters yet; export each adapter alone")
    for name in adapters:
        check_adapter_name(name)
    check_same_base(adapters)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    log: Callable[[str], None] = print if progress else (lambda _msg: None)
    plan = plan_sharing(adapters, shared_trunk)
    first = next(iter(adapters.values()))
    size, model_type = first.base.image_size, first.base.model_type
    depth = len(first.model.image_encoder.blocks)
    t0 = time.perf_counter()
    if plan.split is not None:
        log(f"adapters {', '.join(plan.shared)} share trunk.onnx ({holds(plan.split, depth, 'trunk')})")
    for name, why in plan.separate.items():
        log(f"adapter {name} gets its own encoder: {why}")
    base_model, base_name = _load_base(adapters) if plan.split is not None else (None, None)

    entries: dict[str, dict] = {}
    trunk_info: dict | None = None
    log(f"exporting {model_type} (image size {size}), {len(adapters)} adapters, to {out_dir}: {', '.join(precisions)}")
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        w = _Writer(tmp, out_dir, precisions, opset, exporter, attention, log, strict, meta_decoder)
        trunk_ref: dict | None = None
        trunk_feats: dict[str, np.ndarray] = {}
        heads: dict[str, str] = {}  # digest of head weights -> graph key
        base_head = state_digest(head_state(base_model, plan.split)) if base_model is not None else None
        for name, adapted in adapters.items():
            model, merged, in_graph, merge_report = merge_for_export(adapted, lambda m, n=name: log(f"{n}: {m}"))
            reference = build_reference(adapted.model.eval())
            entry = {"peft": adapted.config.to_dict() if adapted.config else None, "base": adapted.base.to_dict(),
                     "source": export_source(adapted), "intensity": dict(adapted.intensity), "merged": merged,
                     "in_graph_adapters": in_graph, "merge_report": merge_report,
                     "first_trainable_block": plan.first_trainable[name],
                     "training_scale": training_scale_record(adapted.meta)}  # this adapter's default tile
            if name in plan.shared:
                split = plan.split
                if trunk_ref is None:  # the trunk comes from the base (or the first adapter: micro-sam only)
                    source, against = (base_model, base_name) if base_model is not None else (model, f"adapter {name}")
                    trunk_ref = trunk_state(source, split)
                    trunk_info = _export_trunk(w, source, split, reference, trunk_feats)
                    trunk_info.update(reference=against)
                prove_trunk(trunk_ref, trunk_state(model, split), name, trunk_info["reference"])
                digest = state_digest(head_state(model, split))
                new = digest not in heads
                if new:
                    heads[digest] = "head_base" if digest == base_head else f"head_{name}"
                key = heads[digest]
                entry["encoder"] = ["trunk", key]
                entry["holds"] = {"trunk": holds(split, depth, "trunk"), key: holds(split, depth, "head")}
                entry["encoder_parity"] = _export_head(w, model, adapted, name, key, new, split, reference, trunk_feats)
            else:
                key = f"encoder_{name}"
                entry["encoder"] = [key]
                entry["holds"] = {key: "the whole image encoder"}
                entry["own_encoder_because"] = plan.separate[name]
                files = w.encoder_graphs(key, lambda path, p, a: og.export_encoder_onnx(model, path, opset, p, exporter, a))
                entry["encoder_parity"] = {}
                for p, (filename, secs) in files.items():
                    if p in precisions:
                        t = time.perf_counter()
                        parity = verify_export(tmp / filename, "encoder", adapted.model, reference, p)
                        if w.add(key, p, filename, parity, secs, time.perf_counter() - t, graph_io("encoder", size)):
                            entry["encoder_parity"][p] = parity
                w.drop_fp32([key])
            for flavour in decoder_flavours(meta_decoder, False):  # Meta's decoder, besides the family
                key = f"{flavour}_{name}"
                t = time.perf_counter()
                og.export_decoder_onnx(model, tmp / f"{key}.onnx", flavour, opset)
                secs = time.perf_counter() - t
                t = time.perf_counter()
                parity = verify_export(tmp / f"{key}.onnx", flavour, adapted.model, reference, "fp32")
                w.add(key, "fp32", f"{key}.onnx", parity, secs, time.perf_counter() - t, graph_io(flavour, size))
                entry[flavour] = key
            entry.update(_export_click(w, model, name, size, reference))
            if adapted.instance_decoder is not None:  # micro-sam's AIS decoder: one per adapter
                ais = _export_ais(w, adapted, name, size, reference)
                if ais is not None:
                    entry["ais_decoder"] = ais
            entries[name] = entry
            del model
        w.drop_fp32(["trunk"] + sorted(set(heads.values())))

        manifest = build_manifest(
            model_type, size, dict(first.intensity), None, all(e["merged"] for e in entries.values()),
            sorted({m for e in entries.values() for m in e["in_graph_adapters"]}), w.graphs, opset, w.used_exporter,
            first.base.to_dict(), None,
        )
        manifest["format_version"] = MULTI_FORMAT_VERSION
        manifest["source"] = {"kind": "adapters", "adapters": {n: e["source"] for n, e in entries.items()}}
        manifest["shared_trunk"] = None if trunk_info is None else {
            "graph": "trunk", "split_block": plan.split, "output": tg.TRUNK_OUTPUT,
            "holds": holds(plan.split, depth, "trunk"), "adapters": plan.shared, "proof": trunk_info["proof"]}
        manifest["adapters"] = entries
        manifest["refused"] = w.refused
        write_manifest(tmp, manifest)
    log(format_parity_table(w.rows))
    if w.refused:
        log(f"export written in {time.perf_counter() - t0:.1f} s with {len(w.refused)} graph(s) refused: {out_dir}")
    else:
        log(f"export passed all checks in {time.perf_counter() - t0:.1f} s: {out_dir}")
    return manifest


def _export_click(w: _Writer, model, name: str, size: int, reference) -> dict:
    """The adapter's decoder family (split_image, split_prompts, split_masks: predict and segment-everything)
    and the browser's click_decoder after the same split_image, from its decoder's weights, each verified
    as a chain; returns the adapter entry's keys for them."""
    keys = {g: f"{g}_{name}" for g in SPLIT_GRAPHS}
    t = time.perf_counter()
    for graph, key in keys.items():
        export_split_graph(model, w.tmp / f"{key}.onnx", graph, w.opset)
    secs = time.perf_counter() - t
    t = time.perf_counter()
    parity = verify_split_decoder(w.tmp, reference, "fp32", files={g: w.tmp / f"{k}.onnx" for g, k in keys.items()})
    ok = True
    for graph, key in keys.items():  # one chain, one verdict: all three kept or all refused
        ok = w.add(key, "fp32", f"{key}.onnx", dict(parity), secs, time.perf_counter() - t, graph_io(graph, size),
                   extra={"note": SPLIT_NOTE}) and ok
    click = f"{CLICK_GRAPH}_{name}"
    if not ok:
        w.refuse(click, "fp32", None, None, reason="not exported: it runs after split_image, which was refused")
        return {}
    t = time.perf_counter()
    export_click_graph(model, w.tmp / f"{click}.onnx", w.opset)
    secs = time.perf_counter() - t
    t = time.perf_counter()
    parity = verify_click_decoder(w.tmp / f"{click}.onnx", reference, "fp32",
                                  context=w.tmp / f"{keys['split_image']}.onnx")
    if not w.add(click, "fp32", f"{click}.onnx", parity, secs, time.perf_counter() - t, graph_io(CLICK_GRAPH, size),
                 extra={"note": CLICK_NOTE}):
        return keys
    return {**keys, CLICK_GRAPH: click}


def _export_trunk(w: _Writer, source, split: int, reference, trunk_feats: dict) -> dict:
    """Export and check ``trunk`` at every precision; fills ``trunk_feats`` with its output on the probe."""
    files = w.encoder_graphs("trunk", lambda path, p, a: tg.export_trunk_onnx(source, path, split, w.opset, p, w.exporter, a))
    with torch.no_grad():  # a reference value: no autograd graph of the trunk's activations
        torch_feats = frozen_trunk(source, reference.image, split)
    io = tg.graph_io("trunk", source, split)
    for p, (filename, secs) in files.items():
        if p not in w.precisions:
            continue
        t = time.perf_counter()
        feats = _run(w.tmp / filename, {"image": reference.image.numpy()})
        if w.add("trunk", p, filename, _features_parity(feats, torch_feats, p), secs, time.perf_counter() - t, io,
                 extra={"split_block": split}):
            trunk_feats[p] = feats  # a refused trunk precision has no heads
    state = trunk_state(source, split)
    return {"proof": {
        "method": "merged torch weights compared bit for bit (raw bytes, dtype, shape) before export",
        "tensors": len(state), "parameters": int(sum(v.numel() for v in state.values())),
        "sha256": state_digest(state), "identical": True,
    }}


def _export_head(w: _Writer, model, adapted: AdaptedModel, name: str, key: str, new: bool, split: int, reference,
                 trunk_feats: dict) -> dict:
    """Export ``key`` (if this adapter is the first with these head weights) and check head(trunk(x)) per precision."""
    if new:
        files = w.encoder_graphs(key, lambda path, p, a: tg.export_head_onnx(model, path, split, w.opset, p, w.exporter, a))
    else:
        files = {p: (encoder_filename(p, key), 0.0) for p in w.precisions}
    io = tg.graph_io("head", model, split)
    parities = {}
    for p in w.precisions:
        filename, secs = files[p]
        if p not in trunk_feats or not (new or p in w.graphs.get(key, {})):  # refused trunk, or head refused before
            if new:
                w.refuse(key, p, filename, None, reason=f"not kept: it runs after trunk {p}, which was refused")
            continue
        t = time.perf_counter()
        emb = _run(w.tmp / filename, {tg.TRUNK_OUTPUT: trunk_feats[p]})
        parity = _encoder_stats(emb, adapted.model, reference, p)
        parity["what"] = f"head(trunk(x)) vs adapter {name}, unmerged torch"
        if w.add(key, p, filename, parity, secs, time.perf_counter() - t, io, row=f"{key} ({name})",
                 extra={"split_block": split, "adapters": []}):
            w.graphs[key][p]["adapters"].append(name)
            parities[p] = parity
    return parities


def _export_ais(w: _Writer, adapted: AdaptedModel, name: str, size: int, reference) -> str | None:
    """``ais_decoder_<name>`` in fp32 (and fp16 when asked; no int8, as for single exports), checked
    against the adapter's torch decoder on its probe embedding; returns the graph key."""
    from .ais import export_ais_decoder_onnx, verify_ais_decoder

    key = f"ais_decoder_{name}"
    for p in ["fp32"] + [p for p in w.precisions if p == "fp16"]:
        filename = encoder_filename(p, key)
        t = time.perf_counter()
        export_ais_decoder_onnx(adapted.instance_decoder, w.tmp / filename, size, p, w.opset)
        secs = time.perf_counter() - t
        t = time.perf_counter()
        parity = verify_ais_decoder(w.tmp / filename, adapted.instance_decoder, reference, p)
        if not w.add(key, p, filename, parity, secs, time.perf_counter() - t, graph_io("ais_decoder", size)):
            if p == "fp32":
                return None  # refused: the adapter has no instance decoder
    return key

