"""``peftexport bench``: latency and memory of every way to run one model, side by side.

A *case* is one way to run the model (base SAM in torch, the adapter model unmerged,
the merged model, torch.compile, each exported precision in ONNX Runtime, TensorRT
engines). Each case is timed per *component*:

- ``encoder``: the image encoder on a preprocessed 1x3xSxS input;
- ``decoder_point`` / ``decoder_box``: prompt encoder + mask decoder on a fixed image
  embedding, one positive point / one box, low-resolution masks out;
- ``decoder_boxes_bN``: the same with a batch of N boxes in one call;
- ``end_to_end``: ``set_image`` + ``predict`` (one box) from a host uint8 image to
  host boolean masks at the image's size (SamPredictor in torch, SamSession otherwise).

Warm-up calls are not timed. Memory is measured on the warm-up calls (on the first
timed calls when there is no warm-up): on CPU the peak RSS of the process above its
RSS on entry to the call (``stats.RssSampler``); with torch on CUDA
``max_memory_allocated`` above what was allocated on entry; for ONNX Runtime /
TensorRT on CUDA the growth of device memory in use (``cudaMemGetInfo``), because
their allocators are invisible to torch. ``resident_mb`` is what loading the case
added (weights, sessions); ``peak_mb`` = resident + the largest working memory of a call.

On CUDA torch calls are timed with CUDA events; ONNX Runtime runs with IO binding, so
inputs already sit on the device and outputs stay there (no host copies are timed).
End to end includes host copies by definition.

This module imports only numpy and the standard library at import time; torch,
onnxruntime and tensorrt are imported by the cases that need them, so an export dir
can be benchmarked on a machine without torch.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import importlib.util
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from . import __version__
from .errors import PeftExportError
from .fsutil import atomic_file
from .stats import RssSampler, current_rss_mb, device_info, library_versions, summarize_timings

BENCH_FORMAT = "peftexport-bench"
BENCH_FORMAT_VERSION = 1
BACKENDS = ("torch", "torch-compile", "onnxruntime", "tensorrt")
TORCH_PRECISIONS = ("fp32", "bf16", "fp16")
EXPORT_PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_COMPONENTS = ("encoder", "decoder_point", "decoder_box", "decoder_boxes", "end_to_end")
ORT_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


# ---- case descriptions and planning ---------------------------------------------------


@dataclass
class CaseSpec:
    """One way of running the model; ``model`` is base / unmerged / merged / export."""

    model: str
    backend: str
    precision: str
    device: str
    provider: str = ""  # onnxruntime: cpu / cuda / tensorrt
    note: str = ""

    @property
    def name(self) -> str:
        backend = f"{self.backend}-{self.provider}" if self.provider else self.backend
        return f"{self.model} {backend} {self.precision}"


def skip_record(spec: CaseSpec, reason: str) -> dict:
    """The result entry of a case that was not run (a missing backend is not a failure)."""
    return {**_spec_fields(spec), "status": "skipped", "reason": reason, "components": {}}


def _spec_fields(spec: CaseSpec) -> dict:
    return {
        "case": spec.name, "model": spec.model, "backend": spec.backend, "provider": spec.provider or None,
        "precision": spec.precision, "device": spec.device, "note": spec.note or None,
    }


@dataclass
class Availability:
    """What this machine can run; ``detect_availability`` fills it in."""

    cuda: bool = False
    onnxruntime: bool = False
    ort_providers: tuple[str, ...] = ()
    tensorrt: bool = False
    torch: bool = True


def detect_availability() -> Availability:
    av = Availability()
    av.torch = importlib.util.find_spec("torch") is not None
    if av.torch:
        try:
            import torch

            av.cuda = bool(torch.cuda.is_available())
        except Exception:
            av.torch = False
    try:
        import onnxruntime as ort

        av.onnxruntime = True
        av.ort_providers = tuple(ort.get_available_providers())
    except Exception:
        pass
    av.tensorrt = importlib.util.find_spec("tensorrt") is not None
    return av


def parse_list(text: str | Sequence[str] | None, allowed: Iterable[str] | None, what: str) -> list[str] | None:
    """'a,b' -> ['a', 'b'], each checked against ``allowed``; None stays None."""
    if text is None:
        return None
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if not items:
        raise PeftExportError(f"{what}: empty list")
    if allowed is not None:
        allowed = tuple(allowed)
        for item in items:
            if item not in allowed:
                raise PeftExportError(f"{what}: unknown '{item}' (use {', '.join(allowed)})")
    return items


def plan_cases(
    backends: Sequence[str],
    device: str,
    precisions: Sequence[str] | None,
    available: Availability,
    torch_models: Sequence[str] = (),
    unmergeable_reason: str | None = None,
    export_precisions: Sequence[str] = (),
    engine_precisions: Sequence[str] = (),
    no_export_reason: str | None = None,
) -> tuple[list[CaseSpec], list[dict]]:
    """Which cases run and which are skipped (with the reason), from what exists.

    ``torch_models``: the torch models on hand, in order (``base``, ``unmerged``,
    ``merged``). ``export_precisions``: encoder precisions in the export;
    ``engine_precisions``: precisions of native TensorRT encoder engines.
    ``precisions=None``: torch fp32 (+ bf16 on CUDA) and every exported precision.
    """
    run: list[CaseSpec] = []
    skipped: list[dict] = []
    if device not in ("cpu", "cuda"):
        raise PeftExportError(f"--device: unknown '{device}' (use cpu or cuda)")
    if device == "cuda" and not available.cuda:
        raise PeftExportError("--device cuda: no CUDA device is visible to torch")
    asked = list(precisions) if precisions is not None else None
    torch_precisions = (
        [p for p in asked if p in TORCH_PRECISIONS] if asked is not None
        else (["fp32", "bf16"] if device == "cuda" else ["fp32"])
    )
    if "torch" in backends and torch_models:
        for model in torch_models:
            for p in torch_precisions:
                spec = CaseSpec(model, "torch", p, device)
                if model == "merged" and unmergeable_reason:
                    skipped.append(skip_record(spec, unmergeable_reason))
                elif device == "cpu" and p == "fp16":
                    skipped.append(skip_record(spec, "fp16 torch is timed only on CUDA (CPU autocast fp16 is not a deployment path)"))
                else:
                    run.append(spec)
    if "torch-compile" in backends and torch_models:
        model = "merged" if "merged" in torch_models else torch_models[-1]
        for p in torch_precisions:
            spec = CaseSpec(model, "torch-compile", p, device, note="torch.compile(image_encoder); decoder eager")
            if model == "merged" and unmergeable_reason:
                skipped.append(skip_record(spec, unmergeable_reason))
            elif device != "cuda":
                skipped.append(skip_record(spec, "torch.compile is timed only on CUDA (compiling vit_b on a CPU takes minutes)"))
            elif device == "cuda" and p == "fp16":
                skipped.append(skip_record(spec, "torch.compile is timed in fp32 and bf16 only"))
            else:
                run.append(spec)
    if ("torch" in backends or "torch-compile" in backends) and not torch_models:
        skipped.append(skip_record(CaseSpec("adapter", "torch", "fp32", device),
                                   "no torch model: give --adapter RUN (or an export whose manifest records a loadable adapter)"))
    if "onnxruntime" in backends:
        wanted = [p for p in export_precisions if asked is None or p in asked]
        missing = [p for p in (asked or []) if p in EXPORT_PRECISIONS and p not in export_precisions]
        providers = ["cpu"] if device == "cpu" else ["cuda", "tensorrt"]
        if no_export_reason:
            skipped.append(skip_record(CaseSpec("export", "onnxruntime", ",".join(asked or ["fp32"]), device), no_export_reason))
        for prov in providers:
            for p in wanted:
                spec = CaseSpec("export", "onnxruntime", p, device, provider=prov)
                if not available.onnxruntime:
                    skipped.append(skip_record(spec, "onnxruntime is not installed (pip install 'peftexport[cpu]' or '[gpu]')"))
                elif ORT_PROVIDERS[prov] not in available.ort_providers:
                    hint = " (install onnxruntime-gpu instead of onnxruntime)" if prov == "cuda" else ""
                    skipped.append(skip_record(spec, f"{ORT_PROVIDERS[prov]} is not available in this onnxruntime{hint}"))
                else:
                    run.append(spec)
            if not no_export_reason:
                for p in missing:
                    skipped.append(skip_record(CaseSpec("export", "onnxruntime", p, device, provider=prov),
                                               f"the export has no {p} encoder graph"))
    if "tensorrt" in backends:
        wanted = [p for p in engine_precisions if asked is None or p in asked] or list(asked or ["fp16"])[:1]
        for p in wanted:
            spec = CaseSpec("export", "tensorrt", p, device, note="runtime path, host copies included")
            if device != "cuda":
                skipped.append(skip_record(spec, "TensorRT engines need --device cuda"))
            elif not available.tensorrt:
                skipped.append(skip_record(spec, "the tensorrt package is not installed (pip install 'peftexport[tensorrt]')"))
            elif p not in engine_precisions:
                skipped.append(skip_record(spec, "the export has no TensorRT engine of this precision (export with --tensorrt)"))
            else:
                run.append(spec)
    return run, skipped


# ---- inputs -----------------------------------------------------------------------------


@dataclass
class BenchInputs:
    """Seeded inputs shared by every case, so all cases do the same work."""

    image_size: int
    batch_sizes: tuple[int, ...] = (16,)
    seed: int = 0
    image: np.ndarray = field(init=False)  # host uint8 HxWx3 for end to end
    encoder_input: np.ndarray = field(init=False)  # 1x3xSxS float32, normalised
    point: np.ndarray = field(init=False)  # (2,) x,y in the S frame
    box: np.ndarray = field(init=False)  # (4,) xyxy in the S frame
    boxes: dict = field(init=False)  # batch -> (B,4) in the S frame
    image_box: np.ndarray = field(init=False)  # (4,) xyxy in the host image frame

    def __post_init__(self) -> None:
        s = self.image_size
        rng = np.random.default_rng(self.seed)
        h, w = (s * 3) // 4, s  # not square: end to end also pads
        low = rng.uniform(0, 255, size=(max(h // 32, 2), max(w // 32, 2), 3))
        img = np.kron(low, np.ones((32, 32, 1)))[:h, :w]
        img = np.pad(img, ((0, h - img.shape[0]), (0, w - img.shape[1]), (0, 0)), mode="edge")
        self.image = np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)
        x = rng.uniform(0, 255, size=(1, 3, s, s)).astype(np.float32)
        mean = np.asarray([123.675, 116.28, 103.53], np.float32).reshape(1, 3, 1, 1)
        std = np.asarray([58.395, 57.12, 57.375], np.float32).reshape(1, 3, 1, 1)
        self.encoder_input = (x - mean) / std
        self.point = np.asarray([0.5 * s, 0.4 * s], np.float32)
        self.box = np.asarray([0.2 * s, 0.25 * s, 0.6 * s, 0.7 * s], np.float32)
        self.boxes = {}
        for b in self.batch_sizes:
            xy = rng.uniform(0, 0.7 * s, size=(b, 2))
            wh = rng.uniform(0.05 * s, 0.3 * s, size=(b, 2))
            self.boxes[b] = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
        self.image_box = np.asarray([0.2 * w, 0.25 * h, 0.6 * w, 0.7 * h], np.float32)

    def decoder_prompts(self, component: str) -> tuple[np.ndarray, np.ndarray]:
        """Meta-convention coords (K,N,2) and labels (K,N) in the S frame for a decoder component."""
        if component == "decoder_point":
            return (np.asarray([[self.point, [0.0, 0.0]]], np.float32), np.asarray([[1, -1]], np.float32))
        if component == "decoder_box":
            return self.box.reshape(1, 2, 2).copy(), np.asarray([[2, 3]], np.float32)
        b = component_batch(component)
        boxes = self.boxes[b]
        return boxes.reshape(b, 2, 2).copy(), np.tile(np.asarray([[2, 3]], np.float32), (b, 1))


def component_batch(component: str) -> int:
    """Prompts per call of a component: N for decoder_boxes_bN, 1 otherwise."""
    if component.startswith("decoder_boxes_b"):
        return int(component[len("decoder_boxes_b"):])
    return 1


def expand_components(components: Sequence[str], batch_sizes: Sequence[int]) -> list[str]:
    out: list[str] = []
    for c in components:
        if c == "decoder_boxes":
            out.extend(f"decoder_boxes_b{b}" for b in batch_sizes)
        elif c in DEFAULT_COMPONENTS:
            out.append(c)
        else:
            raise PeftExportError(f"--components: unknown '{c}' (use {', '.join(DEFAULT_COMPONENTS)})")
    return out


# ---- runners ------------------------------------------------------------------------------


class Runner:
    """Runs one case: ``prepare`` loads it, ``run(component)`` does one synchronised call."""

    spec: CaseSpec
    uses_cuda_events = False

    def prepare(self) -> None:
        raise NotImplementedError

    def ready(self, component: str) -> None:
        """Untimed set-up a component needs (an embedding for the decoders, bound inputs)."""

    def run(self, component: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def describe(self) -> dict:
        return {}


class TorchRunner(Runner):
    """A segment_anything ``Sam`` (plain, merged or with PEFT layers) in torch."""

    def __init__(self, spec: CaseSpec, model_factory: Callable[[], Any], inputs: BenchInputs,
                 release: Callable[[Any], None] | None = None) -> None:
        self.spec, self.inputs = spec, inputs
        self._factory, self._release = model_factory, release
        self.uses_cuda_events = spec.device == "cuda"
        self.model = None

    def _autocast(self):
        import torch

        if self.spec.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.spec.precision == "bf16" else torch.float16
        return torch.autocast(self.spec.device, dtype=dtype)

    def prepare(self) -> None:
        import torch
        from segment_anything import SamPredictor

        dev = torch.device(self.spec.device)
        model = self._factory().to(dev).eval()
        self.model = model
        self._plain_encoder = None
        if self.spec.backend == "torch-compile":
            # Swapped in so that end to end (SamPredictor) runs the compiled encoder too; undone in close.
            self._plain_encoder = model.image_encoder
            model.image_encoder = torch.compile(model.image_encoder)
        self._encoder = model.image_encoder
        self._x = torch.from_numpy(self.inputs.encoder_input).to(dev)
        self._emb = self._pe = None
        self._prompts = {}
        self._predictor = SamPredictor(model)
        self._image_box = torch.from_numpy(self.inputs.image_box).to(dev)[None]

    def ready(self, component: str) -> None:
        import torch

        if component.startswith("decoder") and self._emb is None:
            with torch.inference_mode(), self._autocast():
                self._emb = self.model.image_encoder(self._x)
                self._pe = self.model.prompt_encoder.get_dense_pe()
            self._decoder_prompt(component)

    def _decoder_prompt(self, component: str):
        import torch

        if component not in self._prompts:
            coords, labels = self.inputs.decoder_prompts(component)
            dev = self._x.device
            if component == "decoder_point":
                # segment_anything appends the padding point itself when no box is given.
                self._prompts[component] = dict(points=(torch.from_numpy(coords[:, :1]).to(dev),
                                                        torch.from_numpy(labels[:, :1]).int().to(dev)), boxes=None)
            else:
                self._prompts[component] = dict(points=None, boxes=torch.from_numpy(coords.reshape(-1, 4)).to(dev))
        return self._prompts[component]

    def run(self, component: str) -> None:
        import torch

        m = self.model
        with torch.inference_mode(), self._autocast():
            if component == "encoder":
                self._encoder(self._x)
            elif component == "end_to_end":
                self._predictor.set_image(self.inputs.image)
                boxes = self._predictor.transform.apply_boxes_torch(self._image_box, self._predictor.original_size)
                masks, _, _ = self._predictor.predict_torch(None, None, boxes=boxes, multimask_output=False)
                masks.cpu()
            else:
                p = self._decoder_prompt(component)
                sparse, dense = m.prompt_encoder(points=p["points"], boxes=p["boxes"], masks=None)
                m.mask_decoder(image_embeddings=self._emb, image_pe=self._pe, sparse_prompt_embeddings=sparse,
                               dense_prompt_embeddings=dense, multimask_output=True)

    def close(self) -> None:
        model = self.model
        if model is not None and getattr(self, "_plain_encoder", None) is not None:
            model.image_encoder = self._plain_encoder
            self._plain_encoder = None
        self.model = self._encoder = self._predictor = self._emb = self._pe = self._x = None
        self._prompts = {}
        if model is not None and self._release is not None:
            self._release(model)


def _ort_dtype(type_name: str):
    return {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
            "tensor(int64)": np.int64, "tensor(int32)": np.int32}.get(type_name, np.float32)


def ort_session_options(device: str, intra_op_threads: int | None = None):
    """The options the runtime uses, so the bench times what users run."""
    from .runtime.session import session_options

    return session_options(device, intra_op_threads)


def choose_graphs(manifest: dict, precision: str) -> dict[str, tuple[str, str]]:
    """{'encoder': (precision, path), 'decoder_lowres' or 'decoder': ...} as the runtime picks them."""
    graphs = manifest.get("graphs") or {}
    enc = graphs.get("encoder") or {}
    if precision not in enc:
        raise PeftExportError(f"precision: the export has no {precision} encoder (has: {', '.join(sorted(enc)) or 'none'})")
    chosen = {"encoder": (precision, enc[precision]["path"])}
    for name in ("decoder_lowres", "decoder"):
        variants = graphs.get(name) or {}
        prec = precision if precision in variants else "fp32"
        if prec in variants:
            chosen[name] = (prec, variants[prec]["path"])
            break
    if len(chosen) < 2:
        raise PeftExportError("manifest.json lists no fp32 decoder graph")
    return chosen


class OrtRunner(Runner):
    """ONNX graphs of an export dir in ONNX Runtime; IO binding on CUDA."""

    def __init__(self, spec: CaseSpec, export_dir: str | Path, inputs: BenchInputs,
                 intra_op_threads: int | None = None, end_to_end: bool = True) -> None:
        self.spec, self.inputs = spec, inputs
        self.export_dir = Path(export_dir)
        self.intra_op_threads = intra_op_threads
        self._want_e2e = end_to_end
        self.sessions: dict = {}

    def prepare(self) -> None:
        import onnxruntime as ort

        from .runtime.session import SamSession, read_manifest

        self._ort = ort
        manifest = read_manifest(self.export_dir)
        self.chosen = choose_graphs(manifest, self.spec.precision)
        prov = self.spec.provider
        providers = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                     "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]}[prov]
        opts = ort_session_options(self.spec.device, self.intra_op_threads)
        for name, (_, rel) in self.chosen.items():
            sess = ort.InferenceSession(str(self.export_dir / rel), sess_options=opts, providers=providers)
            if sess.get_providers()[0] != providers[0]:
                raise PeftExportError(f"{rel}: onnxruntime could not start {providers[0]}")
            self.sessions[name] = sess
        self.decoder_name = "decoder_lowres" if "decoder_lowres" in self.sessions else "decoder"
        self._on_device = self.spec.device == "cuda"
        self._embedding = None
        self._bindings: dict = {}
        self._feeds: dict = {}
        self.session = None
        if self._want_e2e and prov in ("cpu", "cuda"):
            self.session = SamSession(self.export_dir, "onnxruntime", self.spec.device, self.spec.precision,
                                      intra_op_threads=self.intra_op_threads)

    def ready(self, component: str) -> None:
        if component.startswith("decoder") and self._embedding is None:
            enc = self.sessions["encoder"]
            out = enc.run(None, self._cast(enc, {enc.get_inputs()[0].name: self.inputs.encoder_input}))
            self._embedding = np.asarray(out[0], np.float32)

    @staticmethod
    def _cast(sess, feeds: dict) -> dict:
        types = {i.name: i.type for i in sess.get_inputs()}
        return {k: np.ascontiguousarray(v, dtype=_ort_dtype(types.get(k, "tensor(float)"))) for k, v in feeds.items()}

    def _decoder_feeds(self, component: str) -> list[dict]:
        coords, labels = self.inputs.decoder_prompts(component)
        k, s = len(coords), 4 * (self.inputs.image_size // 16)
        if self.decoder_name == "decoder_lowres":
            return [{"image_embeddings": self._embedding, "point_coords": coords, "point_labels": labels,
                     "mask_input": np.zeros((k, 1, s, s), np.float32), "has_mask_input": np.zeros((k,), np.float32)}]
        # Meta's graph takes one prompt set per call, as the runtime does.
        size = np.asarray([self.inputs.image_size * 3 // 4, self.inputs.image_size], np.float32)
        return [{"image_embeddings": self._embedding, "point_coords": coords[i:i + 1], "point_labels": labels[i:i + 1],
                 "mask_input": np.zeros((1, 1, s, s), np.float32), "has_mask_input": np.zeros((1,), np.float32),
                 "orig_im_size": size} for i in range(k)]

    def _binding(self, name: str, feeds: dict):
        sess = self.sessions[name]
        io = sess.io_binding()
        keep = []
        for k, v in self._cast(sess, feeds).items():
            ov = self._ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0)
            keep.append(ov)
            io.bind_ortvalue_input(k, ov)
        for o in sess.get_outputs():
            io.bind_output(o.name, "cuda", 0)
        return io, keep

    def run(self, component: str) -> None:
        if component == "end_to_end":
            if self.session is None:
                raise PeftExportError("end to end runs through SamSession, which has no TensorRT-provider mode")
            self.session.set_image(self.inputs.image)
            self.session.predict(box=self.inputs.image_box, multimask_output=False)
            return
        if component == "encoder":
            name, feed_list = "encoder", [{self.sessions["encoder"].get_inputs()[0].name: self.inputs.encoder_input}]
        else:
            name = self.decoder_name
            if component not in self._feeds:
                self._feeds[component] = self._decoder_feeds(component)
            feed_list = self._feeds[component]
        sess = self.sessions[name]
        if not self._on_device:
            key = (component, "host")
            if key not in self._bindings:
                self._bindings[key] = [self._cast(sess, f) for f in feed_list]
            for f in self._bindings[key]:
                sess.run(None, f)
            return
        if component not in self._bindings:
            self._bindings[component] = [self._binding(name, f) for f in feed_list]
        for io, _ in self._bindings[component]:
            sess.run_with_iobinding(io)
            if hasattr(io, "synchronize_outputs"):
                io.synchronize_outputs()

    def close(self) -> None:
        self.sessions = {}
        self._bindings = {}
        self._feeds = {}
        self.session = None

    def describe(self) -> dict:
        return {"graphs": {k: {"precision": p, "path": path} for k, (p, path) in self.chosen.items()},
                "providers": list(self.sessions["encoder"].get_providers()) if self.sessions else None}


class TensorRTRunner(Runner):
    """Native TensorRT engines through the runtime (written against TensorRT 10; not run on this project's machines)."""

    def __init__(self, spec: CaseSpec, export_dir: str | Path, inputs: BenchInputs) -> None:
        self.spec, self.inputs, self.export_dir = spec, inputs, Path(export_dir)

    def prepare(self) -> None:
        from .runtime.session import SamSession

        self.session = SamSession(self.export_dir, "tensorrt", "cuda", self.spec.precision)
        self._backend = self.session._backend
        self._decoder = "decoder_lowres" if "decoder_lowres" in self.session.describe()["graphs"] else "decoder"
        self.session.set_image(self.inputs.image)
        self._embedding = self.session.get_image_embedding()

    def run(self, component: str) -> None:
        if component == "end_to_end":
            self.session.set_image(self.inputs.image)
            self.session.predict(box=self.inputs.image_box, multimask_output=False)
        elif component == "encoder":
            self._backend.run("encoder", {"image": self.inputs.encoder_input})
        else:
            coords, labels = self.inputs.decoder_prompts(component)
            k, s = len(coords), 4 * (self.inputs.image_size // 16)
            self._backend.run(self._decoder, {
                "image_embeddings": self._embedding, "point_coords": coords, "point_labels": labels,
                "mask_input": np.zeros((k, 1, s, s), np.float32), "has_mask_input": np.zeros((k,), np.float32)})

    def close(self) -> None:
        self.session = self._backend = None


# ---- timing and memory ------------------------------------------------------------------------


def _torch_cuda():
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return torch


def _device_used_mb() -> float | None:
    torch = _torch_cuda()
    if torch is None:
        return None
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 1024**2


class _Memory:
    """Working memory of one call, measured the way that fits the case's device and backend."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.kind = ("rss" if runner.spec.device == "cpu"
                     else "cuda_allocated" if isinstance(runner, TorchRunner) else "cuda_device_used")

    def resident_start(self) -> float | None:
        if self.kind == "rss":
            gc.collect()
            return current_rss_mb()
        torch = _torch_cuda()
        if torch is None:
            return None
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated() / 1024**2 if self.kind == "cuda_allocated" else _device_used_mb()

    @contextlib.contextmanager
    def call(self, out: list):
        if self.kind == "rss":
            with RssSampler() as s:
                yield
            out.append(s.delta_mb)
            return
        torch = _torch_cuda()
        if torch is None:
            yield
            return
        torch.cuda.synchronize()
        if self.kind == "cuda_allocated":
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            yield
            torch.cuda.synchronize()
            out.append(max(0.0, (torch.cuda.max_memory_allocated() - before) / 1024**2))
        else:
            before = _device_used_mb()
            yield
            torch.cuda.synchronize()
            out.append(max(0.0, _device_used_mb() - before))


def time_call(runner: Runner, component: str) -> float:
    """Seconds of one synchronised call; CUDA events for torch on CUDA."""
    if runner.uses_cuda_events:
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        runner.run(component)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    t0 = time.perf_counter()
    runner.run(component)
    return time.perf_counter() - t0


@dataclass
class _CaseState:
    runner: Runner
    memory: _Memory
    resident_mb: float | None = None
    times: dict = field(default_factory=dict)
    working: dict = field(default_factory=dict)
    error: str | None = None
    failed_component: str | None = None


def _prepare(state: _CaseState, log: Callable[[str], None]) -> None:
    log(f"loading {state.runner.spec.name}")
    before = state.memory.resident_start()
    state.runner.prepare()
    after = state.memory.resident_start()
    if before is not None and after is not None:
        state.resident_mb = max(0.0, after - before)


def _warm(state: _CaseState, component: str, warmup: int) -> None:
    state.runner.ready(component)
    mem = state.working.setdefault(component, [])
    for _ in range(warmup):
        with state.memory.call(mem):
            state.runner.run(component)


def _timed(state: _CaseState, component: str, warmup: int) -> None:
    times = state.times.setdefault(component, [])
    if warmup == 0 and not times:  # no warm-up: memory comes from the first timed call
        mem = state.working.setdefault(component, [])
        with state.memory.call(mem):
            times.append(time_call(state.runner, component))
    else:
        times.append(time_call(state.runner, component))


def _fail(state: _CaseState, component: str | None, exc: BaseException) -> None:
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        raise exc
    state.error = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]
    state.failed_component = component


def measure(
    runners: Sequence[Runner],
    components: Sequence[str],
    warmup: int = 1,
    iterations: int = 10,
    interleave: bool = False,
    log: Callable[[str], None] = lambda msg: None,
) -> list[dict]:
    """Time every runner on every component; one result dict per runner.

    ``interleave=False``: one case at a time, loaded and released in turn (clean
    memory figures). ``interleave=True``: every case is loaded, then each timed
    iteration runs the cases in turn (A B C A B C ...), so slow drift of the machine
    (thermal, other load) hits all cases alike; needs memory for all cases at once.
    A case that raises is recorded as failed with the error, and the others go on.
    """
    if warmup < 0 or iterations < 1:
        raise PeftExportError("--warmup must be >= 0 and --iterations >= 1")
    states = [_CaseState(r, _Memory(r)) for r in runners]
    if not interleave:
        for st in states:
            comp = None
            try:
                _prepare(st, log)
                for comp in components:
                    log(f"timing {st.runner.spec.name}: {comp}")
                    _warm(st, comp, warmup)
                    for _ in range(iterations):
                        _timed(st, comp, warmup)
            except BaseException as exc:  # noqa: BLE001 - recorded, the run goes on
                _fail(st, comp, exc)
            finally:
                st.runner.close()
                gc.collect()
    else:
        for st in states:
            try:
                _prepare(st, log)
            except BaseException as exc:  # noqa: BLE001
                _fail(st, None, exc)
        for comp in components:
            live = [st for st in states if st.error is None]
            log(f"timing {comp}: {len(live)} cases interleaved")
            for st in live:
                try:
                    _warm(st, comp, warmup)
                except BaseException as exc:  # noqa: BLE001
                    _fail(st, comp, exc)
            for it in range(iterations):
                live = [st for st in states if st.error is None]
                for st in live:
                    try:
                        _timed(st, comp, warmup)
                    except BaseException as exc:  # noqa: BLE001
                        _fail(st, comp, exc)
        for st in states:
            st.runner.close()
        gc.collect()
    return [_result(st) for st in states]


def _result(st: _CaseState) -> dict:
    spec = st.runner.spec
    entry = {**_spec_fields(spec), "status": "ok" if st.error is None else "failed",
             "reason": st.error, "failed_component": st.failed_component,
             "memory_kind": st.memory.kind, "resident_mb": _round(st.resident_mb), "components": {}}
    try:
        entry["details"] = st.runner.describe()
    except Exception:  # describe is informative only
        entry["details"] = {}
    for comp, times in st.times.items():
        if not times or (st.error is not None and comp == st.failed_component):
            continue
        stats = summarize_timings(times, batch_size=component_batch(comp))
        stats["throughput_unit"] = "prompts/s" if comp.startswith("decoder") else "images/s"
        stats["times_ms"] = [round(t * 1000.0, 4) for t in times]
        work = st.working.get(comp) or []
        stats["working_mb"] = _round(max(work)) if work else None
        parts = [v for v in (st.resident_mb, stats["working_mb"]) if v is not None]
        stats["peak_mb"] = _round(sum(parts)) if parts else None
        entry["components"][comp] = stats
    return entry


def _round(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(float(x), nd)


# ---- aggregation ----------------------------------------------------------------------------


def pick_reference(cases: Sequence[dict]) -> str | None:
    """The case every ratio is against: base torch fp32, else the first case that ran."""
    ok = [c for c in cases if c.get("status") == "ok" and c.get("components")]
    for c in ok:
        if c["model"] == "base" and c["backend"] == "torch" and c["precision"] == "fp32":
            return c["case"]
    return ok[0]["case"] if ok else None


def add_ratios(cases: list[dict], reference: str | None) -> list[dict]:
    """Set ``ratio_vs_reference`` (median / reference median, same component) on every timed component."""
    ref = next((c for c in cases if c["case"] == reference), None)
    for c in cases:
        for comp, stats in c.get("components", {}).items():
            base = (ref or {}).get("components", {}).get(comp)
            if base and base.get("median_ms"):
                stats["ratio_vs_reference"] = round(stats["median_ms"] / base["median_ms"], 4)
            else:
                stats["ratio_vs_reference"] = None
    return cases


def ratio(cases: Sequence[dict], numerator: str, denominator: str, component: str = "encoder") -> float | None:
    """median(numerator) / median(denominator) for one component; None if either is missing."""
    by = {c["case"]: c for c in cases}
    try:
        a = by[numerator]["components"][component]["median_ms"]
        b = by[denominator]["components"][component]["median_ms"]
    except KeyError:
        return None
    return a / b if b else None


def table_rows(result: dict, run_label: str | None = None) -> list[dict]:
    """One row per (case, component) that ran; skipped/failed cases one row each with the reason."""
    rows = []
    for c in result.get("cases", []):
        if c["status"] != "ok":
            rows.append({"run": run_label, "case": c["case"], "component": "-", "status": c["status"],
                         "reason": c.get("reason")})
            continue
        for comp, s in c["components"].items():
            rows.append({"run": run_label, "case": c["case"], "component": comp, "status": "ok",
                         "median_ms": s["median_ms"], "p90_ms": s["p90_ms"], "p99_ms": s["p99_ms"],
                         "throughput": s["throughput_per_s"], "unit": s.get("throughput_unit", "images/s"),
                         "peak_mb": s.get("peak_mb"), "ratio": s.get("ratio_vs_reference")})
    return rows


def _fmt(x: Any, nd: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isinf(x):
            return "inf"
        return f"{x:.{nd}f}" if abs(x) < 1e5 else f"{x:.3g}"
    return str(x)


_COLUMNS = ("case", "component", "median ms", "p90 ms", "p99 ms", "throughput /s", "peak MB", "ratio")


def _cells(row: dict, with_run: bool) -> list[str]:
    if row["status"] != "ok":
        cells = [row["case"], "-", f"{row['status']}: {row.get('reason') or ''}", "", "", "", "", ""]
    else:
        cells = [row["case"], row["component"], _fmt(row["median_ms"]), _fmt(row["p90_ms"]), _fmt(row["p99_ms"]),
                 f"{_fmt(row['throughput'])} {'prompts' if row['unit'] == 'prompts/s' else 'img'}",
                 _fmt(row["peak_mb"], 0), _fmt(row["ratio"], 3)]
    return ([row.get("run") or ""] if with_run else []) + cells


def format_rows(rows: Sequence[dict], markdown: bool = False, with_run: bool = False) -> str:
    header = (["run"] if with_run else []) + list(_COLUMNS)
    body = [_cells(r, with_run) for r in rows]
    if markdown:
        esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(esc(c) for c in cells) + " |" for cells in body]
        return "\n".join(lines)
    ok_body = [c for c, r in zip(body, rows) if r["status"] == "ok"]
    widths = [max([len(h)] + [len(c[i]) for c in ok_body]) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    for cells, r in zip(body, rows):
        if r["status"] == "ok":
            lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())
    for r in rows:
        if r["status"] != "ok":
            prefix = f"[{r['run']}] " if with_run and r.get("run") else ""
            lines.append(f"{r['status']}: {prefix}{r['case']} -- {r.get('reason')}")
    return "\n".join(lines)


def describe_machine(result: dict) -> str:
    dev = result.get("machine", {})
    gpu = dev.get("gpu")
    cpu = f"{dev.get('cpu')} ({dev.get('cpu_count_usable')} cores usable, {dev.get('ram_gb')} GB RAM)"
    if gpu and result.get("settings", {}).get("device") == "cuda":
        return (f"{gpu.get('name')} (driver {gpu.get('driver_version')}, CUDA {gpu.get('cuda_version')}); host {cpu}")
    return cpu


def format_table(result: dict, markdown: bool = False) -> str:
    """The printed / markdown table of one bench result, with a header naming machine and settings."""
    st = result.get("settings", {})
    ver = result.get("versions", {})
    head = (f"peftexport bench {result.get('date', '')} -- {describe_machine(result)}\n"
            f"model {st.get('model_type')} at {st.get('image_size')}px, device {st.get('device')}, "
            f"warm-up {st.get('warmup')}, iterations {st.get('iterations')}"
            f"{', interleaved' if st.get('interleave') else ''}; ratio = median / median of "
            f"'{result.get('reference')}'; "
            + ", ".join(f"{k} {v}" for k, v in ver.items() if v))
    table = format_rows(table_rows(result), markdown=markdown)
    if markdown:
        return f"{head}\n\n{table}\n"
    return f"{head}\n{table}"


def _run_label(result: dict, path: str | Path) -> str:
    dev = result.get("machine", {})
    gpu = dev.get("gpu") if result.get("settings", {}).get("device") == "cuda" else None
    where = gpu.get("name") if gpu else f"{dev.get('cpu', '?')} x{dev.get('cpu_count_usable', '?')}"
    return f"{Path(path).stem} ({where})"


def read_result(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PeftExportError(f"{path}: file not found") from None
    except (OSError, ValueError) as exc:
        raise PeftExportError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != BENCH_FORMAT:
        raise PeftExportError(f"{path}: not a peftexport bench result (format is not '{BENCH_FORMAT}')")
    if data.get("format_version", 0) > BENCH_FORMAT_VERSION:
        raise PeftExportError(f"{path}: bench format {data['format_version']} is newer than this peftexport; upgrade")
    return data


def compare_results(paths: Sequence[str | Path], markdown: bool = False) -> str:
    """One table across several bench JSON files (runs / machines); each row names its run."""
    if not paths:
        raise PeftExportError("bench-compare: give at least one bench JSON file")
    rows, notes = [], []
    for p in paths:
        res = read_result(p)
        label = _run_label(res, p)
        st = res.get("settings", {})
        notes.append(f"{label}: {res.get('date', '?')}, {describe_machine(res)}, {st.get('model_type')} at "
                     f"{st.get('image_size')}px, device {st.get('device')}, ratio vs '{res.get('reference')}'")
        rows.extend(table_rows(res, run_label=label))
    head = "\n".join(("- " if markdown else "") + n for n in notes)
    return f"{head}\n\n{format_rows(rows, markdown=markdown, with_run=True)}\n"


def write_text(path: str | Path, text: str, overwrite: bool = True) -> Path:
    with atomic_file(path, overwrite=overwrite) as tmp:
        Path(tmp).write_text(text)
    return Path(path)


def write_json(path: str | Path, result: dict, overwrite: bool = True) -> Path:
    return write_text(path, json.dumps(result, indent=2, default=str) + "\n", overwrite)


def write_plot(path: str | Path, result: dict, overwrite: bool = True) -> Path:
    """Horizontal bars of median latency per case, one panel per component (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [c for c in result.get("cases", []) if c["status"] == "ok" and c["components"]]
    comps: list[str] = []
    for c in ok:
        comps += [k for k in c["components"] if k not in comps]
    if not comps:
        raise PeftExportError(f"{path}: nothing was timed, no plot to draw")
    n_cases = max(len(ok), 1)
    fig, axes = plt.subplots(len(comps), 1, figsize=(9, 1.0 + len(comps) * (0.9 + 0.32 * n_cases)), squeeze=False)
    for ax, comp in zip(axes[:, 0], comps):
        names = [c["case"] for c in ok if comp in c["components"]]
        med = [c["components"][comp]["median_ms"] for c in ok if comp in c["components"]]
        p90 = [c["components"][comp]["p90_ms"] for c in ok if comp in c["components"]]
        y = np.arange(len(names))
        colors = ["tab:gray" if n == result.get("reference") else "tab:blue" for n in names]
        ax.barh(y, med, color=colors, xerr=[np.zeros(len(med)), np.maximum(np.subtract(p90, med), 0)], capsize=2)
        ax.set_yticks(y)
        ax.set_yticklabels(names, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(comp, fontsize=9, loc="left")
        ax.set_xlabel("median latency, ms (error bar to p90)", fontsize=8)
        for yi, m in zip(y, med):
            ax.text(m, yi, f" {m:.1f}", va="center", fontsize=7)
    st = result.get("settings", {})
    fig.suptitle(f"{st.get('model_type')} {st.get('image_size')}px on {describe_machine(result)}", fontsize=9)
    fig.tight_layout()
    with atomic_file(path, overwrite=overwrite) as tmp:
        fig.savefig(str(tmp), dpi=110, format="png")
    plt.close(fig)
    return Path(path)


# ---- the command ----------------------------------------------------------------------------


def _export_precisions(manifest: dict) -> list[str]:
    return [p for p in EXPORT_PRECISIONS if p in (manifest.get("graphs", {}).get("encoder") or {})]


def _engine_precisions(manifest: dict) -> list[str]:
    engines = (manifest.get("tensorrt") or {}).get("engines") or {}
    enc = engines.get("encoder")
    if enc is None:
        return []
    if isinstance(enc, dict) and "path" not in enc:
        return [p for p in enc if p in EXPORT_PRECISIONS]
    return [str(enc.get("precision", "fp16")) if isinstance(enc, dict) else "fp16"]


def adapter_from_manifest(manifest: dict):
    """The adapter recorded as an export's source, if it is still there and loads; else (None, reason)."""
    src = manifest.get("source")
    path = None
    if isinstance(src, dict):
        path = src.get("adapter") or src.get("path")
    elif isinstance(src, str):
        path = src
    path = path or manifest.get("adapter")
    if not path:
        return None, "the manifest records no adapter source; give --adapter RUN for torch cases"
    if not Path(path).exists():
        return None, f"the manifest's adapter source {path} is not on this machine"
    try:
        from .adapters import load_model_source

        if Path(path).is_file() and Path(path).suffix in (".pt", ".pth"):
            return load_model_source(merged=path), None
        return load_model_source(adapter=path), None
    except PeftExportError as exc:
        return None, f"the manifest's adapter source does not load ({exc})"


def run_bench(
    export_dir: str | Path | None = None,
    adapted: Any = None,
    backends: Sequence[str] = BACKENDS,
    device: str = "cpu",
    precisions: Sequence[str] | None = None,
    batch_sizes: Sequence[int] = (16,),
    warmup: int = 1,
    iterations: int = 10,
    components: Sequence[str] = DEFAULT_COMPONENTS,
    include_base: bool = True,
    interleave: bool = False,
    export_formats: Sequence[str] | None = None,
    intra_op_threads: int | None = None,
    seed: int = 0,
    log: Callable[[str], None] = lambda msg: None,
) -> dict:
    """Benchmark every available case of one model; returns the full result (JSON-able).

    Give ``export_dir`` (ONNX cases; torch cases too if its manifest records a
    loadable adapter), ``adapted`` (an ``AdaptedModel``: torch cases; ONNX cases from
    ``export_dir`` if given, else from a temporary export made here when
    ``backends`` has onnxruntime), or both.
    """
    backends = list(backends)
    for b in backends:
        if b not in BACKENDS:
            raise PeftExportError(f"--backend: unknown '{b}' (use {', '.join(BACKENDS)})")
    for p in precisions or []:
        if p not in TORCH_PRECISIONS + EXPORT_PRECISIONS:
            raise PeftExportError(f"--precision: unknown '{p}' (use fp32, bf16, fp16, int8)")
    batch_sizes = tuple(int(b) for b in batch_sizes)
    if any(b < 1 for b in batch_sizes):
        raise PeftExportError("--batch-size: must be >= 1")
    if export_dir is None and adapted is None:
        raise PeftExportError("give an EXPORT_DIR or --adapter RUN")
    comps = expand_components(components, batch_sizes)
    available = detect_availability()
    notes: list[str] = []

    manifest = None
    if export_dir is not None:
        from .runtime.session import read_manifest

        manifest = read_manifest(export_dir)
        if adapted is None and ({"torch", "torch-compile"} & set(backends)):
            adapted, why = adapter_from_manifest(manifest)
            if why:
                notes.append(why)

    with contextlib.ExitStack() as stack:
        no_export_reason = None
        if "onnxruntime" in backends and manifest is None:
            if not available.onnxruntime:
                no_export_reason = "onnxruntime is not installed (pip install 'peftexport[cpu]' or '[gpu]')"
            else:
                tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="peftexport-bench-")))
                export_dir = tmp / "export"
                log("exporting a temporary ONNX model (merge_and_export)")
                try:
                    manifest = _temporary_export(adapted, export_dir, precisions, device, export_formats)
                except PeftExportError as exc:
                    no_export_reason = f"temporary export failed: {exc}"
        image_size = int(manifest["image_size"]) if manifest else int(adapted.base.image_size)
        model_type = (manifest or {}).get("model_type") or (adapted.base.model_type if adapted else None)

        torch_models: list[str] = []
        unmergeable = None
        if adapted is not None and available.torch:
            if adapted.config is None:
                torch_models = ["merged"]  # a plain / merged checkpoint is its own merged model
            else:
                from .peft import has_unmergeable_layers

                torch_models = (["base"] if include_base else []) + ["unmerged", "merged"]
                if has_unmergeable_layers(adapted.model):
                    unmergeable = f"{adapted.config.method} cannot be merged (non-linear branch); only unmerged is timed"
        specs, skipped = plan_cases(
            backends, device, precisions, available, torch_models, unmergeable,
            _export_precisions(manifest) if manifest else [],
            _engine_precisions(manifest) if manifest else [], no_export_reason)
        inputs = BenchInputs(image_size, batch_sizes, seed)
        runners = [_make_runner(s, adapted, export_dir, inputs, intra_op_threads, comps) for s in specs]
        t0 = time.time()
        results = measure(runners, comps, warmup, iterations, interleave, log)
        elapsed = time.time() - t0

    cases = results + skipped
    reference = pick_reference(cases)
    add_ratios(cases, reference)
    return {
        "format": BENCH_FORMAT,
        "format_version": BENCH_FORMAT_VERSION,
        "peftexport_version": __version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": device_info(),
        "versions": library_versions(),
        "settings": {
            "device": device, "backends": backends, "precisions": list(precisions) if precisions else None,
            "batch_sizes": list(batch_sizes), "warmup": warmup, "iterations": iterations, "components": comps,
            "interleave": interleave, "image_size": image_size, "model_type": model_type,
            "input_image_shape": list(inputs.image.shape), "seed": seed,
            "export_dir": str(export_dir) if export_dir and manifest and "peftexport-bench-" not in str(export_dir) else None,
            "temporary_export": bool(export_dir and "peftexport-bench-" in str(export_dir)),
            "source": getattr(adapted, "source", None) if adapted is not None else None,
            "peft": adapted.config.to_dict() if adapted is not None and adapted.config is not None else None,
            "base": adapted.base.to_dict() if adapted is not None else None,
        },
        "notes": notes,
        "reference": reference,
        "elapsed_s": round(elapsed, 1),
        "cases": cases,
    }


def _temporary_export(adapted, out_dir: Path, precisions, device: str, formats) -> dict:
    try:
        from .export import merge_and_export
    except ImportError as exc:
        raise PeftExportError(f"the export module cannot be imported ({exc})") from None
    from .runtime.session import read_manifest

    default = ["fp32", "int8"] if device == "cpu" else ["fp32", "fp16"]
    wanted = [p for p in (precisions or default) if p in EXPORT_PRECISIONS] or ["fp32"]
    if "fp32" not in wanted:
        wanted = ["fp32"] + wanted  # the runtime's decoder is fp32
    kwargs: dict = {"precisions": wanted, "progress": False}
    if formats is not None:
        kwargs["formats"] = list(formats)
    merge_and_export(adapted, out_dir, **kwargs)
    return read_manifest(out_dir)


def _make_runner(spec: CaseSpec, adapted, export_dir, inputs: BenchInputs, threads, comps) -> Runner:
    if spec.backend in ("torch", "torch-compile"):
        factory, release = _torch_factory(spec.model, adapted, spec.device)
        return TorchRunner(spec, factory, inputs, release)
    if spec.backend == "onnxruntime":
        return OrtRunner(spec, export_dir, inputs, threads, end_to_end="end_to_end" in comps)
    return TensorRTRunner(spec, export_dir, inputs)


def _torch_factory(model: str, adapted, device: str):
    """(factory, release) for a torch case; the adapter model itself is lent and moved back after."""
    if model == "base":
        from .models import load_sam

        b = adapted.base
        return (lambda: load_sam(b.model_type, b.checkpoint, b.image_size, seed=b.seed, warn_random=False)[0]), None
    if model == "unmerged" or adapted.config is None:
        return (lambda: adapted.model), (lambda m: m.to("cpu"))
    from .peft import merge_peft

    return (lambda: merge_peft(adapted.model)), None


def run_and_write(
    json_out: str | Path | None = None,
    markdown_out: str | Path | None = None,
    plot_out: str | Path | None = None,
    overwrite: bool = False,
    **kwargs: Any,
) -> dict:
    """``run_bench`` then write the requested outputs (each atomically); checks the paths first."""
    from .fsutil import check_can_write

    for p in (json_out, markdown_out, plot_out):
        if p is not None:
            check_can_write(p, overwrite)
    result = run_bench(**kwargs)
    if json_out is not None:
        write_json(json_out, result, overwrite)
    if markdown_out is not None:
        write_text(markdown_out, format_table(result, markdown=True), overwrite)
    if plot_out is not None and any(c["status"] == "ok" and c["components"] for c in result["cases"]):
        write_plot(plot_out, result, overwrite)
    return result
