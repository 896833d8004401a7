"""Shared fixtures."""

from __future__ import annotations

import pytest

from helpers import MERGEABLE_CONFIGS, make_adapted
from peft_export.peft.adapters import AdaptedModel


@pytest.fixture
def tiny_lora() -> AdaptedModel:
    return make_adapted(MERGEABLE_CONFIGS["lora"])
