"""Runners: load one case and make one synchronised call of a component (torch, ONNX Runtime, TensorRT)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import PeftExportError
from .cases import BenchInputs, CaseSpec
from .family import SPLIT_GRAPHS, BoundFamily, HostFamily, decoders_used, has_family, meta_graph, ort_run, pick


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
                 release: Callable[[Any], None] | None = None, instance_decoder: Any = None) -> None:
        self.spec, self.inputs = spec, inputs
        self._factory, self._release = model_factory, release
        self.instance_decoder = instance_decoder  # micro-sam's AIS decoder, for the "ais" component
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
        if self.instance_decoder is not None:
            self.instance_decoder = self.instance_decoder.to(dev).eval()

    def ready(self, component: str) -> None:
        import torch

        if (component.startswith("decoder") or component == "ais") and self._emb is None:
            with torch.inference_mode(), self._autocast():
                self._emb = self.model.image_encoder(self._x)
                self._pe = self.model.prompt_encoder.get_dense_pe()
        if component.startswith("decoder"):
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
            elif component == "ais":
                from .ais import torch_ais

                torch_ais(self.instance_decoder, self._emb)
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


def ort_session_options(device: str, intra_op_threads: int | None = None, graph: str = ""):
    """The options the runtime uses for ``graph``, so the bench times what users run."""
    from ..runtime.backends.ort import session_options

    return session_options(device, intra_op_threads, graph)


def choose_graphs(manifest: dict, precision: str) -> dict[str, tuple[str, str]]:
    """{'encoder': (precision, path), then the decoders the runtime runs prompts through: the family
    ('split_image', 'split_prompts', 'split_masks') when the export has it, else 'decoder_lowres' or
    'decoder'}, each at the precision the runtime picks."""
    graphs = manifest.get("graphs") or {}
    enc = graphs.get("encoder") or {}
    if precision not in enc:
        raise PeftExportError(f"precision: the export has no {precision} encoder (has: {', '.join(sorted(enc)) or 'none'})")
    chosen = {"encoder": (precision, enc[precision]["path"])}
    meta = next((n for n in ("decoder_lowres", "decoder") if pick(graphs.get(n) or {}, precision)), None)
    for name in SPLIT_GRAPHS if has_family(graphs) else ((meta,) if meta else ()):
        variants = graphs[name]
        prec = pick(variants, precision)
        chosen[name] = (prec, variants[prec]["path"])
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

        from ..runtime import SamSession, read_manifest

        self._ort = ort
        manifest = read_manifest(self.export_dir)
        self.chosen = choose_graphs(manifest, self.spec.precision)
        prov = self.spec.provider
        providers = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                     "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]}[prov]
        opts = ort_session_options(self.spec.device, self.intra_op_threads)
        for name, (_, rel) in self.chosen.items():
            sess = ort.InferenceSession(str(self.export_dir / rel), providers=providers,
                                        sess_options=ort_session_options(self.spec.device, self.intra_op_threads, name))
            if sess.get_providers()[0] != providers[0]:
                raise PeftExportError(f"{rel}: onnxruntime could not start {providers[0]}")
            self.sessions[name] = sess
        self.decoder_name = meta_graph(self.sessions)  # exports without the family
        self._family = (HostFamily(ort_run(self.sessions), 4 * (self.inputs.image_size // 16))
                        if all(k in self.sessions for k in SPLIT_GRAPHS) else None)
        ais = (manifest.get("graphs") or {}).get("ais_decoder") or {}
        ais_prec = self.spec.precision if self.spec.precision in ais else "fp32"
        self._ais_session = (ort.InferenceSession(str(self.export_dir / ais[ais_prec]["path"]), sess_options=opts,
                                                  providers=providers) if ais_prec in ais else None)
        self._on_device = self.spec.device == "cuda"
        self._embedding = None
        self._bindings: dict = {}
        self._feeds: dict = {}
        self.session = None
        if self._want_e2e and prov in ("cpu", "cuda"):
            self.session = SamSession(self.export_dir, "onnxruntime", self.spec.device, self.spec.precision,
                                      intra_op_threads=self.intra_op_threads)

    def ready(self, component: str) -> None:
        if (component.startswith("decoder") or component == "ais") and self._embedding is None:
            enc = self.sessions["encoder"]
            out = enc.run(None, self._cast(enc, {enc.get_inputs()[0].name: self.inputs.encoder_input}))
            self._embedding = np.asarray(out[0], np.float32)
        if component.startswith("decoder") and self._family is not None:
            self._family.context(self._embedding)  # split_image: once per image, as the runtime does

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

    def _run_family(self, component: str) -> None:
        if component not in self._feeds:
            self._feeds[component] = self.inputs.decoder_prompts(component)
        coords, labels = self._feeds[component]
        if not self._on_device:
            self._family(self._embedding, coords, labels)
            return
        if component not in self._bindings:
            self._bindings[component] = BoundFamily(self._ort, self.sessions, self._family.context(self._embedding),
                                                    coords, labels, 4 * (self.inputs.image_size // 16))
        self._bindings[component]()

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
        if component == "ais":
            from .ais import ort_ais

            ort_ais(self._ais_session, self._embedding)
            return
        if component == "encoder":
            name, feed_list = "encoder", [{self.sessions["encoder"].get_inputs()[0].name: self.inputs.encoder_input}]
        elif self._family is not None:
            self._run_family(component)
            return
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
        self._family = None
        self._ais_session = None
        self._bindings = {}
        self._feeds = {}
        self.session = None

    def describe(self) -> dict:
        return {"graphs": {k: {"precision": p, "path": path} for k, (p, path) in self.chosen.items()},
                "decoder": decoders_used(SPLIT_GRAPHS[0] in self.chosen, getattr(self, "decoder_name", None)),
                "providers": list(self.sessions["encoder"].get_providers()) if self.sessions else None}


class RuntimeRunner(Runner):
    """The runtime's own backend (OpenVINO, native TensorRT) through ``SamSession``; encoder and decoders are
    timed on the backend's ``run``, end to end through the session (host copies included)."""

    def __init__(self, spec: CaseSpec, export_dir: str | Path, inputs: BenchInputs,
                 intra_op_threads: int | None = None) -> None:
        self.spec, self.inputs, self.export_dir = spec, inputs, Path(export_dir)
        self.intra_op_threads = intra_op_threads

    def prepare(self) -> None:
        from ..runtime import SamSession

        self.session = SamSession(self.export_dir, self.spec.backend, self.spec.device, self.spec.precision,
                                  intra_op_threads=self.intra_op_threads)
        self._backend = self.session._backend
        self.chosen = {k: (v["precision"], v["path"]) for k, v in self.session.describe()["graphs"].items()}
        self._decoder = meta_graph(self.chosen)  # engines: encoder + decoder_lowres, no family
        self._uses_family = has_family(self.session.manifest["graphs"]) and all(k in self.chosen for k in SPLIT_GRAPHS)
        self._family = HostFamily(self._backend.run, 4 * (self.inputs.image_size // 16)) if self._uses_family else None
        self._embedding = None

    def ready(self, component: str) -> None:
        if component.startswith("decoder") and self._embedding is None:
            out = self._backend.run("encoder", {"image": self.inputs.encoder_input})
            self._embedding = np.asarray(out["image_embeddings"], np.float32)
        if component.startswith("decoder") and self._family is not None:
            self._family.context(self._embedding)  # split_image: once per image, as the runtime does

    def run(self, component: str) -> None:
        if component == "end_to_end":
            self.session.set_image(self.inputs.image)
            self.session.predict(box=self.inputs.image_box, multimask_output=False)
        elif component == "encoder":
            self._backend.run("encoder", {"image": self.inputs.encoder_input})
        else:
            coords, labels = self.inputs.decoder_prompts(component)
            if self._family is not None:
                self._family(self._embedding, coords, labels)
                return
            k, s = len(coords), 4 * (self.inputs.image_size // 16)
            feeds = {"image_embeddings": self._embedding, "point_coords": coords, "point_labels": labels,
                     "mask_input": np.zeros((k, 1, s, s), np.float32), "has_mask_input": np.zeros((k,), np.float32)}
            if self._decoder == "decoder":  # Meta's graph: one prompt set per call
                size = np.asarray([self.inputs.image_size * 3 // 4, self.inputs.image_size], np.float32)
                for i in range(k):
                    self._backend.run("decoder", {**{n: v[i:i + 1] for n, v in feeds.items() if n != "image_embeddings"},
                                                  "image_embeddings": self._embedding, "orig_im_size": size})
                return
            self._backend.run(self._decoder, feeds)

    def close(self) -> None:
        self.session = self._backend = self._family = None

    def describe(self) -> dict:
        chosen = getattr(self, "chosen", {})
        return {"graphs": {k: {"precision": p, "path": path} for k, (p, path) in chosen.items()},
                "decoder": decoders_used(getattr(self, "_uses_family", False), getattr(self, "_decoder", None))}
