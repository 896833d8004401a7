"""``peftexport demo``: the whole pipeline on built-in synthetic microscopy data.

make data -> finetune late LoRA -> merge (exactness report) -> export ONNX fp32 + int8 (a refused int8 is named)
(parity) -> bench (torch vs ONNX Runtime, merged vs unmerged) -> evaluate (base vs
finetuned vs exported, held-out images) -> predict one image with the runtime, and a
before/after picture. Every step calls the same library function as its own command, so
the demo is also a smoke test of them. The default trains long enough to learn visibly
(tiny model from random weights: held-out box Dice ~0.6); ``fast`` is the test suite's
shorter run; ``instances`` adds micro-sam's instance decoder and AIS.

Longer than 400 lines because it tells one story, eight stages in order with each stage's
summary lines and the before/after picture beside them; split, a reader would jump between files.

May import: every stage (it runs them all).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import PeftExportError
from .fsutil import atomic_file

# tiny: late LoRA from random weights with 5 objects and one corrective round per step at lr 1e-3.
# Its masks first collapse to empty (validation Dice ~0 around steps 50-100 while the soft training
# Dice loss already falls) and then learn the nuclei: validation box Dice ~0.5 at step 150-200,
# ~0.65 at 300 (seeds 0 and 1). A run stopped inside the collapse keeps its step-0 adapter (the
# best validation), i.e. the base model, so no preset may stop before ~200 steps.
# vit_b shows the real architecture at a CPU-friendly image size (much slower, learns little
# without a real --checkpoint). vit_t (MobileSAM) runs tiny's recipe at 256 px (its TinyViT
# encoder costs ~0.5 s per training step on one core there; 1024 would be ~16x that).
PRESETS = {
    "tiny": dict(image_size=256, data_size=256, n_train=10, n_test=3, iterations=300, lr=1e-3, rank=8, grid=16,
                 objects=5, sub_iterations=1, val_every=50, val_objects=8, bench_iterations=20, eval_iterations=3),
    "vit_b": dict(image_size=512, data_size=512, n_train=6, n_test=2, iterations=12, lr=1e-4, rank=32, grid=16,
                  objects=8, sub_iterations=1, val_every=4, val_objects=4, bench_iterations=2, eval_iterations=2),
    "vit_t": dict(image_size=256, data_size=256, n_train=10, n_test=3, iterations=300, lr=1e-3, rank=8, grid=16,
                  objects=5, sub_iterations=1, val_every=50, val_objects=8, bench_iterations=5, eval_iterations=2),
}
# --fast: the test suite's run; shorter training, just past the collapse (it learns, less far),
# fewer images and timings.
FAST = {
    "tiny": dict(n_train=6, n_test=2, iterations=200, val_every=50, bench_iterations=3, eval_iterations=2),
    "vit_b": dict(iterations=4, val_every=2, bench_iterations=1, eval_iterations=1),
    "vit_t": dict(n_train=4, n_test=2, iterations=6, val_every=3, bench_iterations=1, eval_iterations=1),
}
BEFORE_AFTER = "before_after.png"
INCOMPLETE = "INCOMPLETE"  # in the demo's folder until the demo finished (a rerun may then replace it)


@dataclass
class DemoResult:
    out_dir: Path
    model_type: str = "tiny"
    random_init: bool = True
    artefacts: dict[str, str] = field(default_factory=dict)
    numbers: dict[str, float] = field(default_factory=dict)
    stages: dict[str, dict] = field(default_factory=dict)  # name -> seconds, load, table/lines
    notes: list[str] = field(default_factory=list)
    threads: str = ""  # torch's thread choice, as printed (training.threads)

    @property
    def seconds(self) -> dict[str, float]:
        return {name: s["seconds"] for name, s in self.stages.items()}

    def to_dict(self) -> dict:
        return {"out_dir": str(self.out_dir), "model_type": self.model_type, "random_init": self.random_init,
                "artefacts": self.artefacts, "numbers": self.numbers, "stages": self.stages, "notes": self.notes, "threads": self.threads}


def machine_load() -> tuple[float, int]:
    """(1-minute load average, CPUs this process may use)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    try:
        return os.getloadavg()[0], cpus
    except OSError:
        return float("nan"), cpus


def load_word(load: float, cpus: int) -> str:
    """A word on how busy the machine was (the demo itself keeps about one CPU busy)."""
    if load != load:
        return "load unknown"
    per_cpu = load / max(cpus, 1)
    word = "quiet" if per_cpu <= 1.0 else "busy" if per_cpu <= 2.0 else "overloaded, timings inflated"
    return f"load {load:.1f} on {cpus} CPUs: {word}"


def _step(result: DemoResult, name: str, log: Callable[[str], None]):
    class _Timer:
        def __enter__(self):
            log(f"\n== {name} ==")
            self.t0 = time.perf_counter()
            result.stages[name] = {"seconds": None, "lines": []}
            return result.stages[name]

        def __exit__(self, *exc):
            seconds = time.perf_counter() - self.t0
            load, cpus = machine_load()
            result.stages[name].update(seconds=round(seconds, 2), load=round(load, 2), cpus=cpus)
            if exc[0] is None:
                log(f"   ({seconds:.1f} s; {load_word(load, cpus)})")
            return False

    return _Timer()


def _g(value: float, digits: int = 4) -> str:
    """A number with ``digits`` significant digits (small errors in scientific notation)."""
    if value is None or value != value:
        return "-"
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"


def _table(rows: list[dict]) -> list[str]:
    from .evaluation.tables import format_table

    return format_table(rows, float_format=".4g").splitlines()


def run_demo(
    out_dir: str | Path = "peftexport_demo",
    model_type: str = "tiny",
    checkpoint: str | Path | None = None,
    overwrite: bool = False,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
    fast: bool = False,
    instances: bool = False,
    iterations: int | None = None,
    threads: int | None = None,
) -> DemoResult:
    """Run every step into ``out_dir`` and return what was made and the key numbers.

    ``instances`` trains micro-sam's instance decoder with the adapter and adds the AIS step
    (off by default: on the tiny model it makes each training step ~7x slower). ``iterations``
    overrides the preset's training steps. ``threads``: torch's CPU threads (default: the cores
    other processes leave free, ``training.threads``; OMP_NUM_THREADS is respected).

    A folder left by a demo that stopped midway (it holds ``INCOMPLETE``) is replaced by the rerun
    without ``overwrite``; any other non-empty folder needs ``overwrite``.
    """
    from .bench.run import run_and_write
    from .data import make_demo_data
    from .evaluation.report import evaluate_models
    from .export.pipeline import merge_and_export
    from .merge import merge_to_checkpoint
    from .peft.adapters import load_adapter
    from .predict.images import predict_images
    from .training import TrainConfig, finetune
    from .training.threads import use_free_cores

    if model_type not in PRESETS:
        raise PeftExportError(f"--model {model_type!r}: the demo runs tiny, vit_t or vit_b")
    p = {**PRESETS[model_type], **(FAST[model_type] if fast else {})}
    if iterations is not None:
        if iterations < 1:
            raise PeftExportError(f"--iterations: must be >= 1, got {iterations}")
        p["iterations"] = iterations
        p["val_every"] = min(p["val_every"], iterations)
    if threads is not None and threads < 1:
        raise PeftExportError(f"--threads: must be >= 1, got {threads}")
    out = Path(out_dir)
    _start_folder(out, overwrite, log)
    result = DemoResult(out, model_type, checkpoint is None)
    result.threads = use_free_cores(threads, log).line()
    if checkpoint is None:
        log(
            "!! No --checkpoint: the demo starts from a RANDOMLY INITIALISED SAM and fine-tunes it on synthetic "
            "nuclei. The pipeline is real and the fine-tuned model learns these nuclei, but it knows nothing "
            "else. Pass a real SAM checkpoint for a useful model. !!"
        )
    warnings.filterwarnings("ignore", message="no checkpoint given")

    with _step(result, "1. make synthetic data", log) as st:
        train_pairs = make_demo_data(out / "data" / "train", n_images=p["n_train"], size=p["data_size"], seed=seed)
        test_pairs = make_demo_data(out / "data" / "test", n_images=p["n_test"], size=p["data_size"], seed=seed + 1000)
        result.artefacts["train data"] = str(out / "data" / "train")
        result.artefacts["test data"] = str(out / "data" / "test")
        st["lines"] = [f"{len(train_pairs)} training and {len(test_pairs)} held-out images of "
                       f"{p['data_size']}x{p['data_size']} px with instance labels"]
        log("   " + st["lines"][0])

    run_dir = out / "run"
    with _step(result, "2. finetune late LoRA", log) as st:
        summary = finetune(TrainConfig(
            out=str(run_dir), data=str(out / "data" / "train"), val_fraction=0.2, patch_size=p["data_size"],
            model_type=model_type, checkpoint=str(checkpoint) if checkpoint else None, image_size=p["image_size"],
            peft="lora", blocks="late", rank=p["rank"], targets=("q", "k", "v", "mlp"),
            iterations=p["iterations"], lr=p["lr"], objects_per_image=p["objects"],
            sub_iterations=p["sub_iterations"], val_every=p["val_every"], val_objects=p["val_objects"],
            seed=seed, progress=progress, instance_decoder=instances,
            threads=threads,  # the demo's --threads, said once (None: the choice made above holds)
        ))
        result.artefacts["adapter"] = str(run_dir / "adapter.safetensors")
        result.artefacts["training curves"] = str(run_dir / "training.png")
        best = summary.get("best_validation") or {}
        for key in ("point_dice", "box_dice"):
            if key in best:
                result.numbers[f"val {key.replace('_', ' ')} (best)"] = float(best[key])
        size_mb = (run_dir / "adapter.safetensors").stat().st_size / 1e6
        result.numbers["adapter size MB"] = size_mb
        st["lines"] = [f"{summary['steps']} steps (lr {p['lr']:g}, {p['objects']} objects and "
                       f"{p['sub_iterations']} corrective round(s) per step); adapter {_g(size_mb, 3)} MB"]
        if best:
            st["lines"].append(f"best validation (step {summary['best_step']}): box Dice {_g(best['box_dice'])}, "
                               f"point Dice {_g(best['point_dice'])}")
        log("\n".join("   " + ln for ln in st["lines"]))

    adapted = load_adapter(run_dir, checkpoint=checkpoint)
    with _step(result, "3. merge (verified)", log) as st:
        report = merge_to_checkpoint(adapted, out / "merged.pth")
        e = report["errors"]
        result.numbers["merge max rel error (embeddings)"] = e["embeddings"]["max_rel"]
        result.numbers["merge max rel error (mask logits)"] = e["mask_logits"]["max_rel"]
        result.artefacts["merged checkpoint"] = str(out / "merged.pth")
        result.artefacts["merge report"] = report["report_path"]
        st["lines"] = [f"merged model vs adapter model: embeddings max rel {_g(e['embeddings']['max_rel'])}, "
                       f"mask logits max rel {_g(e['mask_logits']['max_rel'])} (limit {report['tolerance_rel']:.0e})"]
        log("   " + st["lines"][0])

    export_dir = out / "export"
    with _step(result, "4. export ONNX fp32 + int8 (each verified; a refused one is left out)", log) as st:
        # A graph that misses its gate is left out of the export and listed in manifest["refused"]
        # (the fp32 reference is never left out: its failure fails the demo).
        manifest = merge_and_export(adapted, export_dir, precisions=("fp32", "int8"), progress=progress)
        precisions = [p for p in ("fp32", "int8") if p in manifest["graphs"]["encoder"]]
        exported = precisions[-1]  # the precision the before/after picture shows
        rows = []
        for prec in precisions:
            parity = manifest["graphs"]["encoder"][prec]["parity"]
            rows.append({"encoder": prec, "embeddings max rel": parity.get("embeddings_max_rel"),
                         "embeddings cosine": parity.get("embeddings_cosine"), "mask IoU": parity.get("mask_iou"),
                         "check": "ok" if parity.get("passed") else "FAILED"})
            for key in ("embeddings_max_rel", "embeddings_cosine", "mask_iou"):
                if key in parity:
                    result.numbers[f"export {prec} {key.replace('_', ' ')}"] = parity[key]
        st["lines"] = _table(rows)
        search = (manifest["graphs"]["encoder"].get("int8") or {}).get("int8_search")
        if search:
            st["lines"].append(f"int8: {search['int8_matmuls']} of {search['weight_matmuls']} weight MatMuls in int8, "
                               f"{search['fp32_matmuls']} kept fp32 for the mask margin")
        for entry in manifest.get("refused") or []:
            line = f"REFUSED {entry['line']}: not written, the demo goes on without it"
            result.notes.append(line)
            st["lines"].append(line)
            log("   " + line)
        result.artefacts["export"] = str(export_dir)

    with _step(result, "5. bench (torch vs ONNX Runtime, base vs unmerged vs merged)", log) as st:
        bench = run_and_write(
            json_out=out / "bench.json", markdown_out=out / "bench.md", plot_out=out / "bench.png",
            export_dir=export_dir, adapted=adapted, backends=("torch", "onnxruntime"),
            iterations=p["bench_iterations"], warmup=1, components=("encoder", "decoder_box", "end_to_end"),
            batch_sizes=(), interleave=True,
        )
        rows = []
        for case in bench["cases"]:
            comps = case.get("components") or {}
            if case.get("status") != "ok" or not comps:
                continue
            row = {"case": case["case"]}
            for comp in ("encoder", "decoder_box", "end_to_end"):
                if comp in comps:
                    row[f"{comp.replace('_', ' ')} ms"] = float(comps[comp]["median_ms"])
            rows.append(row)
            if "encoder" in comps:
                result.numbers[f"encoder ms: {case['case']}"] = float(comps["encoder"]["median_ms"])
        load, cpus = machine_load()
        st["lines"] = _table(rows) + [f"(median of {p['bench_iterations']} calls; {load_word(load, cpus)})"]
        log("\n".join("   " + ln for ln in st["lines"]))
        for name in ("bench.json", "bench.md", "bench.png"):
            if (out / name).exists():
                result.artefacts[f"benchmark {name.split('.')[1]}"] = str(out / name)

    with _step(result, "6. evaluate base vs finetuned vs exported (held-out data)", log) as st:
        ev = evaluate_models(
            [f"base=random:{model_type}" if checkpoint is None else f"base={checkpoint}",
             f"finetuned={run_dir}", *[f"onnx-{p}={export_dir}@{p}" for p in precisions]],
            out / "data" / "test", iterations=p["eval_iterations"], checkpoint=checkpoint,
            image_size=p["image_size"], seed=seed,
            json_out=out / "evaluation.json", markdown_out=out / "evaluation.md", plot_out=out / "evaluation.png",
            progress=progress, log=log,
        )
        rows = []
        for row in ev["rows"]:
            rows.append({"model": row["model"], "objects": row.get("objects"), "box Dice": row.get("dice_box"),
                         "point Dice": row.get("dice_point"),
                         f"iterative ({p['eval_iterations']} points) from box": row.get("dice_iterative_box")})
            for key in ("dice_point", "dice_box"):
                if row.get(key) is not None:
                    result.numbers[f"{key.replace('_', ' ')}: {row['model']}"] = float(row[key])
        st["lines"] = _table(rows)
        log("\n".join("   " + ln for ln in st["lines"]))
        result.artefacts["evaluation"] = str(out / "evaluation.md")
        result.artefacts["evaluation plot"] = str(out / "evaluation.png")

    with _step(result, "7. predict with the export (runtime, no torch) and draw before/after", log) as st:
        from .data.io import read_image_planes, read_label_planes

        image_path = test_pairs[0].image
        label = read_label_planes(test_pairs[0].label)[0]
        box = _largest_object_box(label)
        records = predict_images(export_dir, [image_path], out / "predict", box=box, overlay=True)
        rec = records[0]
        result.numbers["predicted IoU score (best mask)"] = float(max(rec["scores"]))
        for key, value in rec.get("outputs", {}).items():
            result.artefacts[f"prediction {key}"] = str(value)
        panels = before_after_figure(
            read_image_planes(image_path)[0], label, out / BEFORE_AFTER,
            [("before: base SAM" + (" (random init)" if checkpoint is None else ""),
              f"random:{model_type}" if checkpoint is None else str(checkpoint)),
             (f"after: fine-tuned, ONNX {exported} export", f"{export_dir}@{exported}")],
            image_size=p["image_size"], seed=seed, title=f"{Path(image_path).name} (held out)",
        )
        for name, dice in panels.items():
            result.numbers[f"before/after box Dice: {name}"] = dice
        result.artefacts["before/after picture"] = str(out / BEFORE_AFTER)
        st["lines"] = [f"{Path(image_path).name}: " + ", ".join(f"{n} {_g(d)}" for n, d in panels.items())
                       + " (mean box Dice over its objects)"]
        log("   " + st["lines"][0])

    if instances:
        with _step(result, "8. automatic instance segmentation (AIS) beside the point grid", log) as st:
            st["lines"] = _ais_step(result, out, export_dir, test_pairs[0].image, p, seed, progress, log)
            log("\n".join("   " + ln for ln in st["lines"]))

    with atomic_file(out / "summary.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps(result.to_dict(), indent=2, default=str))
    result.artefacts["summary"] = str(out / "summary.json")
    (out / INCOMPLETE).unlink()  # last: only a demo that reached its summary is complete
    return result


def _start_folder(out: Path, overwrite: bool, log: Callable[[str], None]) -> None:
    """Make ``out`` empty and mark it ``INCOMPLETE`` until the demo finishes.

    The demo's files refer to each other by path (the export's manifest names the adapter, the
    evaluation the run), so it writes in place rather than in a folder renamed at the end; the
    mark lets a rerun replace what a stopped demo left, and nothing else, without --overwrite.
    """
    import shutil

    if out.exists() and not out.is_dir():
        raise PeftExportError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if (out / INCOMPLETE).is_file():
            log(f"{out}: an earlier demo stopped before its end ({INCOMPLETE}); starting it again")
        elif not overwrite:
            raise PeftExportError(f"{out}: directory exists and is not empty (pass --overwrite to replace it)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / INCOMPLETE).write_text("peftexport demo: this folder is being written; a rerun of the demo replaces it\n")


def _ais_step(result: DemoResult, out: Path, export_dir: Path, image_path: Path, p: dict,
              seed: int, progress: bool, log: Callable[[str], None]) -> list[str]:
    """AIS with the instance decoder trained beside the adapter, on the held-out images: mSA of the
    export (torch-free runtime) against the same export's point grid, and one image segmented with
    ``predict --instances`` (overlay). Returns the summary lines."""
    from .evaluation.report import evaluate_models
    from .predict.images import predict_images

    ev = evaluate_models(
        [f"onnx-fp32={export_dir}@fp32"], out / "data" / "test", prompts=("point", "box"),
        iterations=0, everything=True, everything_options={"points_per_side": p["grid"]}, ais=True, seed=seed,
        json_out=out / "evaluation_ais.json", markdown_out=out / "evaluation_ais.md", progress=progress,
        log=lambda _msg: None,
    )
    rows = []
    for row in ev["rows"]:
        for key, label in (("ais_msa", "AIS mSA"), ("msa", f"point grid {p['grid']}x{p['grid']} mSA")):
            if row.get(key) is not None:
                result.numbers[f"{label}: {row['model']}"] = round(float(row[key]), 4)
        rows.append({"held-out, ONNX fp32": "mSA", "AIS (instance decoder)": row.get("ais_msa"),
                     f"point grid {p['grid']}x{p['grid']}": row.get("msa")})
    result.artefacts["evaluation AIS"] = str(out / "evaluation_ais.md")
    rec = predict_images(export_dir, [image_path], out / "predict_ais", instances=True, overlay=True)[0]
    result.numbers["AIS objects in one held-out image"] = rec["n_objects"]
    for key, value in rec.get("outputs", {}).items():
        result.artefacts[f"AIS prediction {key}"] = str(value)
    return _table(rows) + [f"{Path(image_path).name}: {rec['n_objects']} objects (predict --instances)"]


def _largest_object_box(label: np.ndarray) -> list[float]:
    from .data.prompts import box_from_mask

    ids, counts = np.unique(label[label > 0], return_counts=True)
    return [float(v) for v in box_from_mask(label == ids[np.argmax(counts)])]


def before_after_figure(image: np.ndarray, label: np.ndarray, out_png: Path, models: list[tuple[str, str]],
                        image_size: int | None = None, seed: int = 0, title: str = "",
                        max_objects: int = 40) -> dict[str, float]:
    """Ground truth beside each model's masks from one box prompt per object; returns mean box Dice
    per model. ``models``: (panel title, evaluate model spec)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from .data.prompts import box_from_mask
    from .evaluation.metrics import dice
    from .evaluation.specs import load_predictor, parse_model_spec
    from .predict.overlay import BOX, render_overlay

    ids = [int(i) for i in np.unique(label[label > 0])][:max_objects]
    boxes = [box_from_mask(label == i) for i in ids]
    panels = [("ground truth", render_overlay(image, labels=label), None)]
    scores: dict[str, float] = {}
    for name, spec in models:
        predictor = load_predictor(parse_model_spec(spec), image_size=image_size, seed=seed).predictor
        predictor.set_image(image)
        predicted = np.zeros_like(label)
        dices = []
        for i, box in zip(ids, boxes):
            mask = predictor.predict(box=np.asarray(box, np.float32), multimask_output=False)[0][0]
            predicted[mask & (predicted == 0)] = i
            dices.append(dice(mask, label == i))
        scores[name] = float(np.mean(dices)) if dices else float("nan")
        panels.append((name, render_overlay(image, labels=predicted), scores[name]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.9))
    for ax, (name, picture, score) in zip(np.atleast_1d(axes), panels):
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(name if score is None else f"{name}\nmean box Dice {score:.3f}", fontsize=10)
        ax.set_axis_off()
    fig.suptitle(f"{title}: one box prompt per object ({len(ids)} objects)", fontsize=11)
    fig.legend(handles=[Patch(color=np.array(BOX) / 255, label="one colour per object: ground truth, or the mask "
                                                                   "predicted from that object's box")],
               loc="lower center", fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    with atomic_file(out_png, overwrite=True) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return scores


def format_summary(result: DemoResult) -> str:
    """One clean summary: what each stage gave (short tables, 4 significant digits), the learned
    improvement, the files, and the timings with the machine's load."""
    kind = "randomly initialised" if result.random_init else "from a real checkpoint"
    lines = ["", f"== demo summary: {result.model_type} SAM, {kind} ==", ""]
    for name, stage in result.stages.items():
        lines.append(name)
        lines += [f"    {ln}" for ln in stage.get("lines", [])]
    n = result.numbers
    before, after, int8 = n.get("dice box: base"), n.get("dice box: finetuned"), n.get("dice box: onnx-int8")
    if before is not None and after is not None:
        lines += ["", f"learned: held-out box Dice {_g(before)} (base) -> {_g(after)} (fine-tuned)"
                  + (f", {_g(int8)} (its ONNX int8 export)" if int8 is not None else "")]
    lines += [f"note: {note}" for note in result.notes if note.startswith("REFUSED")]
    lines += ["", "made:"]
    lines += [f"    {name:<24} {path}" for name, path in result.artefacts.items()]
    rows = [{"stage": name.split(" ", 1)[0] + " " + name.split(" ", 2)[1], "seconds": float(s["seconds"]),
             "machine load": load_word(s.get("load", float("nan")), s.get("cpus", 1))}
            for name, s in result.stages.items() if s.get("seconds") is not None]
    total = sum(r["seconds"] for r in rows)
    lines += ["", "timings:"] + [f"    {ln}" for ln in _table(rows)] + [f"    total {total:.0f} s"]
    if result.threads:
        lines.append(f"    {result.threads}")
    return "\n".join(lines)
