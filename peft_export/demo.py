"""``peftexport demo``: the whole pipeline on built-in synthetic microscopy data.

make data -> finetune late LoRA (and micro-sam's instance decoder) -> merge (exactness
report) -> export ONNX fp32 + int8 (parity) -> bench (torch vs ONNX Runtime, merged vs
unmerged) -> evaluate (base vs finetuned vs exported) -> predict one image with an overlay
-> automatic instance segmentation (AIS) beside the point grid. Every step calls the
same library function as its own command, so the demo is also a smoke test of them.

May import: every stage (it runs them all).
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import PeftExportError
from .fsutil import atomic_file

# Settings that finish in a few minutes on a 2-core CPU (tiny) or show the real
# architecture at a CPU-friendly image size (vit_b at 512, much slower).
PRESETS = {
    "tiny": dict(image_size=256, data_size=256, n_train=10, n_test=3, iterations=40, lr=1e-3, rank=8,
                 objects=8, sub_iterations=0, val_objects=8, bench_iterations=20, eval_iterations=3, grid=16),
    "vit_b": dict(image_size=512, data_size=512, n_train=6, n_test=2, iterations=12, lr=1e-4, rank=32,
                  objects=8, sub_iterations=1, val_objects=4, bench_iterations=2, eval_iterations=2, grid=16),
}


@dataclass
class DemoResult:
    out_dir: Path
    artefacts: dict[str, str] = field(default_factory=dict)
    numbers: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"out_dir": str(self.out_dir), "artefacts": self.artefacts, "numbers": self.numbers,
                "seconds": self.seconds, "notes": self.notes}


def _step(result: DemoResult, name: str, log: Callable[[str], None]):
    class _Timer:
        def __enter__(self):
            log(f"\n== {name} ==")
            self.t0 = time.perf_counter()
            return self

        def __exit__(self, *exc):
            result.seconds[name] = round(time.perf_counter() - self.t0, 1)
            if exc[0] is None:
                log(f"   ({result.seconds[name]:.1f} s)")
            return False

    return _Timer()


def _largest_object_box(label: np.ndarray) -> list[float]:
    from .data.prompts import box_from_mask

    ids, counts = np.unique(label[label > 0], return_counts=True)
    return [float(v) for v in box_from_mask(label == ids[np.argmax(counts)])]


def run_demo(
    out_dir: str | Path = "peftexport_demo",
    model_type: str = "tiny",
    checkpoint: str | Path | None = None,
    overwrite: bool = False,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
    instances: bool = True,
) -> DemoResult:
    """Run every step into ``out_dir`` and return what was made and the key numbers.

    ``instances`` trains micro-sam's instance decoder with the adapter and adds the AIS step.
    """
    from .peft.adapters import load_adapter
    from .bench.run import run_and_write
    from .data import make_demo_data
    from .evaluation.report import evaluate_models
    from .export.pipeline import merge_and_export
    from .merge import merge_to_checkpoint
    from .predict.images import predict_images
    from .training import TrainConfig, finetune

    if model_type not in PRESETS:
        raise PeftExportError(f"--model {model_type!r}: the demo runs tiny or vit_b")
    p = PRESETS[model_type]
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise PeftExportError(f"{out}: directory exists and is not empty (pass --overwrite to replace it)")
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    result = DemoResult(out)
    if checkpoint is None:
        log(
            "!! No --checkpoint: the demo uses a RANDOMLY INITIALISED SAM. It shows the pipeline works; "
            "its masks and scores mean nothing. Pass a real SAM checkpoint for meaningful numbers. !!"
        )
    warnings.filterwarnings("ignore", message="no checkpoint given")

    with _step(result, "1. make synthetic data", log):
        train_pairs = make_demo_data(out / "data" / "train", n_images=p["n_train"], size=p["data_size"], seed=seed)
        test_pairs = make_demo_data(out / "data" / "test", n_images=p["n_test"], size=p["data_size"], seed=seed + 1000)
        result.artefacts["train data"] = str(out / "data" / "train")
        result.artefacts["test data"] = str(out / "data" / "test")
        log(f"   {len(train_pairs)} training and {len(test_pairs)} held-out image/label pairs")

    run_dir = out / "run"
    with _step(result, "2. finetune late LoRA", log):
        summary = finetune(TrainConfig(
            out=str(run_dir), data=str(out / "data" / "train"), val_fraction=0.2, patch_size=p["data_size"],
            model_type=model_type, checkpoint=str(checkpoint) if checkpoint else None, image_size=p["image_size"],
            peft="lora", blocks="late", rank=p["rank"], targets=("q", "k", "v", "mlp"),
            iterations=p["iterations"], lr=p["lr"], objects_per_image=p["objects"],
            sub_iterations=p["sub_iterations"], val_every=max(p["iterations"] // 4, 1), val_objects=p["val_objects"],
            seed=seed, progress=progress, instance_decoder=instances,
        ))
        result.artefacts["adapter"] = str(run_dir / "adapter.safetensors")
        result.artefacts["training curves"] = str(run_dir / "training.png")
        best = summary.get("best_validation") or {}
        for key in ("point", "box"):
            if key in best:
                result.numbers[f"val Dice {key} (best)"] = float(best[key])
        size_mb = (run_dir / "adapter.safetensors").stat().st_size / 1e6
        result.numbers["adapter size MB"] = round(size_mb, 2)
        log(f"   adapter {size_mb:.2f} MB; best validation {best}")

    adapted = load_adapter(run_dir, checkpoint=checkpoint)
    with _step(result, "3. merge (verified)", log):
        report = merge_to_checkpoint(adapted, out / "merged.pth")
        e = report["errors"]
        result.numbers["merge max rel error (embeddings)"] = e["embeddings"]["max_rel"]
        result.numbers["merge max rel error (mask logits)"] = e["mask_logits"]["max_rel"]
        result.artefacts["merged checkpoint"] = str(out / "merged.pth")
        result.artefacts["merge report"] = report["report_path"]
        log(f"   embeddings rel {e['embeddings']['max_rel']:.2e}, mask logits rel {e['mask_logits']['max_rel']:.2e}")

    export_dir = out / "export"
    with _step(result, "4. export ONNX fp32 + int8 (verified)", log):
        manifest = merge_and_export(adapted, export_dir, precisions=("fp32", "int8"), progress=progress)
        for prec in ("fp32", "int8"):
            parity = manifest["graphs"]["encoder"][prec]["parity"]
            for key in ("embeddings_max_rel", "embeddings_cosine", "mask_iou"):
                if key in parity:
                    result.numbers[f"export {prec} {key.replace('_', ' ')}"] = parity[key]
        result.artefacts["export"] = str(export_dir)

    with _step(result, "5. bench (torch vs ONNX Runtime, base vs unmerged vs merged)", log):
        bench = run_and_write(
            json_out=out / "bench.json", markdown_out=out / "bench.md", plot_out=out / "bench.png",
            export_dir=export_dir, adapted=adapted, backends=("torch", "onnxruntime"),
            iterations=p["bench_iterations"], warmup=1, components=("encoder", "decoder_box", "end_to_end"),
            batch_sizes=(), interleave=True,
        )
        for case in bench["cases"]:
            enc = (case.get("components") or {}).get("encoder")
            if case.get("status") == "ok" and enc:
                result.numbers[f"encoder ms: {case['case']}"] = round(enc["median_ms"], 1)
        for name in ("bench.json", "bench.md", "bench.png"):
            if (out / name).exists():
                result.artefacts[f"benchmark {name.split('.')[1]}"] = str(out / name)

    with _step(result, "6. evaluate base vs finetuned vs exported (held-out data)", log):
        ev = evaluate_models(
            [f"base=random:{model_type}" if checkpoint is None else f"base={checkpoint}",
             f"finetuned={run_dir}", f"onnx-fp32={export_dir}@fp32", f"onnx-int8={export_dir}@int8"],
            out / "data" / "test", iterations=p["eval_iterations"], checkpoint=checkpoint,
            image_size=p["image_size"], seed=seed,
            json_out=out / "evaluation.json", markdown_out=out / "evaluation.md", plot_out=out / "evaluation.png",
            progress=progress, log=log,
        )
        for row in ev["rows"]:
            for key in ("dice_point", "dice_box"):
                if row.get(key) is not None:
                    result.numbers[f"{key.replace('_', ' ')}: {row['model']}"] = round(float(row[key]), 4)
        result.artefacts["evaluation"] = str(out / "evaluation.md")
        result.artefacts["evaluation plot"] = str(out / "evaluation.png")

    with _step(result, "7. predict one image with the export (runtime, no torch)", log):
        from .data.io import read_label_planes

        image_path = test_pairs[0].image
        box = _largest_object_box(read_label_planes(test_pairs[0].label)[0])
        records = predict_images(export_dir, [image_path], out / "predict", box=box, overlay=True)
        rec = records[0]
        result.numbers["predicted IoU score (best mask)"] = round(float(max(rec["scores"])), 4)
        for key, value in rec.get("outputs", {}).items():
            result.artefacts[f"prediction {key}"] = str(value)

    if instances:
        with _step(result, "8. automatic instance segmentation (AIS) beside the point grid", log):
            _ais_step(result, out, export_dir, test_pairs[0].image, p, seed, progress, log)

    with atomic_file(out / "summary.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps(result.to_dict(), indent=2, default=str))
    result.artefacts["summary"] = str(out / "summary.json")
    return result


def _ais_step(result: DemoResult, out: Path, export_dir: Path, image_path: Path, p: dict,
              seed: int, progress: bool, log: Callable[[str], None]) -> None:
    """AIS with the instance decoder trained beside the adapter, on the held-out images: mSA of the
    export (torch-free runtime) against the same export's point grid, and one image segmented with
    ``predict --instances`` (overlay)."""
    from .evaluation.report import evaluate_models
    from .predict.images import predict_images

    ev = evaluate_models(
        [f"onnx-fp32={export_dir}@fp32"], out / "data" / "test", prompts=("point", "box"),
        iterations=0, everything=True, everything_options={"points_per_side": p["grid"]}, ais=True, seed=seed,
        json_out=out / "evaluation_ais.json", markdown_out=out / "evaluation_ais.md", progress=progress, log=log,
    )
    log(ev["table"])
    for row in ev["rows"]:
        for key, label in (("ais_msa", "AIS mSA"), ("msa", f"point grid {p['grid']}x{p['grid']} mSA")):
            if row.get(key) is not None:
                result.numbers[f"{label}: {row['model']}"] = round(float(row[key]), 4)
    result.artefacts["evaluation AIS"] = str(out / "evaluation_ais.md")
    rec = predict_images(export_dir, [image_path], out / "predict_ais", instances=True, overlay=True)[0]
    result.numbers["AIS objects in one held-out image"] = rec["n_objects"]
    for key, value in rec.get("outputs", {}).items():
        result.artefacts[f"AIS prediction {key}"] = str(value)


def format_summary(result: DemoResult) -> str:
    lines = ["", "== demo summary ==", f"everything is in {result.out_dir}", "", "made:"]
    lines += [f"  {name:<28} {path}" for name, path in result.artefacts.items()]
    lines += ["", "key numbers:"]
    for name, value in result.numbers.items():
        text = f"{value:.3e}" if isinstance(value, float) and 0 < abs(value) < 1e-3 else f"{value}"
        lines.append(f"  {name:<48} {text}")
    total = sum(result.seconds.values())
    lines += ["", "seconds per step: " + ", ".join(f"{k.split('.')[0]}: {v}" for k, v in result.seconds.items()),
              f"total {total:.0f} s"]
    return "\n".join(lines)
