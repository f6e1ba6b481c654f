"""The names ``helpers`` exported before the layers existed keep working: users' copied code calls them."""

from __future__ import annotations

import importlib

import pytest

# The public contract: main's helpers/__init__.py __all__ on 2026-12-01, written out so a move cannot shrink it.
PUBLIC_NAMES = (
    "convert_florence2",
    "OVFlorence2Model",
    "EXACT_CONFIG",
    "load_model",
    "ensure_converted",
    "model_from_env",
    "device_from_env",
    "run_task",
    "load_image",
    "TASKS",
    "draw_answer",
    "plot_answer",
    "load_sample",
    "make_tiny_florence2",
    "run_task_with_scores",
    "to_coco",
    "to_supervision",
    "build_kit",
    "build_demo",
)


@pytest.mark.parametrize("name", PUBLIC_NAMES)
def test_public_name_imports_from_helpers(name: str) -> None:
    helpers = importlib.import_module("helpers")
    assert name in helpers.__all__
    value = getattr(helpers, name)
    assert value is not None
    assert getattr(value, "__name__", name) == name or not callable(value)


def test_unknown_name_raises_attribute_error() -> None:
    helpers = importlib.import_module("helpers")
    with pytest.raises(AttributeError, match="no attribute"):
        _ = helpers.no_such_helper
