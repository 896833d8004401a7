"""A shared-trunk export keeps what passed: a graph that fails its gate is left out with what runs after it,
listed in manifest.json's ``refused``, exit status 3; ``--strict`` keeps all or nothing (exit 2)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from peft_export.cli.main import app
from peft_export.errors import PeftExportError
from peft_export.export import gates
from peft_export.export.refusals import EXIT_REFUSED
from peft_export.runtime import SamSession

pytestmark = pytest.mark.slow  # two shared-trunk exports of the tiny model


def test_a_refused_trunk_precision_is_left_out_and_the_rest_written(tmp_path, monkeypatch):
    from test_shared_trunk import make_run

    runs = {name: make_run(tmp_path / "runs", name) for name in ("late", "dec")}
    # The int8 gate made impossible (cosine > 1), as the single-export tests force a gate: the trunk's
    # int8 is measured, fails, and the heads' int8 (run after it) go with it.
    monkeypatch.setitem(gates.THRESHOLDS["int8"], "embeddings_cosine", 1.01)
    args = ["merge-and-export", "--adapter", f"late={runs['late']}", "--adapter", f"dec={runs['dec']}",
            "--precision", "fp32,int8"]
    strict = CliRunner().invoke(app, args + ["--out", str(tmp_path / "strict"), "--strict"])
    assert strict.exit_code == 2 and "trunk int8 failed verification" in strict.output
    assert not (tmp_path / "strict").exists()

    out = tmp_path / "export"
    res = CliRunner().invoke(app, args + ["--out", str(out)])
    assert res.exit_code == EXIT_REFUSED == 3, res.output
    assert "refused: trunk int8 (embeddings_cosine" in res.output
    manifest = json.loads((out / "manifest.json").read_text())
    refused = {(r["graph"], r["precision"]) for r in manifest["refused"]}
    heads = {key for e in manifest["adapters"].values() for key in e["encoder"][1:]}
    assert refused == {("trunk", "int8")} | {(h, "int8") for h in heads}
    (trunk,) = [r for r in manifest["refused"] if r["graph"] == "trunk"]
    assert trunk["failed"][0]["measure"] == "embeddings_cosine" and trunk["failed"][0]["limit"] == 1.01
    assert set(manifest["graphs"]["trunk"]) == {"fp32"} and not list(out.glob("*.int8.onnx"))
    # What was written runs: fp32 for every adapter; int8 is refused by name.
    session = SamSession(out)
    session.set_image(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8))
    for name in runs:
        _, iou, _ = session.predict(point_coords=np.array([[80.0, 60.0]]), point_labels=np.array([1]), adapter=name)
        assert iou.shape == (3,) and np.isfinite(iou).all()
    with pytest.raises(PeftExportError, match="int8"):
        SamSession(out, precision="int8")
