"""``improve_export``: from a few corrected objects to a better export, in one call.

    result = improve_export("export", images="imgs", labels="labels", out_dir="export_v2")

1. read the export's manifest and the user's images + instance labels (every problem at once);
2. hold out some objects (``holdout``) and score the old export on them (box and point Dice);
3. load the export's torch source (``source``), add LoRA to its mask decoder (``model``);
4. train the decoder on cached embeddings (the encoder runs once per image view);
5. merge exactly and export fp32 + int8 through the usual gates (a refused int8 is left out, as
   ``merge-and-export`` does), with the new adapter in ``adapter/`` as the export's torch source;
6. score the new export on the held-out objects, and only then move the folder into place.

Everything is built in a temporary folder beside ``out_dir`` that replaces it in one rename at the
end; bad input, a failure or a cancel (``should_stop`` returning True, polled between steps and
stages) leaves no folder and the old export as it was. ``on_event`` gets each progress event
(``protocol``): the napari widget runs this in a subprocess (``peftexport improve --events``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

from ..data import Sample, find_pairs_glob, plane_names, read_image_planes, read_label_planes, validate_pairs
from ..errors import PeftExportError
from ..evaluation.protocol import evaluate_interactive
from ..evaluation.report import RawSample, _accept_normalized_input, _model_view
from ..evaluation.specs import load_predictor, parse_model_spec
from ..export.manifest import write_manifest
from ..export.pipeline import _check_out_dir, merge_and_export
from ..fsutil import atomic_dir
from ..peft.adapters import ADAPTER_META, ADAPTER_WEIGHTS, load_adapter
from ..runtime import read_manifest
from ..runtime.intensity import DEFAULT_INTENSITY_RULE, normalize_intensity
from ..training.monitor import Monitor
from .holdout import hold_out_objects
from .model import with_decoder_lora
from .protocol import DEFAULT_LR
from .source import load_torch_source

ADAPTER_DIR = "adapter"  # the new export's torch source, inside it


class ImproveCancelled(PeftExportError):
    """The run was cancelled; nothing was written."""


def _read_data(images: Path, labels: Path) -> list[RawSample]:
    for option, folder in (("--images", images), ("--labels", labels)):
        if not folder.is_dir():
            raise PeftExportError(f"{option} {folder}: not a directory")
    pairs = find_pairs_glob(str(images / "*"), str(labels / "*"))
    validate_pairs(pairs, "instance", what=f"{images} + {labels}")  # every problem in one report
    samples = []
    for pair in pairs:  # planes of a stack are samples of their own (stem[z]); planes without objects left out
        planes, label_planes = read_image_planes(pair.image), read_label_planes(pair.label)
        samples += [RawSample(name, im, lb) for name, im, lb in zip(plane_names(pair.name, len(planes)), planes,
                                                                     label_planes) if lb.any()]
    return samples


def heldout_dice(export_dir: Path, check: Sequence[RawSample], precisions: Sequence[str], seed: int) -> dict:
    """Box and point Dice of an export's graphs on the held-out objects, per encoder precision."""
    out = {}
    for precision in precisions:
        loaded = load_predictor(parse_model_spec(f"{export_dir}@{precision}"))
        _accept_normalized_input(loaded)
        res = evaluate_interactive(loaded.predictor, _model_view(check, loaded.intensity), prompts=("point", "box"),
                                   iterations=0, seed=seed, progress=False)
        out[precision] = {"box_dice": res["metrics"]["box"]["dice"], "point_dice": res["metrics"]["point"]["dice"],
                          "objects": res["n_objects"]}
    return out


def _encoder_precisions(manifest: dict) -> list[str]:
    return [p for p in ("fp32", "fp16", "int8") if p in (manifest.get("graphs", {}).get("encoder") or {})]


def improve_export(
    export_dir: str | os.PathLike,
    images: str | os.PathLike,
    labels: str | os.PathLike,
    out_dir: str | os.PathLike,
    source: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    targets: str = "dec.all",
    rank: int = 8,
    steps: int = 60,
    lr: float = DEFAULT_LR,
    holdout: float = 0.2,
    objects_per_image: int = 8,
    sub_iterations: int = 1,
    augment: bool = True,
    precisions: Sequence[str] = ("fp32", "int8"),
    embedding_store: str | os.PathLike | None = None,
    min_object_size: int = 25,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    on_event: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    curve_every: int = 0,
) -> dict:
    """Train decoder LoRA of ``export_dir``'s model on ``images`` + ``labels`` (folders paired by file
    name) and write the merged, verified export to ``out_dir``; returns the result (also stored in the
    new manifest's ``improve``): held-out box/point Dice before and after, per precision.

    ``curve_every`` > 0: also a learning curve in ``result["training"]["curve"]``: the held-out Dice of
    the torch model before the first step, every ``curve_every`` steps and after the last (``Monitor``:
    it does not change the training, and its time is left out of the training seconds)."""
    t0 = time.perf_counter()
    emit = on_event or (lambda event: None)
    export_dir, out_dir = Path(export_dir), Path(out_dir)

    def stage(name: str, message: str) -> None:
        if should_stop is not None and should_stop():
            raise ImproveCancelled(f"{out_dir}: cancelled before {name}; nothing written, {export_dir} unchanged")
        emit({"event": "stage", "stage": name, "message": message})

    manifest = read_manifest(export_dir)
    target, source_dir = out_dir.resolve(), export_dir.resolve()
    if target == source_dir or source_dir in target.parents or target in source_dir.parents:
        raise PeftExportError(f"-o {out_dir}: is, holds or lies inside the export being improved ({export_dir}); "
                              "give a folder beside it (the old export is kept as it is)")
    _check_out_dir(out_dir, overwrite)
    if steps < 1:
        raise PeftExportError(f"--steps: must be >= 1, got {steps}")
    if curve_every < 0:
        raise PeftExportError(f"curve_every: must be >= 0 (0: no learning curve), got {curve_every}")
    rule = (manifest.get("preprocessing") or {}).get("intensity") or dict(DEFAULT_INTENSITY_RULE)
    raw = _read_data(Path(images), Path(labels))
    samples = [Sample(s.name, normalize_intensity(s.image, rule), s.label) for s in raw]
    hold = hold_out_objects(samples, holdout, seed, min_object_size)
    check = [RawSample(c.name, next(r.image for r in raw if r.name == c.name), c.label) for c in hold.check]
    emit({"event": "start", "images": len(raw), "train_objects": hold.record["objects"] - hold.record["held_out"],
          "held_out_objects": hold.record["held_out"], "steps": steps})

    stage("load", f"loading the torch model of {export_dir}")
    adapted = with_decoder_lora(load_torch_source(export_dir, manifest, source, checkpoint), targets, rank,
                                seed=seed)
    stage("before", "scoring the old export on the held-out objects")
    before = heldout_dice(export_dir, check, _encoder_precisions(manifest), seed)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.improve-", dir=out_dir.parent))
    try:
        stage("train", f"training decoder LoRA for {steps} steps on cached embeddings")
        summary = _train(adapted, hold.train, work / "run", rule, steps, lr, objects_per_image, sub_iterations,
                         augment, embedding_store, min_object_size, seed, progress, emit, should_stop,
                         monitor=Monitor(hold.check, curve_every) if curve_every else None)
        if summary["status"] == "interrupted":
            raise ImproveCancelled(f"{out_dir}: cancelled during training; nothing written, {export_dir} unchanged")
        stage("export", "merging and exporting (fp32 + int8 through the gate)")
        trained = load_adapter(work / "run", checkpoint)  # the base where it is now (--checkpoint)
        new = merge_and_export(trained, work / "export", precisions=precisions, progress=progress,
                               meta_decoder="decoder" in (manifest.get("graphs") or {}))
        stage("after", "scoring the new export on the held-out objects")
        after = heldout_dice(work / "export", check, _encoder_precisions(new), seed)
        result = {"from": str(export_dir.resolve()), "out": str(out_dir), "held_out": hold.record,
                  "before": before, "after": after, "training": _training_record(summary, steps, lr, targets, rank),
                  "refused": [r.get("graph", "") + " " + r.get("precision", "") for r in new.get("refused", [])],
                  "seconds": None}
        stage("write", f"writing {out_dir}")
        with atomic_dir(out_dir, overwrite=overwrite) as tmp:
            for entry in (work / "export").iterdir():
                os.replace(entry, tmp / entry.name)
            (tmp / ADAPTER_DIR).mkdir()
            for name in (ADAPTER_WEIGHTS, ADAPTER_META):
                shutil.copy2(work / "run" / name, tmp / ADAPTER_DIR / name)
            result["seconds"] = round(time.perf_counter() - t0, 1)
            new["source"] = {**new["source"], "adapter": str((out_dir / ADAPTER_DIR).resolve()), "in_export": ADAPTER_DIR}
            new["improve"] = result
            write_manifest(tmp, new)
            if should_stop is not None and should_stop():  # the last moment a cancel can still leave nothing
                raise ImproveCancelled(f"{out_dir}: cancelled; nothing written, {export_dir} unchanged")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    emit({"event": "result", "result": result})
    return result


def _train(adapted, train: list[Sample], run_dir: Path, rule: dict, steps: int, lr: float, objects: int,
           sub_iterations: int, augment: bool, store, min_object_size: int, seed: int, progress: bool,
           emit: Callable[[dict], None], should_stop, cache_embeddings: bool = True,
           monitor: Monitor | None = None) -> dict:
    """``finetune``'s loop on ``adapted`` as it is set (what trains and what not), without validation.
    ``cache_embeddings=False``: the encoder runs every step (benchmarks/bench_improve.py's encoder case);
    ``monitor``: a learning curve that does not steer the run (``Trainer``)."""
    from ..training import TrainConfig, Trainer

    cfg = adapted.config
    size = adapted.model.image_encoder.img_size
    config = TrainConfig(
        out=str(run_dir), model_type=adapted.base.model_type, image_size=size, intensity=dict(rule),
        peft=cfg.method, blocks=cfg.blocks, rank=cfg.rank, alpha=cfg.alpha, targets=cfg.targets,
        decoder_peft=cfg.decoder_method, decoder_rank=cfg.decoder_rank, patch_size=size,
        min_object_size=min_object_size, augment=augment, iterations=steps, lr=lr, objects_per_image=objects,
        sub_iterations=sub_iterations, val_every=steps, validate_at_start=False, cache_embeddings=cache_embeddings,
        embedding_store=str(store) if store else None, seed=seed, progress=progress, device="cpu")

    def step_event(entry: dict) -> None:
        if entry.get("type") == "step":
            emit({"event": "step", "step": entry["step"], "total": steps, "loss": entry["loss"],
                  "seconds": entry.get("seconds")})

    return Trainer(config, adapted=adapted, samples=(train, []), on_event=step_event, should_stop=should_stop,
                   monitor=monitor).run()


def _training_record(summary: dict, steps: int, lr: float, targets: str, rank: int) -> dict:
    return {"steps": summary["steps"], "lr": lr, "targets": targets, "rank": rank,
            "trainable_parameters": summary["trainable_parameters"], "embeddings": summary.get("embeddings"),
            "seconds": summary["seconds"], **({"curve": summary["monitor"]} if "monitor" in summary else {})}

