"""Graphs an export left out because they failed their gate: which ones may be, and how a refusal
is recorded (``manifest.json``'s ``refused`` list) and worded (one line, for the log and the runtime).

The fp32 encoder and Meta's decoders are the reference the other graphs are judged against: when
one of them fails, the export fails. Every other graph is optional: a refused one is left out and the
rest is written.
"""

from __future__ import annotations

REQUIRED = {("encoder", "fp32"), ("encoder_preprocess", "fp32"), ("decoder", "fp32"), ("decoder_lowres", "fp32")}

# ``merge-and-export``'s exit status when the export was written but some graphs were refused
# (2 stays bad input / failure, nothing written).
EXIT_REFUSED = 3


def is_required(graph: str, precision: str) -> bool:
    """Whether a failed gate on this graph fails the whole export."""
    return (graph, precision) in REQUIRED


def refusal_record(graph: str, precision: str, backend: str, parity: dict | None, extra: dict | None,
                   reason: str | None = None) -> dict:
    """The manifest entry of one refused graph: each failed measure with its value and limit, the
    backend that measured it, and the int8 recipe tried (when there was one)."""
    entry: dict = {"graph": graph, "precision": precision, "backend": backend}
    if parity is not None:
        limits = parity.get("thresholds", {})
        entry["failed"] = [{"measure": key, "value": parity[key], "limit": limit,
                            "rule": "<=" if key.endswith(("max_rel", "max_abs", "mean_abs")) else ">="}
                           for key, limit in limits.items() if key in parity and _fails(key, parity[key], limit)]
        if not parity.get("finite", True):
            entry["failed"].append({"measure": "finite", "value": False, "limit": True, "rule": "=="})
        entry["failures"] = list(parity.get("failures", []))
    if reason:
        entry["reason"] = reason
    for key in ("int8_recipe", "int8_search", "int8_data"):
        if extra and extra.get(key) is not None:
            entry[key] = extra[key]
    entry["line"] = refusal_line(entry)  # the runtime words a request for it with this (it reads no export code)
    return entry


def _fails(key: str, value, limit: float) -> bool:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return True
    if value != value:  # NaN
        return True
    return value > limit if key.endswith(("max_rel", "max_abs", "mean_abs")) else value < limit


def refusal_line(entry: dict) -> str:
    """``encoder int8 (prompt_mask_iou_mean 0.9899 < 0.99 on onnxruntime)``."""
    if entry.get("failed"):
        flip = {">=": "<", "<=": ">", "==": "!="}
        why = "; ".join(f"{f['measure']} {_num(f['value'])} {flip[f['rule']]} {_num(f['limit'])}" for f in entry["failed"])
        why += f" on {entry.get('backend', 'onnxruntime')}"
    else:
        why = entry.get("reason") or "; ".join(entry.get("failures", [])) or "failed its check"
    return f"{entry['graph']} {entry['precision']} ({why})"


def _num(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)
