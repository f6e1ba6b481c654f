"""Helpers for the Florence-2 on OpenVINO notebook collection.

Each module stands on its own (copy the one you need into your project):

* :mod:`helpers.conversion` — ``convert_florence2``: PyTorch checkpoint → OpenVINO IR (02_convert)
* :mod:`helpers.original_layout` — original-layout fine-tunes (``microsoft/Florence-2-*``) read as data (README)
* :mod:`helpers.ov_model` — ``OVFlorence2Model``: OpenVINO inference with transformers' ``generate`` (02_convert)
* :mod:`helpers.numpy_generation`, :mod:`helpers.numpy_postprocessing` — the same answers without torch (README)
* :mod:`helpers.models` — checkpoints, ``load_model``: convert once, load anywhere (01_select_model)
* :mod:`helpers.tasks` — the 15 tasks and ``run_task`` (04–09)
* :mod:`helpers.plotting` — draw any answer on its image (04–09)
* :mod:`helpers.samples` — sample images shipped with the collection
* :mod:`helpers.tiny` — a tiny random-weight Florence-2 built offline (00_setup)
* :mod:`helpers.widgets`, :mod:`helpers.demo` — selectors and the interactive demo (01–03, 10_interactive_demo)
* :mod:`helpers.scores`, :mod:`helpers.export`, :mod:`helpers.batch` — confidences, COCO/supervision, folders (README)
* :mod:`helpers.kit` — the offline classroom kit (00_setup)

Imports are lazy so that ``import helpers`` stays fast and torch-free until a helper is used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "convert_florence2": "helpers.conversion",
    "OVFlorence2Model": "helpers.ov_model",
    "EXACT_CONFIG": "helpers.ov_model",
    "load_model": "helpers.models",
    "ensure_converted": "helpers.models",
    "model_from_env": "helpers.models",
    "device_from_env": "helpers.models",
    "run_task": "helpers.tasks",
    "load_image": "helpers.tasks",
    "TASKS": "helpers.tasks",
    "draw_answer": "helpers.plotting",
    "plot_answer": "helpers.plotting",
    "load_sample": "helpers.samples",
    "make_tiny_florence2": "helpers.tiny",
    "run_task_with_scores": "helpers.scores",
    "to_coco": "helpers.export",
    "to_supervision": "helpers.export",
    "build_kit": "helpers.kit",
    "build_demo": "helpers.demo",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'helpers' has no attribute {name!r}")
