"""Helpers for the Florence-2 on OpenVINO notebook collection.

Each module stands on its own (copy the one you need into your project):

* :mod:`helpers.convert.conversion` — ``convert_florence2``: PyTorch checkpoint → OpenVINO IR (02_convert)
* :mod:`helpers.convert.original_layout` — original-layout fine-tunes (``microsoft/Florence-2-*``) read as data (README)
* :mod:`helpers.runtime.ov_model` — ``OVFlorence2Model``: OpenVINO inference with transformers' ``generate`` (02_convert)
* :mod:`helpers.runtime.numpy_generation`, :mod:`helpers.tasks.numpy_postprocessing` — the same answers without torch (README)
* :mod:`helpers.course.checkpoints` — checkpoints, ``load_model``: convert once, load anywhere (01_select_model)
* :mod:`helpers.tasks.run` — the 15 tasks and ``run_task`` (04–09)
* :mod:`helpers.outputs.plotting` — draw any answer on its image (04–09)
* :mod:`helpers.course.samples` — sample images shipped with the collection
* :mod:`helpers.course.tiny` — a tiny random-weight Florence-2 built offline (00_setup)
* :mod:`helpers.ui.widgets`, :mod:`helpers.ui.demo` — selectors and the interactive demo (01–03, 10_interactive_demo)
* :mod:`helpers.outputs.scores`, :mod:`helpers.outputs.export`, :mod:`helpers.cli.batch` — confidences, COCO/supervision, folders (README)
* :mod:`helpers.course.kit` — the offline classroom kit (00_setup)

Imports are lazy so that ``import helpers`` stays fast and torch-free until a helper is used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "convert_florence2": "helpers.convert.conversion",
    "OVFlorence2Model": "helpers.runtime.ov_model",
    "EXACT_CONFIG": "helpers.runtime.ov_model",
    "load_model": "helpers.course.checkpoints",
    "ensure_converted": "helpers.course.checkpoints",
    "model_from_env": "helpers.course.checkpoints",
    "device_from_env": "helpers.course.checkpoints",
    "run_task": "helpers.tasks.run",
    "load_image": "helpers.tasks.run",
    "TASKS": "helpers.tasks.run",
    "draw_answer": "helpers.outputs.plotting",
    "plot_answer": "helpers.outputs.plotting",
    "load_sample": "helpers.course.samples",
    "make_tiny_florence2": "helpers.course.tiny",
    "run_task_with_scores": "helpers.outputs.scores",
    "to_coco": "helpers.outputs.export",
    "to_supervision": "helpers.outputs.export",
    "build_kit": "helpers.course.kit",
    "build_demo": "helpers.ui.demo",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'helpers' has no attribute {name!r}")
