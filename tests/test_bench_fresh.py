"""The bench harness: every case in a fresh worker process, machine load around each, run labels."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from helpers import MERGEABLE_CONFIGS, make_adapted
from peft_export.bench import format_table, read_result, run_bench, write_json
from peft_export.bench.load import BUSY_OTHERS_FRACTION, LoadSnapshot, load_between
from peft_export.bench.report import busy_warnings, table_rows
from peft_export.cli.main import app
from peft_export.errors import PeftExportError

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from peft_export.export import merge_and_export

    root = tmp_path_factory.mktemp("fresh")
    adapted = make_adapted(MERGEABLE_CONFIGS["lora"], image_size=128)
    merge_and_export(adapted, root / "export", precisions=["fp32"], progress=False)
    return adapted, root / "export"


@pytest.mark.slow  # worker processes / full exports
def test_each_case_runs_in_its_own_process_and_records_load(tiny, tmp_path):
    adapted, export = tiny
    result = run_bench(export_dir=export, adapted=adapted, backends=["torch", "onnxruntime"], precisions=["fp32"],
                       components=["encoder", "decoder_box"], iterations=2, warmup=1, intra_op_threads=1,
                       label="quiet-run")
    ok = [c for c in result["cases"] if c["status"] == "ok"]
    assert {c["case"] for c in ok} == {"base torch fp32", "unmerged torch fp32", "merged torch fp32",
                                       "merged torch fp32 (freed memory kept)", "export onnxruntime-cpu fp32"}
    assert result["settings"]["fresh_process"] is True and result["label"] == "quiet-run"
    pids = {c["process"]["pid"] for c in ok}
    assert len(pids) == len(ok) and os.getpid() not in pids  # one new process per case
    by = {c["case"]: c for c in ok}
    # An ONNX Runtime worker never loads torch, so its peak memory is the runtime's own.
    assert by["export onnxruntime-cpu fp32"]["process"]["torch_imported"] is False
    assert by["merged torch fp32"]["process"]["torch_imported"] is True
    for c in ok:
        assert c["process"]["peak_rss_mb"] >= c["process"]["rss_at_start_mb"] > 0
        assert set(c["components"]) == {"encoder", "decoder_box"}
        assert all(s["n"] == 2 and s["median_ms"] > 0 for s in c["components"].values())
        load = c["load"]
        assert len(load["loadavg_before"]) == 3 and len(load["loadavg_after"]) == 3
        assert 0.0 <= load["steal_fraction"] <= 1.0 and 0.0 <= load["others_cpu_fraction"] <= 1.0
        assert isinstance(load["busy"], bool) and load["wall_s"] > 0
    assert result["load"]["wall_s"] >= sum(c["load"]["wall_s"] for c in ok) - 1
    # The JSON is what bench-compare reads back.
    write_json(tmp_path / "r.json", result)
    again = read_result(tmp_path / "r.json")
    assert again["cases"][0]["load"] == result["cases"][0]["load"]
    table = format_table(again)
    assert "each case in a fresh process" in table and "process peak MB" in table


def test_a_worker_that_dies_is_a_failed_case_and_the_others_go_on(tiny, tmp_path):
    import shutil

    _, export = tiny
    broken = tmp_path / "broken"
    shutil.copytree(export, broken)
    (broken / "encoder.onnx").write_bytes(b"not a graph")
    result = run_bench(export_dir=broken, backends=["onnxruntime"], components=["decoder_box"], iterations=1)
    case = result["cases"][0]
    assert case["status"] == "failed" and "encoder.onnx" in case["reason"]
    assert case["load"]["wall_s"] > 0


def test_interleave_stays_in_one_process(tiny):
    _, export = tiny
    result = run_bench(export_dir=export, backends=["onnxruntime"], components=["encoder"], iterations=1,
                       interleave=True)
    assert result["settings"]["fresh_process"] is False and "process" not in result["cases"][0]
    assert result["load"]["busy"] in (True, False)
    with pytest.raises(PeftExportError, match="interleave"):
        run_bench(export_dir=export, backends=["onnxruntime"], interleave=True, fresh_process=True)


def _snap(wall, busy, steal, total, own):
    return LoadSnapshot(wall, (1.0, 1.0, 1.0), busy, steal, total, own)


def test_load_between_counts_only_other_processes():
    hz = os.sysconf("SC_CLK_TCK")
    # 10 s on 2 CPUs = 20 s of CPU time; we used 12 s ourselves, the machine was busy 14 s in all.
    before, after = _snap(0, 0, 0, 0, 0.0), _snap(10, 14 * hz, 0, 20 * hz, 12.0)
    quiet = load_between(before, after)
    assert quiet["others_cpu_fraction"] == pytest.approx(0.1, abs=1e-3)
    assert quiet["busy"] is (0.1 > BUSY_OTHERS_FRACTION)
    busy = load_between(before, _snap(10, 19 * hz, 0, 20 * hz, 12.0))
    assert busy["others_cpu_fraction"] == pytest.approx(0.35, abs=1e-3) and busy["busy"] is True
    stolen = load_between(before, _snap(10, 12 * hz, 2 * hz, 20 * hz, 12.0))
    assert stolen["steal_fraction"] == pytest.approx(0.1) and stolen["busy"] is True
    unknown = load_between(LoadSnapshot(0, None, None, None, None, 0.0), _snap(1, 1, 0, 2, 0.0))
    assert unknown["busy"] is None


def _result(busy: bool, label=None):
    load = {"wall_s": 10.0, "loadavg_before": [2.5, 1, 1], "loadavg_after": [3.0, 1, 1],
            "steal_fraction": 0.0, "others_cpu_fraction": 0.4 if busy else 0.01, "busy": busy}
    case = {"case": "export onnxruntime-cpu fp32", "model": "export", "backend": "onnxruntime", "precision": "fp32",
            "status": "ok", "load": load, "process": {"peak_rss_mb": 1234.0},
            "components": {"encoder": {"median_ms": 100.0, "p90_ms": 110.0, "p99_ms": 120.0,
                                       "throughput_per_s": 10.0, "throughput_unit": "images/s", "peak_mb": 900.0,
                                       "ratio_vs_reference": 1.0}}}
    return {"format": "peftexport-bench", "format_version": 1, "date": "2026-11-27T00:00:00+00:00", "label": label,
            "machine": {"cpu": "AMD EPYC", "cpu_count_usable": 2, "gpu": None}, "versions": {},
            "settings": {"device": "cpu", "model_type": "vit_b", "image_size": 1024, "fresh_process": True},
            "reference": "export onnxruntime-cpu fp32", "load": load, "cases": [case]}


def test_busy_cases_are_flagged_in_the_table():
    busy = _result(True)
    row = table_rows(busy)[0]
    assert row["busy"] == "BUSY 40%" and row["process_peak_mb"] == 1234.0
    text = format_table(busy)
    assert "BUSY 40%" in text and "1234" in text
    assert busy_warnings(busy) == [
        "warning: export onnxruntime-cpu fp32 ran while the machine was busy (others 40% of the CPUs, steal 0%, "
        "load 2.50 -> 3.00); its figures are not comparable"]
    assert busy_warnings(_result(False)) == [] and "BUSY" not in format_table(_result(False))
    assert "- warning: export onnxruntime-cpu fp32 ran while" in format_table(busy, markdown=True)


def test_bench_compare_labels(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_result(False, label="own-label")))
    b.write_text(json.dumps(_result(True)))
    res = runner.invoke(app, ["bench-compare", str(a), str(b)])
    assert res.exit_code == 0, res.output
    assert "own-label (AMD EPYC x2)" in res.output and "b (AMD EPYC x2)" in res.output  # run label, else file name
    res = runner.invoke(app, ["bench-compare", str(a), str(b), "--label", "quiet", "--label", "busy"])
    assert res.exit_code == 0, res.output
    assert "quiet (AMD EPYC x2)" in res.output and "busy (AMD EPYC x2)" in res.output
    assert "machine load others 40% of the CPUs" in res.output and "BUSY 40%" in res.output
    res = runner.invoke(app, ["bench-compare", str(a), str(b), "--label", "only-one"])
    assert res.exit_code == 2 and "--label: 1 label(s) for 2 file(s)" in res.output
    res = runner.invoke(app, ["bench-compare", str(a), str(b), "--label", "x", "--label", "x"])
    assert res.exit_code == 2 and "labels must differ" in res.output
