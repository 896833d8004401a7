"""Stage 9, bench: latency and memory of every way to run one model (cases, runners, measurement, report).

May import: export, peft, models, runtime, errors, fsutil (torch, onnxruntime, tensorrt only inside runners).
"""

from .cases import (
    BACKENDS,
    BENCH_FORMAT,
    BENCH_FORMAT_VERSION,
    DEFAULT_COMPONENTS,
    EXPORT_PRECISIONS,
    TORCH_PRECISIONS,
    Availability,
    BenchInputs,
    CaseSpec,
    component_batch,
    detect_availability,
    expand_components,
    parse_list,
    plan_cases,
    skip_record,
)
from .measure import measure, time_call
from .report import (
    add_ratios,
    compare_results,
    describe_machine,
    format_rows,
    format_table,
    pick_reference,
    ratio,
    read_result,
    table_rows,
    write_json,
    write_plot,
    write_text,
)
from .run import adapter_from_manifest, run_and_write, run_bench
from .runners import OrtRunner, Runner, TensorRTRunner, TorchRunner, choose_graphs

__all__ = [
    "BACKENDS", "BENCH_FORMAT", "BENCH_FORMAT_VERSION", "DEFAULT_COMPONENTS", "EXPORT_PRECISIONS", "TORCH_PRECISIONS",
    "Availability", "BenchInputs", "CaseSpec", "OrtRunner", "Runner", "TensorRTRunner", "TorchRunner",
    "adapter_from_manifest", "add_ratios", "choose_graphs", "compare_results", "component_batch",
    "describe_machine", "detect_availability", "expand_components", "format_rows", "format_table", "measure",
    "parse_list", "pick_reference", "plan_cases", "ratio", "read_result", "run_and_write", "run_bench",
    "skip_record", "table_rows", "time_call", "write_json", "write_plot", "write_text",
]
