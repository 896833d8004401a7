"""Quality of volumes and tracking (issue 33) with a trained model on the synthetic data.

    peftexport demo --out demo --instances          # trains the tiny model with its instance decoder (AIS)
    python benchmarks/volume_quality.py --export demo/export --out volume_quality/ [--volumes 4] [--movies 2]

Figures, each beside its target (bench_volume_quality.json / .md in --out):

- automatic 3D mSA on synthetic nuclei volumes (``make_volume_data``: 32 x 256 x 256, z sampled 2x
  coarser) within 0.05 of the same model's per-plane mSA (``evaluate --3d`` reports both);
- one click per object + propagation (micro-sam's annotator defaults: single_point, IoU 0.5, box
  extension 0.05): the click on the object's largest plane, at its point farthest from the
  boundary; the share of objects recovered with 3D IoU >= 0.8 (target >= 90 %);
- tracking on synthetic movies (``make_movie_data``: 20 frames of 256², moving and dividing nuclei):
  TRA (target >= 0.95), DET and division F1 (traccuracy).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = {"msa_gap": 0.05, "click_iou": 0.8, "click_share": 0.9, "tra": 0.95}


def click_and_propagate(export: Path, data: Path, projection: str = "single_point") -> dict:
    from scipy import ndimage

    from peft_export.runtime import SamSession
    from peft_export.volume import VolumeEmbeddings, masks_from_prompts, open_stack, segment_object_in_volume

    session = SamSession(export)
    ious, own, clicks, reach, spill = [], [], [], [], []
    for img in sorted((data / "images").glob("*.tif")):
        gt = np.asarray(open_stack(data / "labels" / img.name).read(slice(None)))
        vol = VolumeEmbeddings(session, open_stack(img))
        vol.compute()
        for k in np.unique(gt)[1:]:
            obj = gt == k
            z = int(np.argmax(obj.sum(axis=(1, 2))))
            dist = ndimage.distance_transform_edt(obj[z])
            y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
            masks = masks_from_prompts(vol, {z: {"points": np.array([[x, y]], float), "labels": np.array([1])}})
            seg, _ = segment_object_in_volume(vol, masks, projection=projection)
            inter, union = np.logical_and(seg == 1, obj).sum(), np.logical_or(seg == 1, obj).sum()
            ious.append(float(inter / union) if union else 0.0)
            # Where a miss comes from: the click's own 2D mask, and the planes the propagation reached
            m2 = masks[z] == 1
            clicks.append(float(np.logical_and(m2, obj[z]).sum() / max(np.logical_or(m2, obj[z]).sum(), 1)))
            gt_planes, seg_planes = obj.any(axis=(1, 2)), (seg == 1).any(axis=(1, 2))
            reach.append(float((gt_planes & seg_planes).sum() / gt_planes.sum()))
            spill.append(float((seg_planes & ~gt_planes).sum() / gt_planes.sum()))
            # The 3D IoU the masks would have had had the propagation stopped at the object's own ends
            inside = (seg == 1) & gt_planes[:, None, None]
            own.append(float(np.logical_and(inside, obj).sum() / np.logical_or(inside, obj).sum()))
    ious = np.array(ious)
    return {"objects": len(ious), "mean_iou": float(ious.mean()), "share_iou_0.8": float((ious >= 0.8).mean()),
            "share_iou_0.8_own_planes": float((np.array(own) >= 0.8).mean()),
            "click_plane_iou_mean": float(np.mean(clicks)), "planes_reached_mean": float(np.mean(reach)),
            "planes_beyond_mean": float(np.mean(spill))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--volumes", type=int, default=4)
    ap.add_argument("--movies", type=int, default=2)
    ap.add_argument("--depth", type=int, default=32)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--parts", default="3d,click,track", help="comma-separated: 3d, click, track")
    ap.add_argument("--projection", default="single_point", help="click + propagation: how a mask becomes the "
                    "next plane's prompt (single_point, points, box, mask, points_and_mask)")
    args = ap.parse_args()
    parts = set(args.parts.split(","))

    from peft_export.data import make_movie_data, make_volume_data
    from peft_export.evaluation.volume import evaluate_tracking, evaluate_volumes

    args.out.mkdir(parents=True, exist_ok=True)
    vols, movies = args.out / "volumes", args.out / "movies"
    make_volume_data(vols, args.volumes, (args.depth, args.size, args.size), seed=100, overwrite=True)
    make_movie_data(movies, args.movies, args.frames, args.size, seed=200, overwrite=True)
    report = {"export": str(args.export), "load_average": os.getloadavg(), "targets": TARGETS,
              "projection": args.projection}
    rows = ["| figure | measured | target |", "|---|---|---|"]
    if "3d" in parts:
        three_d = evaluate_volumes([str(args.export)], vols, log=print)["rows"][0]
        report["3d"] = {k: three_d[k] for k in ("msa_3d", "sa50_3d", "msa_planes")}
        gap = report["3d"]["msa_planes"] - report["3d"]["msa_3d"]
        rows.append(f"| automatic 3D mSA / per-plane mSA | {report['3d']['msa_3d']:.3f} / "
                    f"{report['3d']['msa_planes']:.3f} (gap {gap:+.3f}) | gap <= {TARGETS['msa_gap']} |")
    if "click" in parts:
        c = report["click"] = click_and_propagate(args.export, vols, args.projection)
        print("click + propagation", c)
        rows.append(f"| one click + propagation ({args.projection}): objects with 3D IoU >= 0.8 | "
                    f"{100 * c['share_iou_0.8']:.0f} % of {c['objects']} (mean IoU {c['mean_iou']:.3f}; the click's "
                    f"own plane {c['click_plane_iou_mean']:.3f}; planes reached {100 * c['planes_reached_mean']:.0f} %, "
                    f"beyond the object {100 * c['planes_beyond_mean']:.0f} %; stopped at the object's ends: "
                    f"{100 * c['share_iou_0.8_own_planes']:.0f} %) | >= 90 % |")
    if "track" in parts:
        tracking = evaluate_tracking([str(args.export)], movies, log=print)["rows"][0]
        t = report["tracking"] = {k: tracking[k] for k in ("TRA", "DET", "division_f1")}
        rows.append(f"| tracking TRA / DET / division F1 | {t['TRA']:.3f} / {t['DET']:.3f} / {t['division_f1']:.3f} "
                    f"| TRA >= {TARGETS['tra']} |")
    table = report["table"] = "\n".join(rows)
    (args.out / "bench_volume_quality.json").write_text(json.dumps(report, indent=1))
    (args.out / "bench_volume_quality.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
