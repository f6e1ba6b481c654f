"""Helpers for the Florence-2 on OpenVINO notebook collection, in layers (docs/CONTRIBUTING.md draws them):

* :mod:`helpers.ir` — the converted-folder contract: part names, weight formats, manifest (02_convert)
* :mod:`helpers.convert` — ``convert_florence2``: PyTorch checkpoint → OpenVINO IR, needs torch (02_convert)
* :mod:`helpers.runtime` — ``OVFlorence2Model`` and its generation strategies, torch-free (02_convert, 03, 11);
  copy ``runtime/`` with ``ir.py`` into your project
* :mod:`helpers.tasks` — the 15 tasks, prompts, regions and ``run_task`` (04–09)
* :mod:`helpers.outputs` — draw, export (COCO, supervision) and score answers (04–09, README)
* :mod:`helpers.course` — model catalogue and cache (``load_model``), samples, tiny/teaching models, kit (00–01, 12)
* :mod:`helpers.ui`, :mod:`helpers.cli` — widgets and demo (01–03, 10); ``python -m helpers`` (README)

The names below stay importable from ``helpers`` itself. Imports are lazy so that ``import helpers`` stays fast and
torch-free until a helper is used.
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
