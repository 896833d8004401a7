"""The ``evaluate`` command: several models, one dataset, one table.

Every model sees the same raw images and the same ground-truth prompts (seeded per
image and object by ``protocol.PromptPlan``); each applies its own intensity rule.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .. import __version__
from ..errors import PeftExportError
from ..fsutil import atomic_file, check_can_write
from ..runtime.intensity import normalize_intensity
from ..runtime.preprocess import to_uint8
from .protocol import PROMPT_TYPES, evaluate_automatic, evaluate_interactive
from .specs import LoadedModel, load_predictor, parse_model_specs
from .tables import format_table, plot_curves, summary_rows, to_markdown

EVERYTHING_DEFAULTS = {"points_per_side": 32, "points_per_batch": 64, "pred_iou_thresh": 0.88,
                       "stability_score_thresh": 0.95, "box_nms_thresh": 0.7}


@dataclass
class RawSample:
    """One 2D plane as read from disk (no intensity normalisation) and its instance labels."""

    name: str
    image: np.ndarray
    label: np.ndarray


def load_raw_samples(data_dir: str | Path, labels_are: str = "instance",
                     max_images: int | None = None) -> list[RawSample]:
    """Validate ``data_dir`` (images/ + labels/) as a whole, then read raw planes.

    ``data.load_samples`` normalises intensities with one rule; evaluation needs the raw
    arrays because every model applies its own rule.
    """
    from ..data import find_pairs, plane_names, read_image_planes, read_label_planes, validate_pairs

    pairs = find_pairs(data_dir)
    validate_pairs(pairs, labels_are, what=str(data_dir))
    if max_images is not None:
        if max_images < 1:
            raise PeftExportError(f"--max-images: must be >= 1, got {max_images}")
        pairs = pairs[:max_images]
    samples = []
    for pair in pairs:
        images = read_image_planes(pair.image)
        labels = read_label_planes(pair.label, labels_are)
        for name, im, lb in zip(plane_names(pair.name, len(images)), images, labels):
            samples.append(RawSample(name, im, np.asarray(lb, dtype=np.int32)))
    return samples


def _keeps_uint8(rule: dict) -> bool:
    """Whether the rule leaves a uint8 image as it is (so normalising twice changes nothing)."""
    return rule.get("name") == "none" or rule.get("uint8") == "keep"


def _model_view(samples: Sequence[RawSample], rule: dict) -> Iterator[tuple[np.ndarray, np.ndarray, str]]:
    # evaluate.py rounds float images to uint8 before set_image; normalising here first
    # gives the predictor exactly the uint8 RGB the runtime makes from the raw image.
    for s in samples:
        yield to_uint8(normalize_intensity(s.image, rule)), s.label, s.name


def _accept_normalized_input(loaded: LoadedModel) -> None:
    """Make the predictor take already normalised uint8 images as they are."""
    if _keeps_uint8(loaded.intensity):
        return  # its rule keeps uint8 input: nothing to switch off
    none = {"name": "none"}
    pred = loaded.predictor
    if hasattr(pred, "intensity") and not hasattr(pred, "_intensity_rule"):
        pred.intensity = none
    elif hasattr(pred, "_intensity_rule"):
        pred._intensity_rule = none  # SamSession keeps its manifest rule here
    else:
        raise PeftExportError(f"{loaded.spec.text}: cannot evaluate a model whose intensity rule "
                              f"normalises uint8 images ({loaded.intensity})")


def _check_prompts(prompts: Sequence[str]) -> tuple[str, ...]:
    prompts = tuple(p.strip() for p in prompts if p.strip())
    bad = [p for p in prompts if p not in PROMPT_TYPES]
    if bad or not prompts:
        raise PeftExportError(f"--prompts: unknown prompt type(s) {bad}; choose from {','.join(PROMPT_TYPES)}")
    return prompts


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, float) and obj != obj:
        return None
    return obj


def evaluate_models(
    model_specs: Sequence[str],
    data_dir: str | Path,
    prompts: Sequence[str] = PROMPT_TYPES,
    iterations: int = 8,
    start: str = "both",
    everything: bool = False,
    checkpoint: str | Path | None = None,
    image_size: int | None = None,
    backend: str = "onnxruntime",
    device: str = "cpu",
    seed: int = 0,
    max_objects_per_image: int | None = None,
    max_images: int | None = None,
    labels_are: str = "instance",
    everything_options: dict | None = None,
    force: bool = False,
    json_out: str | Path | None = None,
    markdown_out: str | Path | None = None,
    plot_out: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    micro_sam_config: Any = None,
    ais: bool = False,
    ais_options: dict | None = None,
) -> dict:
    """Evaluate every model of ``model_specs`` on ``data_dir`` with the same prompts.

    Specs are ``[NAME=]SOURCE[@PRECISION]`` (see ``predictors``). Interactive metrics
    (point, box, iterative from point and from box) come from ``evaluate_interactive``;
    with ``everything``, mSA of automatic segmentation from ``evaluate_automatic``; with ``ais``,
    mSA and SA50 of micro-sam's automatic instance segmentation (``segment_instances`` with
    ``ais_options``) for every model that has an instance decoder ("-" for the others).
    Writes the optional JSON / markdown / PNG outputs atomically. Returns a JSON-able
    dict with ``rows`` (one per model), ``table`` (plain text) and ``models`` (full results).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    # Everything that can be refused is checked before any model runs.
    specs = parse_model_specs(list(model_specs))
    prompts = _check_prompts(prompts)
    if iterations < 0:
        raise PeftExportError(f"--iterations: must be >= 0, got {iterations}")
    if start not in ("point", "box", "both"):
        raise PeftExportError(f"--start: must be 'point', 'box' or 'both', got {start!r}")
    if "iterative" not in prompts and plot_out is not None:
        raise PeftExportError(f"{plot_out}: --plot needs iterative prompting in --prompts")
    outs = [p for p in (json_out, markdown_out, plot_out) if p is not None]
    if len({str(Path(p).resolve()) for p in outs}) != len(outs):
        raise PeftExportError("--json, --markdown and --plot must be different files")
    for p in outs:
        check_can_write(p, overwrite)
    auto_opts = dict(EVERYTHING_DEFAULTS)
    for k, v in (everything_options or {}).items():
        if k not in auto_opts and k != "min_mask_region_area":
            raise PeftExportError(f"everything option: unknown {k!r}")
        auto_opts[k] = v
    ais_params = None
    if ais:
        from ..runtime.instances import check_ais_params, require_ais_packages

        ais_params = check_ais_params(dict(ais_options or {}))
        require_ais_packages()
    samples = load_raw_samples(data_dir, labels_are, max_images)
    n_objects = int(sum(np.unique(s.label[s.label != 0]).size for s in samples))
    log(f"data: {data_dir}: {len(samples)} image(s), {n_objects} object(s)")

    results: dict[str, dict] = {}
    for i, spec in enumerate(specs, 1):
        t0 = time.perf_counter()
        loaded = load_predictor(spec, checkpoint=checkpoint, image_size=image_size, backend=backend,
                                micro_sam_config=micro_sam_config,
                                device=device, seed=seed, force=force)
        _accept_normalized_input(loaded)
        info = loaded.info
        log(f"[{i}/{len(specs)}] {spec.name}: {info['kind']} {info.get('model_type')} "
            f"{info.get('image_size')}px, {loaded.backend} {info.get('precision')}")
        entry: dict[str, Any] = {"spec": spec.text, **info, "intensity": loaded.intensity}
        entry["interactive"] = evaluate_interactive(
            loaded.predictor, _model_view(samples, loaded.intensity), prompts=prompts, iterations=iterations,
            start=start, seed=seed, max_objects_per_image=max_objects_per_image, progress=progress,
        )
        if everything:
            pred = loaded.predictor

            def segment(image: np.ndarray, pred=pred) -> np.ndarray:
                pred.set_image(image)
                return pred.segment_everything(**auto_opts)[0]

            entry["automatic"] = evaluate_automatic(segment, _model_view(samples, loaded.intensity),
                                                    progress=progress)
        if ais_params is not None:
            entry["ais"] = _evaluate_ais(loaded, samples, ais_params, progress, log)
        entry["seconds"] = round(time.perf_counter() - t0, 3)
        results[spec.name] = entry
        del loaded
        gc.collect()

    rows = summary_rows(results)
    report = {
        "format": "peftexport-evaluation",
        "peftexport_version": __version__,
        "data": {"dir": str(data_dir), "n_images": len(samples), "n_objects": n_objects,
                 "labels_are": labels_are, "max_images": max_images},
        "protocol": {"prompts": list(prompts), "start": start, "iterations": iterations, "seed": seed,
                     "max_objects_per_image": max_objects_per_image,
                     "everything": auto_opts if everything else None, "ais": ais_params},
        "rows": rows,
        "table": format_table(rows),
        "models": results,
    }
    report = _jsonable(report)
    write_outputs(report, json_out, markdown_out, plot_out, overwrite)
    return report


def _evaluate_ais(loaded: LoadedModel, samples: Sequence[RawSample], params: dict, progress: bool,
                  log: Callable[[str], None]) -> dict | None:
    """mSA / SA50 of micro-sam's AIS for one model, or None (logged) when it has no instance decoder."""
    pred = loaded.predictor
    if not getattr(pred, "has_instance_decoder", False):
        log(f"   {loaded.spec.name}: no instance decoder, AIS not scored")
        return None

    def segment(image: np.ndarray) -> np.ndarray:
        pred.set_image(image)
        return pred.segment_instances(**params)[0]

    return evaluate_automatic(segment, _model_view(samples, loaded.intensity), progress=progress)


def write_outputs(report: dict, json_out: str | Path | None = None, markdown_out: str | Path | None = None,
                  plot_out: str | Path | None = None, overwrite: bool = False) -> None:
    """JSON report, markdown table, and Dice-per-iteration plot (each written atomically)."""
    if json_out is not None:
        with atomic_file(json_out, overwrite=overwrite) as tmp:
            Path(tmp).write_text(json.dumps(report, indent=1, allow_nan=False))
    if markdown_out is not None:
        with atomic_file(markdown_out, overwrite=overwrite) as tmp:
            Path(tmp).write_text(markdown_report(report))
    if plot_out is not None:
        curves = {name: m["interactive"] for name, m in report["models"].items()}
        data = report.get("data", {})
        n_obj = max((m.get("n_objects", 0) for m in curves.values()), default=0)
        n_img = data.get("n_images", 0)
        plot_curves(curves, str(plot_out), overwrite=overwrite,
                    title=f"Iterative prompting on {Path(data.get('dir', '.')).name}: {n_img} image"
                          f"{'s' if n_img != 1 else ''}, {n_obj} objects")


def markdown_report(report: dict) -> str:
    """The table as markdown, with what was evaluated and how."""
    d, p = report["data"], report["protocol"]
    lines = [
        "# Evaluation",
        "",
        f"Data: `{d['dir']}` ({d['n_images']} images, {d['n_objects']} objects). "
        f"Prompts: {', '.join(p['prompts'])}; iterative: {p['iterations']} corrective points "
        f"from {p['start']}; seed {p['seed']}."
        + (" Automatic segmentation: mSA over IoU 0.5:0.95." if p.get("everything") else "")
        + (" AIS: micro-sam's instance decoder + watershed, mSA over IoU 0.5:0.95 (ais_msa) and SA at 0.5."
           if p.get("ais") else ""),
        "",
        to_markdown(report["rows"]),
        "",
        "| model | source | kind | backend | precision | image size |",
        "|---|---|---|---|---|---:|",
    ]
    for name, m in report["models"].items():
        lines.append(f"| {name} | `{m.get('source')}` | {m.get('kind')} | {m.get('backend')} | "
                     f"{m.get('precision')} | {m.get('image_size')} |")
    return "\n".join(lines) + "\n"
