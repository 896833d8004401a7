"""Compatibility: module paths that moved, and the oldest torch the code runs on.

Module paths of peftexport 0.1 that moved in 0.2 keep working, with a DeprecationWarning,
until 0.3: a meta-path finder maps the old name to the module's new home (CHANGELOG.md lists
each move), so ``import peft_export.adapters`` and ``from peft_export.metrics import dice``
still work.

``MIN_TORCH`` is the ``torch>=`` of pyproject.toml (a test checks they agree), for runs from
a source checkout that pip never checked (``benchmarks/gpu_check.sh``).
"""

from __future__ import annotations

import importlib
import importlib.abc
import re
import importlib.util
import sys
import warnings

MOVED_MODULES = {
    "peft_export.adapters": "peft_export.peft.adapters",
    "peft_export.evaluate": "peft_export.evaluation.protocol",
    "peft_export.metrics": "peft_export.evaluation.metrics",
    "peft_export.predictors": "peft_export.evaluation.specs",
    "peft_export.stats": "peft_export.bench.stats",
    "peft_export.overlay": "peft_export.predict.overlay",
    "peft_export.training_params": "peft_export.peft.params",
}


class _MovedModuleLoader(importlib.abc.Loader):
    def __init__(self, new_name: str) -> None:
        self.new_name = new_name

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {self.new_name} in peftexport 0.2; the old path goes in 0.3",
                      DeprecationWarning, stacklevel=6)
        return importlib.import_module(self.new_name)

    def exec_module(self, module) -> None:  # the new module is already executed
        pass


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new_name = MOVED_MODULES.get(fullname)
        if new_name is None:
            return None
        return importlib.util.spec_from_loader(fullname, _MovedModuleLoader(new_name))


def install() -> None:
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())


# The newest of the torch APIs the code uses decides: torch.onnx.export(dynamo=True) returning the
# torch.export-based ONNXProgram (``.model`` IR, ``save(external_data=True)``) is torch 2.6 ("the
# torch.export-based ONNX exporter is the newest exporter for PyTorch 2.6 and newer", torch.onnx docs);
# torch.amp.GradScaler("cuda") came in 2.3, F.scaled_dot_product_attention(scale=) in 2.1.
MIN_TORCH = (2, 6)
MIN_TORCH_USES = "torch.onnx.export(dynamo=True), torch.amp.GradScaler('cuda'), F.scaled_dot_product_attention(scale=)"


def torch_version_problem(version: str) -> str | None:
    """Why torch ``version`` (e.g. '2.5.1+cu121') is too old for peftexport, or None when it is new enough."""
    m = re.match(r"(\d+)\.(\d+)", version)
    if m is None:
        return f"torch {version}: cannot read this version; peftexport needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]}"
    if (int(m.group(1)), int(m.group(2))) < MIN_TORCH:
        return (f"torch {version} is too old: peftexport needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]} "
                f"(it uses {MIN_TORCH_USES})")
    return None
