"""``peftexport evaluate --3d`` and ``--track``: exports on labelled z-stacks and movies.

- ``evaluate_volumes``: automatic 3D segmentation (``volume.segment_volume``) scored with 3D mSA and
  SA50 against the 3D labels, beside the same model's per-plane mSA (each plane's own segmentation
  before the merge against that plane of the labels, averaged over planes holding objects): the
  merge should lose little against segmenting planes alone.
- ``evaluate_tracking``: ``volume.track`` on each movie, scored with the Cell Tracking Challenge's
  TRA and DET (traccuracy's ``CTCMetrics``) and division F1 (``DivisionMetrics``) against the
  tracked labels and their lineage (``labels/NAME.tif`` + ``labels/NAME_track.txt``; without the
  track file, each label's frames form one track without parents).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from ..errors import PeftExportError
from .large import large_pairs
from .metrics import mean_segmentation_accuracy


def _exports(models: Sequence[str]) -> List[Any]:
    from .specs import parse_model_specs

    specs = parse_model_specs(list(models))
    for spec in specs:
        if spec.kind != "export":
            raise PeftExportError(f"{spec.text}: stacks (--3d, --track) are evaluated with export dirs (the "
                                  "torch-free runtime); export the model first")
    return specs


def _stacks(data_dir: Any, kind: str, axes: Optional[str]) -> List[tuple]:
    from ..volume.stacks import open_stack

    out = []
    for name, img, lab in large_pairs(data_dir):  # every pair checked before any model runs
        image, labels = open_stack(img, kind, axes), open_stack(lab, kind, axes)
        if labels.shape != image.shape[:3]:
            raise PeftExportError(f"{lab}: labels {labels.shape} and image {image.shape[:3]} differ")
        out.append((name, image, lab, np.asarray(labels.read(slice(None))).astype(np.int64)))
    return out


def _table(header: List[str], rows: List[List[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] +
                     ["| " + " | ".join(r) + " |" for r in rows])


def evaluate_volumes(models: Sequence[str], data_dir: Any, mode: str = "auto", merge: Optional[Dict[str, Any]] = None,
                     axes: Optional[str] = None, backend: str = "onnxruntime",
                     log: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """3D mSA / SA50 of each export's automatic 3D segmentation, and its per-plane mSA."""
    from ..runtime import SamSession
    from ..volume import segment_volume
    from ..volume.merge import relabel_volume

    specs, stacks = _exports(models), _stacks(data_dir, "z", axes)
    rows = []
    for spec in specs:
        session = SamSession(spec.source, backend=backend, precision=spec.precision or "fp32")
        per_volume = []
        for name, stack, _, gt in stacks:
            merged, planes = segment_volume(session, stack, mode, adapter=spec.adapter, return_planes=True,
                                            **(merge or {}))
            msa, per = mean_segmentation_accuracy(merged, gt)
            planar = [mean_segmentation_accuracy(relabel_volume(planes[z]), gt[z])[0] for z in range(len(gt))
                      if gt[z].any()]
            per_volume.append({"volume": name, "msa_3d": msa, "sa50_3d": per[0.5], "msa_planes": float(np.mean(planar)),
                               "objects": int(merged.max()), "objects_gt": int(len(np.unique(gt)) - 1)})
            if log is not None:
                log(f"{spec.name} {name}: 3D mSA {msa:.3f}, per-plane mSA {per_volume[-1]['msa_planes']:.3f}")
        rows.append({"model": spec.name, **{k: float(np.mean([v[k] for v in per_volume]))
                                            for k in ("msa_3d", "sa50_3d", "msa_planes")}, "volumes": per_volume})
    table = _table(["model", "volumes", "3D mSA", "3D SA50", "per-plane mSA"],
                   [[r["model"], str(len(r["volumes"])), f"{r['msa_3d']:.3f}", f"{r['sa50_3d']:.3f}",
                     f"{r['msa_planes']:.3f}"] for r in rows])
    return {"data": {"dir": str(data_dir), "n_volumes": len(stacks)}, "mode": "3d", "merge": merge or {},
            "rows": rows, "table": table}


def _lineage_of(labels: np.ndarray, track_file: Path) -> List[tuple]:
    from ..data.ctc import read_ctc_tracks

    if track_file.is_file():
        return read_ctc_tracks(track_file)
    ids = np.unique(labels)
    ids = ids[ids > 0]
    present = [(np.unique(frame)) for frame in labels]
    out = []
    for k in ids.tolist():
        frames = [t for t, p in enumerate(present) if k in p]
        out.append((k, frames[0], frames[-1], 0))
    return out


def _ctc_dir(root: Path, labels: np.ndarray, lineage: List[tuple]) -> Path:
    import tifffile

    from ..data.ctc import write_ctc_tracks

    root.mkdir()
    for t, frame in enumerate(labels):
        tifffile.imwrite(root / f"mask{t:03d}.tif", frame.astype(np.uint32 if labels.max() >= 2**16 else np.uint16))
    write_ctc_tracks(root / "res_track.txt", lineage)
    return root


def tracking_scores(pred_labels: np.ndarray, pred_lineage: List[tuple], gt_labels: np.ndarray,
                    gt_lineage: List[tuple]) -> Dict[str, float]:
    """TRA, DET (CTC) and division F1 of a tracking result against the ground truth (traccuracy)."""
    try:
        from traccuracy import run_metrics
        from traccuracy.loaders import load_ctc_data
        from traccuracy.matchers import CTCMatcher, IOUMatcher
        from traccuracy.metrics import CTCMetrics, DivisionMetrics
    except ImportError as exc:
        raise PeftExportError(f"--track: {exc.name or 'traccuracy'} is not installed; pip install "
                              "'peftexport[volume]'") from None
    with tempfile.TemporaryDirectory() as tmp:
        gt = load_ctc_data(str(_ctc_dir(Path(tmp) / "gt", gt_labels, gt_lineage)))
        pred = load_ctc_data(str(_ctc_dir(Path(tmp) / "pred", pred_labels, pred_lineage)))
        results, _ = run_metrics(gt, pred, matcher=CTCMatcher(), metrics=[CTCMetrics()])
        # division F1 needs a one-to-one matching of the objects (IoU > 0.5 is one-to-one by itself)
        results += run_metrics(gt, pred, matcher=IOUMatcher(iou_threshold=0.5, one_to_one=True),
                               metrics=[DivisionMetrics()])[0]
    by_name = {r["metric"]["name"]: r["results"] for r in results}
    ctc, div = by_name["CTCMetrics"], by_name["DivisionMetrics"]
    f1 = next((v.get("Division F1") for k, v in div.items() if isinstance(v, dict) and "Division F1" in v),
              div.get("Division F1"))
    return {"TRA": float(ctc["TRA"]), "DET": float(ctc["DET"]),
            "division_f1": float(f1) if f1 is not None else float("nan")}


def evaluate_tracking(models: Sequence[str], data_dir: Any, mode: str = "auto", axes: Optional[str] = None,
                      tracking: Optional[Dict[str, Any]] = None, backend: str = "onnxruntime",
                      log: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """TRA, DET and division F1 of each export's tracking on labelled movies."""
    from ..runtime import SamSession
    from ..volume import track

    specs, movies = _exports(models), _stacks(data_dir, "t", axes)
    rows = []
    for spec in specs:
        session = SamSession(spec.source, backend=backend, precision=spec.precision or "fp32")
        per_movie = []
        for name, stack, lab, gt in movies:
            result = track(session, stack, mode, adapter=spec.adapter, **(tracking or {}))
            track_file = Path(lab).with_name(Path(lab).name.rsplit(".", 1)[0] + "_track.txt")
            scores = tracking_scores(result.labels, result.lineage, gt, _lineage_of(gt, track_file))
            per_movie.append({"movie": name, **scores, "tracks": result.n_tracks, "divisions": result.n_divisions})
            if log is not None:
                log(f"{spec.name} {name}: TRA {scores['TRA']:.3f}, DET {scores['DET']:.3f}")
        rows.append({"model": spec.name, **{k: float(np.mean([m[k] for m in per_movie]))
                                            for k in ("TRA", "DET", "division_f1")}, "movies": per_movie})
    table = _table(["model", "movies", "TRA", "DET", "division F1"],
                   [[r["model"], str(len(r["movies"])), f"{r['TRA']:.3f}", f"{r['DET']:.3f}",
                     f"{r['division_f1']:.3f}"] for r in rows])
    return {"data": {"dir": str(data_dir), "n_movies": len(movies)}, "mode": "track", "rows": rows, "table": table}
