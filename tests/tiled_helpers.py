"""Shared by test_tiled*.py, test_distributed*.py and test_volume.py: one tiny export with an
instance decoder (model input 128) per test session, a nuclei mosaic larger than a tile, a
re-export into the same folder, and Ctrl-C sent to a resumable `predict` run midway."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from peft_export.data import synthetic_mosaic


def ais_export_dir(tmp_path_factory) -> Path:
    """The tiny LoRA + instance-decoder export of test_ais_runtime (fp32), built once per session."""
    out = tmp_path_factory.getbasetemp() / "tiled_ais_export"
    if not (out / "manifest.json").is_file():
        import torch

        from peft_export.export import merge_and_export
        from test_ais_runtime import ais_adapted

        torch.set_num_threads(1)
        merge_and_export(ais_adapted(), out, precisions=("fp32",), progress=False)
    return out


def nuclei_mosaic(h: int, w: int, seed: int = 0, uint8: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """An h x w image of the demo's nuclei at native scale (256-px synthetic samples side by
    side) and its instance labels (unique over the mosaic)."""
    image, labels = synthetic_mosaic(h, w, seed, row_seed_stride=100)
    if uint8:
        image = (image.astype(np.float64) / max(int(image.max()), 1) * 255).astype(np.uint8)
    return image, labels


def reexport_other_decoder(export_dir: Path, shift: float = 1.5) -> None:
    """Stand-in for a re-export of another model into the same folder: the instance decoder's
    output bias moved (foreground and centre-distance logits shifted), its file rewritten and the
    manifest's sha256 / bytes updated, as merge_and_export would write them."""
    import json

    import onnx
    from onnx import numpy_helper

    from peft_export.fsutil import sha256_file

    manifest_path = export_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    entry = manifest["graphs"]["ais_decoder"]["fp32"]
    graph_path = export_dir / entry["path"]
    model = onnx.load(str(graph_path))
    for init in model.graph.initializer:
        if init.name == "out_conv.bias":
            bias = numpy_helper.to_array(init).copy()
            bias[:2] += np.float32(shift)
            init.CopyFrom(numpy_helper.from_array(bias, init.name))
    onnx.save(model, str(graph_path))
    digest, size = sha256_file(graph_path), graph_path.stat().st_size
    entry.update(sha256=digest, bytes=size, files=[{"path": entry["path"], "sha256": digest, "bytes": size}])
    manifest_path.write_text(json.dumps(manifest, indent=1))


def interrupt_predict(args: list, partial: Path, step: str) -> tuple[int, str]:
    """``peftexport predict ARGS`` in a fresh process, sent SIGINT (Ctrl-C) once the first marker
    of ``step`` (e.g. ``tile``, ``planes``) is in ``partial``; its exit code and stderr."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "peft_export.cli", "predict", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = partial / "_work" / "done"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not any(done.glob(f"{step}_*")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err
