"""Shared fixtures: every test runs offline against tiny Florence-2 models built here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach the hub; set before transformers is imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Florence-2 in native transformers layout (768 px, like the real models)."""
    from helpers.course.tiny import make_tiny_florence2

    return make_tiny_florence2(tmp_path_factory.mktemp("models") / "tiny-florence2")


@pytest.fixture(scope="session")
def tiny_processor(tiny_model_dir: Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_torch_model(tiny_model_dir: Path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval()


def pytest_configure(config: pytest.Config) -> None:
    """Give every notebook kernel (nbval, nbclient) an offline model before any kernel starts.

    Kernels inherit this process's environment. Unless you chose a model with ``FLORENCE2_MODEL``, the tiny
    random-weight model is built once into ``build/test-models/tiny-florence2`` and reused by later runs; converted
    models go to ``build/test-models/converted``; the device is the CPU; ``FLORENCE2_QUICK=1`` asks lessons for their
    small form.
    """
    from helpers.cli.ray_engine import keep_local_cluster_on_loopback

    keep_local_cluster_on_loopback()  # every Ray cluster a test or a lesson's kernel starts listens on 127.0.0.1 only
    test_models = Path(__file__).resolve().parent.parent / "build" / "test-models"
    if not os.environ.get("FLORENCE2_MODEL"):
        tiny_dir = test_models / "tiny-florence2"
        if not (tiny_dir / "model.safetensors").exists():  # a finished folder: skip importing torch here
            from helpers.course.tiny import make_tiny_florence2

            test_models.mkdir(parents=True, exist_ok=True)
            with open(test_models / ".build.lock", "w") as lock:  # parallel workers build it only once
                try:
                    import fcntl

                    fcntl.flock(lock, fcntl.LOCK_EX)
                except ImportError:  # Windows: no lock; make_tiny_florence2 still never leaves a half-built folder
                    pass
                make_tiny_florence2(tiny_dir)
        os.environ["FLORENCE2_MODEL"] = str(tiny_dir)
    os.environ.setdefault("FLORENCE2_MODELS_DIR", str(test_models / "converted"))
    os.environ.setdefault("FLORENCE2_DEVICE", "CPU")
    os.environ.setdefault("FLORENCE2_QUICK", "1")  # lessons with a size parameter (13_label_dataset) run small
