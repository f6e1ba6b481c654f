"""Shared fixtures: every test runs offline against tiny Florence-2 models built here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach the hub; set before transformers is imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

#: OpenVINO settings for token-exact parity with PyTorch (this CPU defaults to bf16 and a u8 KV cache).
EXACT_OV_CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Florence-2 in native transformers layout (768 px, like the real models)."""
    from helpers.tiny import make_tiny_florence2

    return make_tiny_florence2(tmp_path_factory.mktemp("models") / "tiny-florence2")


@pytest.fixture(scope="session")
def tiny_processor(tiny_model_dir: Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_torch_model(tiny_model_dir: Path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval()
