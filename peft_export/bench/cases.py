"""What to time: the cases (ways of running the model), which of them this machine can run, and the
seeded inputs every case shares."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from ..errors import PeftExportError

BENCH_FORMAT = "peftexport-bench"
BENCH_FORMAT_VERSION = 2  # 2: "reference" is per component, the fastest torch case (1: one case name)
BACKENDS = ("torch", "torch-compile", "onnxruntime", "openvino", "tensorrt")
TORCH_PRECISIONS = ("fp32", "bf16", "fp16")
EXPORT_PRECISIONS = ("fp32", "fp16", "int8", "bf16")  # bf16: the fp32 graphs in OpenVINO's bf16 mode
DEFAULT_COMPONENTS = ("encoder", "decoder_point", "decoder_box", "decoder_boxes", "end_to_end")
NO_BF16 = "this GPU has no native bf16 (torch.cuda.is_bf16_supported(including_emulation=False) is False)"
# Asked for by name only: "ais" = micro-sam's instance decoder + post-processing on a fixed embedding.
EXTRA_COMPONENTS = ("ais",)
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
    provider: str = ""  # onnxruntime: cpu / cuda / tensorrt; openvino: cpu
    note: str = ""
    label: str = ""  # a display name instead of the generated one (benchmark scripts)
    # "keep": the worker starts with glibc keeping freed memory (training.host_memory.GLIBC_TUNABLES_KEEP):
    # eager torch on the CPU without re-faulting its pages every call (MobileSAM: 1.8x faster on 2 cores)
    malloc: str = ""

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        backend = f"{self.backend}-{self.provider}" if self.provider else self.backend
        return f"{self.model} {backend} {self.precision}" + (" (freed memory kept)" if self.malloc == "keep" else "")


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
    cuda_bf16: bool = False  # the GPU computes bf16 natively (Ampere and later), not by emulation
    onnxruntime: bool = False
    ort_providers: tuple[str, ...] = ()
    tensorrt: bool = False
    openvino: bool = False
    openvino_bf16: str = "the openvino package is not installed"  # why OpenVINO cannot run bf16 here ("" when it can)
    torch: bool = True
    glibc: bool = False  # freed-memory setting possible (glibc's malloc)
    malloc_tuned: bool = False  # the environment already tunes malloc (GLIBC_TUNABLES / MALLOC_*): every case has it
    cxx: bool = False  # a C++ compiler: torch.compile's CPU backend (inductor) needs one


def detect_availability() -> Availability:
    av = Availability()
    av.torch = importlib.util.find_spec("torch") is not None
    if av.torch:
        try:
            import torch

            av.cuda = bool(torch.cuda.is_available())
            av.cuda_bf16 = av.cuda and bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except Exception:
            av.torch = False
    try:
        import onnxruntime as ort

        av.onnxruntime = True
        av.ort_providers = tuple(ort.get_available_providers())
    except Exception:
        pass
    av.tensorrt = importlib.util.find_spec("tensorrt") is not None
    av.openvino = importlib.util.find_spec("openvino") is not None
    if av.openvino:
        from ..runtime.backends.ov import native_bf16

        av.openvino_bf16 = native_bf16() or ""
    if av.torch:  # the malloc setting matters to torch cases only (and its module lives with training)
        from ..training.host_memory import _glibc, user_tuned_malloc

        av.glibc, av.malloc_tuned = _glibc() is not None, user_tuned_malloc()
    import os
    import shutil

    av.cxx = any(shutil.which(c) for c in (os.environ.get("CXX") or "g++", "c++", "clang++"))
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
    export_refused: dict[str, str] | None = None,
    fresh_process: bool = True,
) -> tuple[list[CaseSpec], list[dict]]:
    """Which cases run and which are skipped (with the reason), from what exists.

    ``torch_models``: the torch models on hand, in order (``base``, ``unmerged``,
    ``merged``). ``export_precisions``: encoder precisions in the export;
    ``engine_precisions``: precisions of native TensorRT encoder engines.
    ``precisions=None``: torch fp32 (+ bf16 on CUDA) and every exported precision.
    ``export_refused``: encoder precisions the export refused (precision -> its refusal line).

    torch is also timed at its best, so that no ratio flatters an export: on the CPU the last torch
    model once more with freed memory kept (``CaseSpec.malloc``; needs ``fresh_process``, since glibc
    reads its tunables at a process's start), and ``torch.compile`` wherever it runs (CUDA; the CPU
    with a C++ compiler).
    """
    export_refused = export_refused or {}
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
                elif device == "cuda" and p == "bf16" and not available.cuda_bf16:
                    skipped.append(skip_record(spec, NO_BF16))
                elif device == "cpu" and p == "fp16":
                    skipped.append(skip_record(spec, "fp16 torch is timed only on CUDA (CPU autocast fp16 is not a deployment path)"))
                else:
                    run.append(spec)
        runnable = [m for m in torch_models if not (m == "merged" and unmergeable_reason)]
        if device == "cpu" and "fp32" in torch_precisions and runnable:
            spec = CaseSpec(runnable[-1], "torch", "fp32", device, malloc="keep",
                            note="GLIBC_TUNABLES keeps freed memory: no page faults on reallocated tensors")
            if not available.glibc:
                skipped.append(skip_record(spec, "freed memory is kept through glibc's malloc, which this system lacks"))
            elif available.malloc_tuned:
                skipped.append(skip_record(spec, "the environment already tunes malloc (GLIBC_TUNABLES / MALLOC_*): "
                                                 "every torch case runs with it"))
            elif not fresh_process:
                skipped.append(skip_record(spec, "glibc reads GLIBC_TUNABLES when a process starts: timed only with "
                                                 "a fresh process per case (the default)"))
            else:
                run.append(spec)
    if "torch-compile" in backends and torch_models:
        model = "merged" if "merged" in torch_models else torch_models[-1]
        for p in torch_precisions:
            spec = CaseSpec(model, "torch-compile", p, device,
                            note="torch.compile(image_encoder), compiled in the untimed warm-up; decoder eager")
            if model == "merged" and unmergeable_reason:
                skipped.append(skip_record(spec, unmergeable_reason))
            elif device == "cuda" and p == "bf16" and not available.cuda_bf16:
                skipped.append(skip_record(spec, NO_BF16))
            elif device == "cpu" and not available.cxx:
                skipped.append(skip_record(spec, "torch.compile on the CPU needs a C++ compiler (g++ or clang++) "
                                                 "for its inductor backend; none was found"))
            elif device == "cuda" and p == "fp16":
                skipped.append(skip_record(spec, "torch.compile is timed in fp32 and bf16 only"))
            else:
                run.append(spec)
    if ("torch" in backends or "torch-compile" in backends) and not torch_models:
        skipped.append(skip_record(CaseSpec("adapter", "torch", "fp32", device),
                                   "no torch model: give --adapter RUN (or an export whose manifest records a loadable adapter)"))
    if "onnxruntime" in backends:
        wanted = [p for p in export_precisions if (asked is None or p in asked) and p != "bf16"]
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
                                               f"{p} was refused at export {_why(export_refused[p])}"
                                               if p in export_refused else f"the export has no {p} encoder graph"))
    if "openvino" in backends and not no_export_reason:
        for p in [p for p in export_precisions if asked is None or p in asked]:
            spec = CaseSpec("export", "openvino", p, device, provider="cpu")
            if device != "cpu":
                skipped.append(skip_record(spec, "OpenVINO is timed on the CPU only (--device cpu)"))
            elif not available.openvino:
                skipped.append(skip_record(spec, "the openvino package is not installed (pip install 'peftexport[openvino]')"))
            elif p == "bf16" and available.openvino_bf16:
                skipped.append(skip_record(spec, available.openvino_bf16))
            else:
                run.append(spec)
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
        elif c in DEFAULT_COMPONENTS + EXTRA_COMPONENTS:
            out.append(c)
        else:
            raise PeftExportError(f"--components: unknown '{c}' (use {', '.join(DEFAULT_COMPONENTS + EXTRA_COMPONENTS)})")
    return out




def _why(line: str) -> str:
    """``(prompt_mask_iou_mean 0.9899 < 0.99 on onnxruntime)`` from a manifest refusal line."""
    return line[line.index("("):] if "(" in line else "(failed its check)"
