"""helpers.course.model_kind.model_kind: lessons tell a real checkpoint from the teaching model and from random weights."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers.course.model_kind import MODEL_KIND_KEY, model_kind, model_kind_notice
from helpers.course.teaching import TEACHING_MODEL_DIR, teaching_model_available


def fake_config(vocab_size: int, **extra) -> SimpleNamespace:
    return SimpleNamespace(text_config=SimpleNamespace(vocab_size=vocab_size), **extra)


def test_the_mark_decides() -> None:
    assert model_kind(fake_config(1600, **{MODEL_KIND_KEY: "teaching"})) == "teaching"
    assert model_kind(fake_config(51328, **{MODEL_KIND_KEY: "random"})) == "random"  # base-random: full vocabulary
    assert model_kind(SimpleNamespace(config=fake_config(1600, **{MODEL_KIND_KEY: "teaching"}))) == "teaching"


def test_unmarked_models_are_told_apart_by_their_vocabulary() -> None:
    assert model_kind(fake_config(51289)) == "real"  # the real checkpoints
    assert model_kind(fake_config(1088)) == "random"  # a tiny model built before the mark existed
    assert model_kind(fake_config(51289, **{MODEL_KIND_KEY: "something else"})) == "real"


def test_tiny_model_is_random(tiny_model_dir: Path, tiny_torch_model) -> None:
    assert json.loads((tiny_model_dir / "config.json").read_text())[MODEL_KIND_KEY] == "random"
    assert model_kind(tiny_model_dir) == model_kind(tiny_torch_model) == "random"


@pytest.mark.skipif(not teaching_model_available(), reason="the teaching model is not installed")
def test_teaching_model_is_marked_and_the_mark_survives_loading_and_conversion() -> None:
    from transformers import AutoModelForImageTextToText

    from helpers.course.checkpoints import TEACHING_MODEL, ensure_converted
    from helpers.runtime.ov_model import OVFlorence2Model

    assert json.loads((TEACHING_MODEL_DIR / "config.json").read_text())[MODEL_KIND_KEY] == "teaching"
    torch_model = AutoModelForImageTextToText.from_pretrained(TEACHING_MODEL_DIR)
    assert model_kind(torch_model) == "teaching"
    converted = ensure_converted(TEACHING_MODEL, "fp16")  # cached in FLORENCE2_MODELS_DIR (see conftest.py)
    assert json.loads((converted / "config.json").read_text())[MODEL_KIND_KEY] == "teaching"
    assert model_kind(converted) == model_kind(OVFlorence2Model(converted, device="CPU")) == "teaching"


def test_notices_say_what_the_answers_are_worth() -> None:
    assert model_kind_notice("real") == ""
    assert "noise" in model_kind_notice("random") and "64 tokens" in model_kind_notice("random")
    teaching = model_kind_notice("teaching")
    assert "shape scenes" in teaching
    from helpers.course.model_kind import teaching_tasks
    from helpers.tasks.run import TASKS

    if set(TASKS) <= set(teaching_tasks()):  # the shipped model's own record decides what the notice claims
        assert "every Florence-2 task" in teaching and "meaningless" not in teaching
    else:
        assert "meaningless" in teaching and all(task in teaching for task in teaching_tasks())
