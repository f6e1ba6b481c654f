"""helpers.ui.widgets: every selector's default, its environment handling, and that ``.value`` is usable as is."""

from __future__ import annotations

import warnings
from pathlib import Path

import ipywidgets
import numpy as np
import openvino as ov
import pytest

from helpers.ir import WEIGHT_FORMATS
from helpers.course.checkpoints import BASE_RANDOM_MODEL, CHECKPOINTS, DEFAULT_MODEL, TINY_MODEL, resolve_model
from helpers.tasks.run import CASCADED_TASKS, TASKS, resolve_task
from helpers.ui.widgets import device_selector, model_selector, task_selector, weight_format_selector


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """conftest sets FLORENCE2_MODEL / FLORENCE2_DEVICE for the notebooks; these tests choose their own."""
    monkeypatch.delenv("FLORENCE2_MODEL", raising=False)
    monkeypatch.delenv("FLORENCE2_DEVICE", raising=False)
    return monkeypatch


def _values(widget: ipywidgets.Dropdown) -> list[str]:
    return [value for _, value in widget.options]


def _labels(widget: ipywidgets.Dropdown) -> list[str]:
    return [label for label, _ in widget.options]


def _check_widget(widget: ipywidgets.Dropdown) -> None:
    assert isinstance(widget, ipywidgets.Dropdown)
    assert widget.description.strip(), "every selector says what it selects"
    assert all(isinstance(value, str) and value for value in _values(widget))
    assert isinstance(widget.value, str) and widget.value in _values(widget)


# ---- model ---------------------------------------------------------------------------------------------------


def test_model_selector_default_lists_checkpoints_teaching_and_tiny(no_env):
    widget = model_selector()
    _check_widget(widget)
    assert widget.value == DEFAULT_MODEL
    assert _values(widget) == [*CHECKPOINTS, "teaching", TINY_MODEL]  # the teaching model ships with the package
    for label, value in widget.options:
        if value in CHECKPOINTS:
            assert value.split("/")[-1] in label and f"{CHECKPOINTS[value].parameters_millions / 1000:.2f} B" in label


def test_model_selector_takes_default_from_env(no_env):
    no_env.setenv("FLORENCE2_MODEL", "florence-community/Florence-2-large")
    assert model_selector().value == "florence-community/Florence-2-large"
    no_env.setenv("FLORENCE2_MODEL", "tiny")
    assert model_selector().value == TINY_MODEL
    no_env.setenv("FLORENCE2_MODEL", "teaching")
    assert model_selector().value == "teaching"


def test_model_selector_explicit_default_beats_env(no_env):
    no_env.setenv("FLORENCE2_MODEL", "tiny")
    assert model_selector("florence-community/Florence-2-base").value == "florence-community/Florence-2-base"


def test_model_selector_adds_local_folder_from_env(no_env, tmp_path: Path):
    folder = tmp_path / "my-florence"
    folder.mkdir()
    no_env.setenv("FLORENCE2_MODEL", str(folder))
    widget = model_selector()
    _check_widget(widget)
    assert widget.value == str(folder)
    assert _values(widget) == [*CHECKPOINTS, "teaching", TINY_MODEL, str(folder)], (
        "the folder is added once, after the list"
    )
    assert "my-florence" in widget.label


def test_model_selector_adds_unlisted_hub_id(no_env):
    widget = model_selector("someone/Florence-2-base-finetuned-docs")
    assert widget.value == "someone/Florence-2-base-finetuned-docs"
    assert len(widget.options) == len(CHECKPOINTS) + 3


def test_model_selector_accepts_base_random_from_env(no_env):
    no_env.setenv("FLORENCE2_MODEL", BASE_RANDOM_MODEL)
    widget = model_selector()
    assert widget.value == BASE_RANDOM_MODEL
    assert _values(widget) == [*CHECKPOINTS, "teaching", TINY_MODEL, BASE_RANDOM_MODEL]


def test_model_selector_accepts_every_named_offline_model(no_env):
    import helpers.course.checkpoints

    names = [v for k, v in vars(helpers.course.checkpoints).items() if k.endswith("_MODEL") and k != "DEFAULT_MODEL"]
    assert TINY_MODEL in names and BASE_RANDOM_MODEL in names
    for name in names:
        assert model_selector(name).value == name


@pytest.mark.parametrize("bad", ["/no/such/folder/anywhere", "not a model", "a/b/c", "tinny"])
def test_model_selector_rejects_unusable_default(no_env, bad: str):
    with pytest.raises(ValueError, match="FLORENCE2_MODEL"):
        model_selector(bad)


def test_model_value_tiny_resolves_to_a_model_folder(no_env, tmp_path: Path):
    no_env.setenv("FLORENCE2_MODELS_DIR", str(tmp_path))
    folder = Path(resolve_model(model_selector("tiny").value))
    assert folder.is_dir() and (folder / "config.json").exists()
    assert tmp_path in folder.parents


def test_model_value_local_folder_resolves_to_itself(no_env, tiny_model_dir: Path):
    widget = model_selector(str(tiny_model_dir))
    assert resolve_model(widget.value) == str(tiny_model_dir)


# ---- weight format -------------------------------------------------------------------------------------------


def test_weight_format_selector_defaults_to_fp16():
    widget = weight_format_selector()
    _check_widget(widget)
    assert widget.value == "fp16"
    assert _values(widget) == list(WEIGHT_FORMATS)


@pytest.mark.parametrize("fmt", WEIGHT_FORMATS)
def test_weight_format_selector_accepts_every_format(fmt: str):
    assert weight_format_selector(fmt.upper()).value == fmt


def test_weight_format_selector_rejects_unknown():
    with pytest.raises(ValueError, match="fp16"):
        weight_format_selector("int3")


# ---- device --------------------------------------------------------------------------------------------------


def _compiles_on(device: str) -> bool:
    """Compile a one-op model on ``device``: the value is usable as OpenVINO's device name."""
    from openvino import opset13 as ops

    parameter = ops.parameter([2], ov.Type.f32, name="x")
    compiled = ov.Core().compile_model(ov.Model([ops.relu(parameter)], [parameter]), device)
    return np.allclose(compiled([np.array([-1.0, 2.0], dtype=np.float32)])[0], [0.0, 2.0])


def test_device_selector_lists_devices_and_auto(no_env):
    core = ov.Core()
    widget = device_selector(core=core)
    _check_widget(widget)
    assert widget.value == "AUTO"
    assert _values(widget) == [*core.available_devices, "AUTO"]
    for device, label in zip(core.available_devices, _labels(widget)):
        assert str(core.get_property(device, "FULL_DEVICE_NAME")) in label


def test_device_selector_takes_default_from_env(no_env):
    no_env.setenv("FLORENCE2_DEVICE", "CPU")
    widget = device_selector()
    assert widget.value == "CPU"
    assert _compiles_on(widget.value)


def test_device_selector_normalises_case():
    assert device_selector("cpu").value == "CPU"


def test_device_selector_adds_a_valid_combination():
    widget = device_selector("AUTO:CPU")
    assert widget.value == "AUTO:CPU"
    assert _compiles_on(widget.value)


@pytest.mark.parametrize("unknown", ["NOSUCHDEVICE", "NPU", "AUTO:NOSUCHDEVICE,CPU", "GPU.7"])
def test_device_selector_falls_back_to_auto_with_a_note(no_env, unknown: str):
    if unknown == "NPU" and "NPU" in ov.Core().available_devices:
        pytest.skip("this machine has an NPU")
    no_env.setenv("FLORENCE2_DEVICE", unknown)
    with pytest.warns(UserWarning, match=f"{unknown!r} is not available.*AUTO"):
        widget = device_selector()
    assert widget.value == "AUTO"
    assert _compiles_on(widget.value)


def test_device_selector_available_default_gives_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert device_selector("CPU").value == "CPU"


# ---- task ----------------------------------------------------------------------------------------------------


def test_task_selector_defaults_to_caption_with_friendly_labels():
    widget = task_selector()
    _check_widget(widget)
    assert widget.value == "<CAPTION>" and widget.label == TASKS["<CAPTION>"].name
    assert _values(widget) == [*TASKS, *CASCADED_TASKS]
    for label, value in widget.options[: len(TASKS)]:
        assert label == TASKS[value].name and resolve_task(value) == value


def test_task_selector_without_cascades():
    assert _values(task_selector(include_cascaded=False)) == list(TASKS)


def test_task_selector_accepts_loose_names():
    assert task_selector("od").value == "<OD>"
    assert task_selector("region to category").value == "<REGION_TO_CATEGORY>"


def test_task_selector_selects_a_cascade():
    name = next(iter(CASCADED_TASKS))
    assert task_selector(name.replace(" ", "")).value == name
    with pytest.raises(ValueError, match="include_cascaded"):
        task_selector(name, include_cascaded=False)


def test_task_selector_rejects_unknown_task():
    with pytest.raises(ValueError, match="Unknown task"):
        task_selector("<CAPTONN>")
