"""The torch minimum in pyproject.toml is the one the code needs, and a too old torch is named clearly."""

from __future__ import annotations

import inspect
import re
import tomllib
from pathlib import Path

import torch
import torch.nn.functional as F

from peft_export._compat import MIN_TORCH, torch_version_problem

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_states_the_minimum_the_code_checks():
    # The torch side is the `torch` extra (the core stays torch-free for the runtime and the napari plugin).
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["torch"]
    pins = [d for d in deps if re.match(r"torch\b", d) and not d.startswith("torchvision")]
    assert pins == [f"torch>={MIN_TORCH[0]}.{MIN_TORCH[1]}"]


def test_version_check_compares_numbers_not_strings():
    assert torch_version_problem(torch.__version__) is None  # the installed one is new enough
    assert torch_version_problem("2.6.0") is None
    assert torch_version_problem("2.10.1+cu128") is None  # '2.10' < '2.6' as strings
    problem = torch_version_problem("2.5.1+cu121")
    assert problem and "2.5.1+cu121 is too old" in problem and "dynamo=True" in problem
    assert "cannot read" in torch_version_problem("nightly")


def test_the_apis_behind_the_minimum_exist_in_this_torch():
    assert "dynamo" in inspect.signature(torch.onnx.export).parameters
    q = torch.randn(1, 1, 3, 4, generator=torch.Generator().manual_seed(0))
    scaled = F.scaled_dot_product_attention(q, q, q, scale=2.0)  # a builtin: no signature to inspect
    assert not torch.allclose(scaled, F.scaled_dot_product_attention(q, q, q))
    assert torch.amp.GradScaler("cuda", enabled=False).is_enabled() is False
