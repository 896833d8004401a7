"""Segment a folder of images with an exported model: numpy + onnxruntime, no torch.

    python examples/segment_folder.py EXPORT_DIR IMAGES_DIR OUT_DIR --boxes boxes.csv
    python examples/segment_folder.py EXPORT_DIR IMAGES_DIR OUT_DIR --box 10,20,120,90
    python examples/segment_folder.py EXPORT_DIR IMAGES_DIR OUT_DIR --everything

boxes.csv has a header ``image,x0,y0,x1,y1`` and one row per object (``image`` is the file
name); boxes.json maps file names to lists of [x0, y0, x1, y1]. Each image gives
OUT_DIR/<name>_labels.tif (uint16, object i = the i-th box, or one id per found object).
"""

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import tifffile

from peft_export.runtime import SamSession

EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".npy")


def read_image(path: Path) -> np.ndarray:
    if path.suffix.lower() in (".tif", ".tiff"):
        return tifffile.imread(path)
    if path.suffix.lower() == ".npy":
        return np.load(path)
    from PIL import Image  # only needed for PNG/JPEG

    return np.asarray(Image.open(path))


def read_boxes(path: Path) -> dict:
    if path.suffix.lower() == ".json":
        return {name: np.asarray(b, float).reshape(-1, 4) for name, b in json.loads(path.read_text()).items()}
    boxes = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            boxes.setdefault(row["image"], []).append([float(row[k]) for k in ("x0", "y0", "x1", "y1")])
    return {name: np.asarray(b) for name, b in boxes.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export_dir")
    ap.add_argument("images", type=Path)
    ap.add_argument("out", type=Path)
    prompt = ap.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--boxes", type=Path, help="CSV or JSON of boxes per image")
    prompt.add_argument("--box", help="one box x0,y0,x1,y1 for every image")
    prompt.add_argument("--everything", action="store_true", help="segment every object")
    ap.add_argument("--points-per-side", type=int, default=32)
    ap.add_argument("--pred-iou-thresh", type=float, default=0.88)
    ap.add_argument("--stability-thresh", type=float, default=0.95)
    args = ap.parse_args()

    session = SamSession(args.export_dir)  # device="cuda" with onnxruntime-gpu
    boxes = read_boxes(args.boxes) if args.boxes else {}
    args.out.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in args.images.iterdir() if p.suffix.lower() in EXTENSIONS)
    for path in files:
        image = read_image(path)
        emb = session.encode(image)
        if args.everything:
            labels, objects = session.segment_everything(
                points_per_side=args.points_per_side, pred_iou_thresh=args.pred_iou_thresh,
                stability_score_thresh=args.stability_thresh, embedding=emb)
        else:
            b = np.asarray([float(v) for v in args.box.split(",")])[None] if args.box else boxes.get(path.name)
            if b is None:
                print(f"{path.name}: no boxes, skipped")
                continue
            # One decoder call for all boxes of the image; object i gets label i + 1.
            masks, scores, _ = session.predict_batch(boxes=b, multimask_output=False, embedding=emb)
            labels = np.zeros(image.shape[:2], np.int32)
            for i in np.argsort(-masks[:, 0].sum(axis=(1, 2))):  # smaller objects stay on top
                labels[masks[i, 0]] = i + 1
            objects = [{"box": bb.tolist(), "score": float(s)} for bb, s in zip(b, scores[:, 0])]
        tifffile.imwrite(args.out / f"{path.stem}_labels.tif", labels.astype(np.uint16))
        (args.out / f"{path.stem}_objects.json").write_text(json.dumps(objects, indent=1))
        print(f"{path.name}: {len(objects)} objects")
    return 0


if __name__ == "__main__":
    sys.exit(main())
