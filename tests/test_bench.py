"""peftexport bench: case planning, ratios, tables, the command on the tiny model, bench-compare."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from typer.testing import CliRunner

from peft_export.cli.main import app
from helpers import MERGEABLE_CONFIGS, make_adapted
from peft_export.peft.adapters import save_adapter
from peft_export.bench import (
    Availability,
    BenchInputs,
    CaseSpec,
    add_ratios,
    compare_results,
    expand_components,
    format_rows,
    pick_reference,
    plan_cases,
    ratio,
    run_bench,
    table_rows,
)
from peft_export.errors import PeftExportError

# Each test exports or trains (tiny models, seconds to a minute): slow, still run in CI.
pytestmark = pytest.mark.slow

runner = CliRunner()

CPU_ONLY = Availability(cuda=False, onnxruntime=True, ort_providers=("CPUExecutionProvider",), tensorrt=False,
                        glibc=True, cxx=True)
CUDA_NO_ORT_GPU = Availability(cuda=True, cuda_bf16=True, onnxruntime=True, ort_providers=("CPUExecutionProvider",),
                               tensorrt=False)


def _names(specs):
    return [s.name for s in specs]


def _reasons(skipped):
    return {s["case"]: s["reason"] for s in skipped}


# ---- planning and skip records ------------------------------------------------------------


def test_plan_cpu_all_backends():
    # torch at its best on the CPU too: once more with freed memory kept, and compiled
    run, skipped = plan_cases(["torch", "torch-compile", "onnxruntime", "tensorrt"], "cpu", None, CPU_ONLY,
                              ["base", "unmerged", "merged"], export_precisions=["fp32", "int8"])
    assert _names(run) == ["base torch fp32", "unmerged torch fp32", "merged torch fp32",
                           "merged torch fp32 (freed memory kept)", "merged torch-compile fp32",
                           "export onnxruntime-cpu fp32", "export onnxruntime-cpu int8"]
    assert [s.malloc for s in run if s.backend == "torch"] == ["", "", "", "keep"]
    reasons = _reasons(skipped)
    assert set(reasons) == {"export tensorrt fp16"}
    assert "--device cuda" in reasons["export tensorrt fp16"]
    assert all(s["status"] == "skipped" and s["components"] == {} for s in skipped)
    # where the best torch cannot be had, the case says why
    no_tools = Availability(cuda=False, onnxruntime=True, ort_providers=("CPUExecutionProvider",))
    run, skipped = plan_cases(["torch", "torch-compile"], "cpu", None, no_tools, ["merged"])
    reasons = _reasons(skipped)
    assert _names(run) == ["merged torch fp32"]
    assert "C++ compiler" in reasons["merged torch-compile fp32"]
    assert "glibc" in reasons["merged torch fp32 (freed memory kept)"]
    tuned = Availability(cuda=False, onnxruntime=True, glibc=True, malloc_tuned=True, cxx=True)
    assert "already tunes malloc" in _reasons(plan_cases(["torch"], "cpu", None, tuned, ["merged"])[1])[
        "merged torch fp32 (freed memory kept)"]
    in_process = _reasons(plan_cases(["torch"], "cpu", None, CPU_ONLY, ["merged"], fresh_process=False)[1])
    assert "fresh process" in in_process["merged torch fp32 (freed memory kept)"]


def test_plan_cuda_without_gpu_providers_skips_with_reasons():
    run, skipped = plan_cases(["torch", "torch-compile", "onnxruntime", "tensorrt"], "cuda", ["fp32", "bf16", "int8"],
                              CUDA_NO_ORT_GPU, ["unmerged", "merged"], export_precisions=["fp32", "int8"],
                              engine_precisions=[])
    assert _names(run) == ["unmerged torch fp32", "unmerged torch bf16", "merged torch fp32", "merged torch bf16",
                           "merged torch-compile fp32", "merged torch-compile bf16"]
    reasons = _reasons(skipped)
    for prec in ("fp32", "int8"):
        assert "CUDAExecutionProvider is not available" in reasons[f"export onnxruntime-cuda {prec}"]
        assert "onnxruntime-gpu" in reasons[f"export onnxruntime-cuda {prec}"]
        assert "TensorrtExecutionProvider" in reasons[f"export onnxruntime-tensorrt {prec}"]
    assert "tensorrt package is not installed" in reasons["export tensorrt fp32"]


def test_plan_cuda_without_native_bf16_skips_bf16_with_the_reason():
    pre_ampere = Availability(cuda=True, cuda_bf16=False, onnxruntime=False)
    run, skipped = plan_cases(["torch", "torch-compile"], "cuda", None, pre_ampere, ["base", "merged"])
    assert _names(run) == ["base torch fp32", "merged torch fp32", "merged torch-compile fp32"]
    reasons = _reasons(skipped)
    assert set(reasons) == {"base torch bf16", "merged torch bf16", "merged torch-compile bf16"}
    assert all("no native bf16" in r and "is_bf16_supported" in r for r in reasons.values())


def test_detect_availability_reports_bf16_only_with_cuda():
    import torch

    from peft_export.bench import detect_availability

    av = detect_availability()
    assert av.cuda_bf16 == (av.cuda and torch.cuda.is_bf16_supported(including_emulation=False))


def test_plan_unmergeable_and_missing_precision_and_no_model():
    run, skipped = plan_cases(["torch", "onnxruntime"], "cpu", ["fp32", "fp16"], CPU_ONLY,
                              ["base", "unmerged", "merged"], unmergeable_reason="adaptformer cannot be merged",
                              export_precisions=["fp32", "int8"])
    assert _names(run) == ["base torch fp32", "unmerged torch fp32", "unmerged torch fp32 (freed memory kept)",
                           "export onnxruntime-cpu fp32"]
    reasons = _reasons(skipped)
    assert reasons["merged torch fp32"] == "adaptformer cannot be merged"
    assert reasons["export onnxruntime-cpu fp16"] == "the export has no fp16 encoder graph"

    run, skipped = plan_cases(["torch"], "cpu", None, CPU_ONLY, [])
    assert run == [] and "--adapter" in skipped[0]["reason"]
    with pytest.raises(PeftExportError, match="no CUDA device"):
        plan_cases(["torch"], "cuda", None, CPU_ONLY, ["merged"])


def test_plan_without_onnxruntime():
    av = Availability(cuda=False, onnxruntime=False)
    run, skipped = plan_cases(["onnxruntime"], "cpu", None, av, [], export_precisions=["fp32"])
    assert run == [] and "onnxruntime is not installed" in skipped[0]["reason"]


def test_components_and_inputs():
    assert expand_components(["encoder", "decoder_boxes"], [4, 32]) == ["encoder", "decoder_boxes_b4", "decoder_boxes_b32"]
    with pytest.raises(PeftExportError, match="unknown 'decoder'"):
        expand_components(["decoder"], [4])
    inp = BenchInputs(64, (3,), seed=1)
    assert inp.image.shape == (48, 64, 3) and inp.image.dtype.name == "uint8" and inp.image.std() > 10
    assert inp.encoder_input.shape == (1, 3, 64, 64)
    coords, labels = inp.decoder_prompts("decoder_boxes_b3")
    assert coords.shape == (3, 2, 2) and (labels == [[2, 3]] * 3).all()
    assert (coords[:, 1] > coords[:, 0]).all() and coords.max() <= 64
    coords, labels = inp.decoder_prompts("decoder_point")
    assert labels.tolist() == [[1, -1]]


# ---- aggregation on known inputs -----------------------------------------------------------


def _case(name, model, backend, precision, comps, status="ok"):
    return {"case": name, "model": model, "backend": backend, "precision": precision, "status": status,
            "reason": None if status == "ok" else "why",
            "components": {c: {"median_ms": m, "p90_ms": m * 1.1, "p99_ms": m * 1.2, "throughput_per_s": 1000 / m,
                               "throughput_unit": "images/s", "peak_mb": 10.0} for c, m in comps.items()}}


def test_reference_and_ratios_known_values():
    cases = [
        _case("export onnxruntime-cpu fp32", "export", "onnxruntime", "fp32", {"encoder": 40.0, "end_to_end": 50.0}),
        _case("base torch fp32", "base", "torch", "fp32", {"encoder": 100.0, "end_to_end": 200.0}),
        _case("merged torch fp32", "merged", "torch", "fp32", {"encoder": 101.0, "end_to_end": 220.0}),
        _case("merged torch fp32 (freed memory kept)", "merged", "torch", "fp32", {"encoder": 80.0, "end_to_end": 210.0}),
        _case("unmerged torch fp32", "unmerged", "torch", "fp32", {"encoder": 125.0, "decoder_box": 3.0}),
        _case("merged torch-compile fp32", "merged", "torch-compile", "fp32", {"encoder": 90.0, "decoder_box": 2.5}),
        _case("export tensorrt fp16", "export", "tensorrt", "fp16", {}, status="skipped"),
        _case("export openvino-cpu fp32", "export", "openvino", "fp32", {"encoder": 30.0, "decoder_point": 1.0}),
    ]
    ref = pick_reference(cases)
    # per component the fastest torch case; a component no torch case timed: the first case that did
    assert ref == {"encoder": "merged torch fp32 (freed memory kept)", "end_to_end": "base torch fp32",
                   "decoder_box": "merged torch-compile fp32", "decoder_point": "export openvino-cpu fp32"}
    add_ratios(cases, ref)
    c = {x["case"]: x["components"] for x in cases}
    assert c["export onnxruntime-cpu fp32"]["encoder"]["ratio_vs_reference"] == 0.5
    assert c["export onnxruntime-cpu fp32"]["end_to_end"]["ratio_vs_reference"] == 0.25
    assert c["merged torch fp32"]["encoder"]["ratio_vs_reference"] == 1.2625
    assert c["unmerged torch fp32"]["decoder_box"]["ratio_vs_reference"] == 1.2
    assert c["export openvino-cpu fp32"]["decoder_point"]["ratio_vs_reference"] == 1.0
    assert ratio(cases, "base torch fp32", "export onnxruntime-cpu fp32") == 2.5
    assert ratio(cases, "merged torch fp32", "unmerged torch fp32", "end_to_end") is None
    # one case for every component (bench format 1, benchmark scripts) still works
    add_ratios(cases, "base torch fp32")
    assert c["merged torch fp32"]["encoder"]["ratio_vs_reference"] == 1.01
    assert c["unmerged torch fp32"]["decoder_box"]["ratio_vs_reference"] is None  # base did not time it
    assert pick_reference(cases[6:7]) == {}  # skipped cases never are a reference
    # the header says which torch case each ratio is against
    from peft_export.bench.report import describe_reference

    line = describe_reference({"cases": cases, "reference": ref})
    assert "'merged torch fp32 (freed memory kept)' (encoder)" in line and "'base torch fp32' (end_to_end)" in line

    rows = table_rows({"cases": cases})
    assert [r["status"] for r in rows].count("skipped") == 1 and len(rows) == 1 + 14  # 14 timed components
    text = format_rows(rows)
    assert "skipped: export tensorrt fp16 -- why" in text
    md = format_rows(rows, markdown=True).splitlines()
    assert md[0].startswith("| case | component | median ms") and len(md) == 2 + len(rows)
    assert "| merged torch fp32 | encoder | 101.00 | 111.10 | 121.20 |" in "\n".join(md)


# ---- the command ---------------------------------------------------------------------------


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_lora_128_export):
    """An adapter run of the tiny model and its default export (the decoder family, no Meta decoders): the
    export is merge_and_export of this same adapted model, fp32 + int8 (conftest.py: one per session)."""
    root = tmp_path_factory.mktemp("bench")
    adapted = make_adapted(MERGEABLE_CONFIGS["lora"], image_size=128)  # small: the export dominates the time
    save_adapter(adapted, root / "run")
    export, _ = tiny_lora_128_export
    return root, export


@pytest.fixture
def one_thread():
    # The tiny model is too small for two threads; on a busy machine they only contend.
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_timing_consistent(s: dict, iterations: int) -> None:
    """One component's statistics: as many times as iterations asked, each statistic that of those times
    (median between min and max), throughput at the median."""
    times = np.asarray(s["times_ms"], dtype=np.float64)
    assert s["n"] == len(times) == iterations
    assert s["min_ms"] <= s["median_ms"] <= s["p90_ms"] <= s["max_ms"]
    for key, want in (("median_ms", np.median(times)), ("min_ms", times.min()), ("max_ms", times.max()),
                      ("mean_ms", times.mean())):
        assert s[key] == pytest.approx(want, abs=1e-3), key  # times_ms are rounded to 0.1 us
    assert s["throughput_per_s"] == pytest.approx(1000.0 * s["batch_size"] / s["median_ms"])


def test_bench_command_every_available_backend(tiny_run, one_thread):
    root, export = tiny_run
    out = root / "out"  # -o makes it
    # every backend but torch.compile (compiling takes minutes here; planned and tested above)
    args = ["bench", "--adapter", str(root / "run"), "--iterations", "2", "--warmup", "1", "--batch-size", "3",
            "--threads", "1", "-o", str(out), "-q", "--backend", "torch,onnxruntime,openvino,tensorrt"]
    args += ["--export-dir", str(export)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    data = json.loads((out / "bench.json").read_text())
    assert data["format"] == "peftexport-bench"
    assert data["settings"]["image_size"] == 128 and data["settings"]["model_type"] == "tiny"
    assert data["machine"]["cpu_count"] >= 1 and data["versions"]["torch"]
    cases = {c["case"]: c for c in data["cases"]}
    expected = ["base torch fp32", "unmerged torch fp32", "merged torch fp32", "export onnxruntime-cpu fp32",
                "export onnxruntime-cpu int8"]
    comps = {"encoder", "decoder_point", "decoder_box", "decoder_boxes_b3", "end_to_end"}
    for name in expected:
        c = cases[name]
        assert c["status"] == "ok", c
        assert set(c["components"]) == comps
        for comp, s in c["components"].items():
            assert_timing_consistent(s, iterations=2)
            assert s["ratio_vs_reference"] > 0
            assert s["peak_mb"] is not None and s["peak_mb"] >= 0
        boxes = c["components"]["decoder_boxes_b3"]
        assert boxes["throughput_unit"] == "prompts/s"
        assert boxes["throughput_per_s"] == pytest.approx(3000.0 / boxes["median_ms"])
        if name.startswith("export"):  # the decoders the runtime runs: the family for predict and predict_batch
            assert c["details"]["decoder"] == {"one_prompt": "family", "batch": "family"}
            assert {"split_image", "split_prompts", "split_masks"} <= set(c["details"]["graphs"])
    # torch at its best was timed too, in a worker started with glibc keeping freed memory, and every
    # ratio is against the fastest torch case of each component
    kept = cases["merged torch fp32 (freed memory kept)"]
    assert kept["status"] == "ok" and "mmap_max=0" in kept["process"]["glibc_tunables"]
    assert cases["merged torch fp32"]["process"]["glibc_tunables"] is None
    torch_cases = [c for c in data["cases"] if c["backend"] in ("torch", "torch-compile") and c["status"] == "ok"]
    for comp in comps:
        fastest = min(torch_cases, key=lambda c: c["components"][comp]["median_ms"])
        assert data["reference"][comp] == fastest["case"] and fastest["components"][comp]["ratio_vs_reference"] == 1.0
        assert all(c["components"][comp]["ratio_vs_reference"] >= 1.0 for c in torch_cases)
    assert f"'{data['reference']['encoder']}'" in res.output  # the table's header names it
    skipped = {n: c["reason"] for n, c in cases.items() if c["status"] == "skipped"}
    assert "--device cuda" in skipped["export tensorrt fp16"]
    assert not any(c["status"] == "failed" for c in data["cases"])
    md = (out / "bench.md").read_text()
    assert "| base torch fp32 | encoder |" in md and "skipped" in md
    w, h = _png_size(out / "bench.png")
    assert w > 300 and h > 300
    assert "median ms" in res.output and "skipped:" in res.output

    # Outputs are not overwritten without --overwrite, and that is checked before timing.
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "exists" in again.output.lower()


def test_bench_export_dir_only(tiny_run):
    root, export = tiny_run
    result = run_bench(export_dir=export, backends=["onnxruntime", "torch"], precisions=["int8"],
                       components=["encoder", "decoder_box"], iterations=1, warmup=0)
    ran = [c["case"] for c in result["cases"] if c["status"] == "ok"]
    assert "export onnxruntime-cpu int8" in ran
    # no torch case ran (no adapter recorded): each component is against the first case that timed it
    assert result["reference"] == {"encoder": "export onnxruntime-cpu int8", "decoder_box": "export onnxruntime-cpu int8"}


@pytest.mark.parametrize("component", ["decoder_point", "decoder_boxes_b3"])
def test_bench_decoder_on_the_family_computes_what_the_runtime_does(tiny_run, component):
    """The bench's family call (host, and the IO-binding chain it uses on CUDA, here bound in CPU memory)
    gives the low-res logits and IoU of SamSession.predict_batch, which tests/test_export.py holds to
    SamPredictor; split_image ran once, before the timed calls; one prompt runs the family too, as
    SamSession.predict does."""
    import onnxruntime as ort

    from peft_export.bench.family import BoundFamily
    from peft_export.bench.runners import OrtRunner
    from peft_export.runtime import SamSession
    from peft_export.runtime.embedding import ImageEmbedding

    _, export = tiny_run
    inputs = BenchInputs(128, (3,), seed=0)
    r = OrtRunner(CaseSpec("export", "onnxruntime", "fp32", "cpu", "cpu"), export, inputs, 1, end_to_end=False)
    r.prepare()
    assert r._family is not None and "decoder" not in r.sessions
    assert r.decoder_name is None and not any(k.startswith("decoder") for k in r.sessions)
    calls = []
    run = r._family.decoder._run
    r._family.decoder._run = lambda key, feeds: calls.append(key) or run(key, feeds)
    r.ready(component)
    r.run(component)
    r.run(component)
    n = 3 if component == "decoder_boxes_b3" else 1
    assert calls == ["split_image"] + ["split_prompts", "split_masks"] * 2
    coords, labels = inputs.decoder_prompts(component)
    low, iou = r._family(r._embedding, coords, labels)

    session = SamSession(export)
    emb = ImageEmbedding(r._embedding, (128, 128), (128, 128))  # the S frame: prompts map to themselves
    if component == "decoder_point":
        _, want_iou, want_low = session.predict_batch(points=coords[:, :1], point_labels=labels[:, :1].astype(int),
                                                      embedding=emb, multimask_output=True, masks=False)
    else:
        _, want_iou, want_low = session.predict_batch(boxes=coords.reshape(n, 4), embedding=emb,
                                                      multimask_output=True, masks=False)
    assert low.shape == (n, 4, 32, 32) and np.abs(low).max() > 0
    np.testing.assert_allclose(low[:, 1:], want_low, rtol=0, atol=1e-5)
    np.testing.assert_allclose(iou[:, 1:], want_iou, rtol=0, atol=1e-6)
    bound = BoundFamily(ort, r.sessions, r._family.context(r._embedding), coords, labels, 32, memory="cpu",
                        max_batch=2)  # two chained runs for 3 boxes
    bound()
    got_low, got_iou = bound.outputs()
    np.testing.assert_allclose(got_low, low, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got_iou, iou, rtol=0, atol=1e-6)
    r.close()


def test_bench_user_errors(tiny_run):
    root, _ = tiny_run
    res = runner.invoke(app, ["bench", "--adapter", str(root / "run"), "--backend", "torch,jax"])
    assert res.exit_code == 2 and "--backend: unknown 'jax'" in res.output
    res = runner.invoke(app, ["bench"])
    assert res.exit_code == 2 and "EXPORT_DIR" in res.output
    res = runner.invoke(app, ["bench", str(root / "nope")])
    assert res.exit_code == 2 and "does not exist" in res.output


@pytest.mark.parametrize("option, line", [
    (["--iterations", "-3"], "error: --iterations: must be >= 1, got -3"),
    (["--iterations", "0"], "error: --iterations: must be >= 1, got 0"),
    (["--warmup", "-1"], "error: --warmup: must be >= 0, got -1"),
    (["--threads", "0"], "error: --threads: must be >= 1, got 0"),
    (["--batch-size", "4,-2"], "error: --batch-size: every size must be >= 1, got -2"),
    (["--batch-size", "x"], "error: --batch-size: not a list of integers: x"),
    (["--components", "encoder,decodr"], "error: --components: unknown 'decodr'"),
    (["--precision", "fp64"], "error: --precision: unknown 'fp64'"),
    (["--device", "tpu"], "error: --device: unknown 'tpu'"),
    (["--backend", ""], "error: --backend: empty list"),
])
def test_bench_options_are_checked_before_any_work(tmp_path, option, line):
    """A bad option is one line before the adapter loads or a worker starts: no output directory is made."""
    out = tmp_path / "out"
    res = runner.invoke(app, ["bench", "--adapter", str(tmp_path / "never-loaded"), "-o", str(out), *option])
    assert res.exit_code == 2 and res.output.strip().splitlines() == [res.output.strip()], res.output
    assert res.output.startswith(line), res.output
    assert not out.exists()


def _spinning_entry(opts) -> str:
    try:
        return opts.get_session_config_entry("session.intra_op.allow_spinning")
    except RuntimeError:  # not set: ONNX Runtime's default, spinning
        return "default"


def test_interleaved_cases_get_onnxruntime_sessions_whose_threads_do_not_spin():
    """Cases timed in turns share the process: ORT's spinning threads slowed the torch case timed after an
    ORT case 4-8x (the demo's 'base torch 100.8 ms'); sessions made for interleaving do not spin, others do."""
    from peft_export.bench import measure
    from peft_export.bench.runners import Runner, ort_session_options

    seen = []

    class Probe(Runner):  # a case that records the options its ONNX Runtime sessions would get
        spec = CaseSpec("export", "onnxruntime", "fp32", "cpu")

        def prepare(self):
            seen.append(_spinning_entry(ort_session_options("cpu")))

        def run(self, component):
            pass

    measure([Probe()], ["encoder"], warmup=0, iterations=1, interleave=True)
    measure([Probe()], ["encoder"], warmup=0, iterations=1, interleave=False)
    assert seen == ["0", "default"]
    assert _spinning_entry(ort_session_options("cpu")) == "default"  # restored after the interleaved run


@pytest.mark.parametrize("kwargs, message", [
    ({"iterations": -3}, "--iterations: must be >= 1"), ({"warmup": -1}, "--warmup: must be >= 0"),
    ({"intra_op_threads": 0}, "--threads: must be >= 1"), ({"components": ["decodr"]}, "--components: unknown"),
])
def test_run_bench_checks_its_options_before_reading_the_export(tmp_path, kwargs, message):
    with pytest.raises(PeftExportError, match=message):
        run_bench(export_dir=tmp_path / "no-such-export", **kwargs)


def test_bench_compare_merges_runs(tmp_path):
    def result(cpu, median, device="cpu"):
        cases = [_case("base torch fp32", "base", "torch", "fp32", {"encoder": median}),
                 _case("merged torch fp32", "merged", "torch", "fp32", {"encoder": median * 1.01}),
                 _case("export tensorrt fp16", "export", "tensorrt", "fp16", {}, status="skipped")]
        add_ratios(cases, "base torch fp32")
        return {"format": "peftexport-bench", "format_version": 1, "date": "2025-01-01T00:00:00+00:00",
                "machine": {"cpu": cpu, "cpu_count_usable": 2, "gpu": None}, "versions": {"torch": "2.x"},
                "settings": {"device": device, "model_type": "vit_b", "image_size": 1024},
                "reference": "base torch fp32", "cases": cases}

    a, b = tmp_path / "laptop.json", tmp_path / "server.json"
    a.write_text(json.dumps(result("Intel Laptop", 9000.0)))
    b.write_text(json.dumps(result("AMD Server", 3000.0)))
    text = compare_results([a, b])
    assert "laptop (Intel Laptop x2)" in text and "server (AMD Server x2)" in text
    assert "9000.00" in text and "3000.00" in text and "9090.00" in text

    res = runner.invoke(app, ["bench-compare", str(a), str(b), "-o", str(tmp_path / "c.md")])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "c.md").read_text()
    assert md.count("| laptop (Intel Laptop x2) | ") == 3 and md.count("| server (AMD Server x2) | ") == 3
    assert "| run | case | component |" in md

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something-else"}))
    res = runner.invoke(app, ["bench-compare", str(bad)])
    assert res.exit_code == 2 and "not a peftexport bench result" in res.output


@pytest.mark.gpu
def test_bench_cuda_event_timings_positive():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    adapted = make_adapted(MERGEABLE_CONFIGS["lora"])
    result = run_bench(adapted=adapted, backends=["torch"], device="cuda", precisions=["fp32", "bf16"],
                       components=["encoder", "decoder_boxes", "end_to_end"], batch_sizes=(4,), iterations=3)
    ok = [c for c in result["cases"] if c["status"] == "ok"]
    assert {c["case"] for c in ok} >= {"base torch fp32", "unmerged torch bf16", "merged torch fp32"}
    for c in ok:
        assert c["memory_kind"] == "cuda_allocated"
        for s in c["components"].values():
            assert_timing_consistent(s, iterations=3)
            assert all(t > 0 for t in s["times_ms"])  # CUDA events time real GPU work
            assert s["peak_mb"] is not None and s["peak_mb"] > 0
    assert result["machine"]["gpu"]["name"]
    assert next(iter(ok))["components"]["encoder"]["ratio_vs_reference"] is not None
    # The adapter model was lent to the benchmark and is back on the CPU.
    assert next(adapted.model.parameters()).device.type == "cpu"


def test_bench_export_dir_times_the_recorded_adapter_too(tiny_run, tmp_path):
    """An export made from an adapter run records it, so `bench EXPORT_DIR` has torch cases as well."""
    from peft_export.peft.adapters import load_adapter
    from peft_export.export import merge_and_export

    root, _ = tiny_run
    manifest = merge_and_export(load_adapter(root / "run"), tmp_path / "export", progress=False)
    from peft_export.fsutil import sha256_file

    assert manifest["source"] == {"kind": "adapter", "adapter": str((root / "run").resolve()),
                                  "adapter_sha256": sha256_file(root / "run" / "adapter.safetensors"),
                                  "checkpoint": None, "checkpoint_sha256": "random-init"}
    result = run_bench(export_dir=tmp_path / "export", backends=["torch"], components=["encoder"],
                       iterations=1, warmup=0)
    ok = {c["case"] for c in result["cases"] if c["status"] == "ok"}
    assert {"unmerged torch fp32", "merged torch fp32"} <= ok
