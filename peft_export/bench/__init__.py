"""Stage 9, bench: latency and memory of every way to run one model (cases, runners, measurement, report).

May import: export, peft, models, runtime, cpu_load, training.host_memory (the malloc setting of torch cases), errors, fsutil (torch, onnxruntime, openvino, tensorrt only inside runners and workers).
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
from .fresh import FreshCase, measure_fresh, save_model
from .load import describe_load, load_between, snapshot
from .factory import make_runner
from .runners import OrtRunner, Runner, RuntimeRunner, TorchRunner, choose_graphs

__all__ = [
    "BACKENDS", "BENCH_FORMAT", "BENCH_FORMAT_VERSION", "DEFAULT_COMPONENTS", "EXPORT_PRECISIONS", "TORCH_PRECISIONS",
    "Availability", "BenchInputs", "CaseSpec", "FreshCase", "OrtRunner", "Runner", "RuntimeRunner", "TorchRunner",
    "adapter_from_manifest", "make_runner", "add_ratios", "choose_graphs", "compare_results", "component_batch",
    "describe_load", "describe_machine", "detect_availability", "expand_components", "format_rows", "format_table", "load_between", "measure", "measure_fresh",
    "parse_list", "pick_reference", "plan_cases", "ratio", "read_result", "run_and_write", "run_bench",
    "save_model", "skip_record", "snapshot", "table_rows", "time_call", "write_json", "write_plot", "write_text",
]
