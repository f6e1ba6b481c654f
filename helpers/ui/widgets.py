"""ipywidgets selectors for the lessons: model, weight format, OpenVINO device and task.

Every selector is a ``Dropdown`` whose ``.value`` is the plain string the helpers take (a hub id or folder,
``"fp16"``, ``"CPU"``, ``"<OD>"``), while its labels say what each choice means. Show the widget in one cell and
read ``.value`` in the next one::

    model_widget = model_selector(MODEL)
    model_widget            # pick a checkpoint, then run the next cell
    MODEL = model_widget.value

Run headless (``make run``, nbval in ``make test``), nobody clicks: the next cell reads the default, which comes
from the notebook's parameters cell (``FLORENCE2_MODEL``, ``FLORENCE2_DEVICE``). So a lesson works the same with
or without a browser.

Taught in ``notebooks/01_select_model.ipynb`` (:func:`model_selector`), ``notebooks/02_convert.ipynb``
(:func:`weight_format_selector`), ``notebooks/03_select_device.ipynb`` (:func:`device_selector`) and used by
``notebooks/10_interactive_demo.ipynb`` (:func:`task_selector`).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import ipywidgets as widgets

from helpers.ir import WEIGHT_FORMATS
from helpers.course import checkpoints as models
from helpers.course.checkpoints import (
    CHECKPOINTS,
    DEFAULT_MODEL,
    TEACHING_MODEL,
    TINY_MODEL,
    device_from_env,
    model_from_env,
)
from helpers.course.teaching import teaching_model_available

if TYPE_CHECKING:  # openvino is imported only when a device selector is built
    import openvino as ov

__all__ = ["device_selector", "model_selector", "task_selector", "weight_format_selector"]

#: Lets long descriptions ("Weight format:") show in full instead of being cut at ipywidgets' default width.
_STYLE = {"description_width": "initial"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

WEIGHT_FORMAT_LABELS: dict[str, str] = {
    "fp32": "fp32: full precision, the largest files",
    "fp16": "fp16: weights stored in half precision (recommended)",
    "int8": "int8: 8-bit weights, about a quarter of fp32",
    "int4": "int4: 4-bit weights in the text model, the smallest",
    "w8a8": "w8a8: int8 weights, and int8 activations in the vision encoder (fastest on CPUs with VNNI)",
}


def _dropdown(options: list[tuple[str, str]], value: str, description: str) -> widgets.Dropdown:
    layout = widgets.Layout(width="max-content")
    return widgets.Dropdown(options=options, value=value, description=description, style=_STYLE, layout=layout)


# ----------------------------------------------------------------------------------------------------------------
# Model


#: Labels for the offline models :func:`helpers.course.checkpoints.resolve_model` knows by name (besides ``tiny``).
_NAMED_MODEL_LABELS: dict[str, str] = {
    "base-random": "base-random: Florence-2-base's layers with random weights (offline speed tests)",
    "large-random": "large-random: Florence-2-large's layers with random weights (offline speed tests)",
    "teaching": "teaching: small model trained here on generated shape scenes (offline)",
}


def _named_models() -> set[str]:
    """The names ``resolve_model`` turns into an offline model: every ``*_MODEL`` string in helpers.course.checkpoints."""
    return {
        value
        for name, value in vars(models).items()
        if name.endswith("_MODEL") and isinstance(value, str) and value != DEFAULT_MODEL
    }


def _checkpoint_label(hub_id: str) -> str:
    checkpoint = CHECKPOINTS[hub_id]
    return f"{hub_id.split('/')[-1]} ({checkpoint.parameters_millions / 1000:.2f} B): {checkpoint.summary}"


def model_selector(default: str | None = None) -> widgets.Dropdown:
    """A dropdown of the four Florence-2 checkpoints plus the offline models that need no download: ``"teaching"``
    (trained here on shape scenes, shipped with the package) and ``"tiny"`` (random weights).

    ``default`` (``None``: ``FLORENCE2_MODEL``, else Florence-2-base-ft) is selected. A local folder, a hub id
    ``owner/name`` or another offline model :func:`helpers.course.checkpoints.resolve_model` knows by name (``"base-random"``)
    that is not in the list is added to it and selected, so a notebook started with
    ``FLORENCE2_MODEL=/path/to/Florence-2-base-ft`` shows that folder. Anything else raises ``ValueError``.
    ``.value`` is what :func:`helpers.course.checkpoints.resolve_model` and :func:`helpers.course.checkpoints.load_model` take.

    Taught in ``notebooks/01_select_model.ipynb``.
    """
    options = [(_checkpoint_label(hub_id), hub_id) for hub_id in CHECKPOINTS]
    if teaching_model_available():
        options.append((_NAMED_MODEL_LABELS[TEACHING_MODEL], TEACHING_MODEL))
    options.append(("tiny: built offline, random weights (answers are noise)", TINY_MODEL))
    wanted = str(default).strip() if default is not None else ""
    wanted = wanted or model_from_env()
    if wanted not in {value for _, value in options}:
        path = Path(wanted).expanduser()
        if wanted in _named_models():
            options.append((_NAMED_MODEL_LABELS.get(wanted, f"{wanted}: offline model"), wanted))
        elif path.is_dir():
            options.append((f"local folder: {path.name} ({wanted})", wanted))
        elif _HUB_ID.match(wanted) and not path.exists():
            options.append((f"hub: {wanted}", wanted))
        else:
            known = ", ".join([*CHECKPOINTS, *sorted(_named_models())])
            raise ValueError(
                f"Model {wanted!r} is neither a known checkpoint ({known}), an existing folder, nor a hub id of the "
                "form owner/name. Check the FLORENCE2_MODEL environment variable or the path you passed."
            )
    return _dropdown(options, wanted, "Model:")


# ----------------------------------------------------------------------------------------------------------------
# Weight format


def weight_format_selector(default: str = "fp16") -> widgets.Dropdown:
    """A dropdown of the weight formats :func:`helpers.convert.conversion.convert_florence2` writes: fp32, fp16, int8, int4, w8a8.

    Raises ``ValueError`` for an unknown ``default``. Taught in ``notebooks/02_convert.ipynb``.
    """
    wanted = str(default).strip().lower()
    if wanted not in WEIGHT_FORMATS:
        raise ValueError(f"Unknown weight format {default!r}; choose one of {', '.join(WEIGHT_FORMATS)}.")
    options = [(WEIGHT_FORMAT_LABELS.get(fmt, fmt), fmt) for fmt in WEIGHT_FORMATS]
    return _dropdown(options, wanted, "Weight format:")


# ----------------------------------------------------------------------------------------------------------------
# Device

_VIRTUAL_DEVICES = ("AUTO", "MULTI", "HETERO")


def _device_available(device: str, available: list[str]) -> bool:
    """``CPU``, ``GPU.1``, ``GPU`` (when ``GPU.0`` exists) or ``AUTO:GPU,CPU`` whose listed devices all exist."""
    head, _, listed = device.partition(":")
    if head in _VIRTUAL_DEVICES:
        names = [name for name in listed.split(",") if name]
        return all(_device_available(name, available) for name in names)
    families = {name.split(".")[0] for name in available}
    return device in available or device in families


def _full_name(core: ov.Core, device: str) -> str:
    try:
        return str(core.get_property(device, "FULL_DEVICE_NAME"))
    except RuntimeError:  # a plugin that cannot answer still lets the device be chosen
        return device


def device_selector(default: str | None = None, *, core: ov.Core | None = None) -> widgets.Dropdown:
    """A dropdown of this machine's OpenVINO devices (``ov.Core().available_devices``, labelled with their full
    names) plus ``AUTO``.

    ``default`` (``None``: ``FLORENCE2_DEVICE``, else ``AUTO``) is selected when it can run here; a valid
    combination such as ``AUTO:GPU,CPU`` is added to the list. A device this machine does not have (``NPU`` on a
    machine without one) falls back to ``AUTO`` with a ``UserWarning`` saying so, so a notebook written for
    another machine still runs. Taught in ``notebooks/03_select_device.ipynb``.
    """
    if core is None:
        import openvino as ov

        core = ov.Core()
    available = list(core.available_devices)
    options = [(f"{device}: {_full_name(core, device)}", device) for device in available]
    options.append(("AUTO: OpenVINO picks the device", "AUTO"))
    wanted = str(default).strip().upper() if default is not None else ""
    wanted = wanted or device_from_env().upper()
    if wanted not in {value for _, value in options}:
        if _device_available(wanted, available):
            options.append((wanted, wanted))
        else:
            warnings.warn(
                f"Device {wanted!r} is not available on this machine (available: {', '.join(available)}); "
                "using AUTO instead. Pick a device from the list, or set FLORENCE2_DEVICE to one of those.",
                UserWarning,
                stacklevel=2,
            )
            wanted = "AUTO"
    return _dropdown(options, wanted, "Device:")


# ----------------------------------------------------------------------------------------------------------------
# Task


def task_selector(default: str = "<CAPTION>", include_cascaded: bool = True) -> widgets.Dropdown:
    """A dropdown of Florence-2's tasks: labels are friendly names ("Object detection"), values are task tokens
    (``"<OD>"``) from :data:`helpers.tasks.run.TASKS`; with ``include_cascaded`` also the caption-then-grounding
    cascades of :data:`helpers.tasks.run.CASCADED_TASKS` (value: the cascade's name, for
    :func:`helpers.tasks.run.run_cascaded_task`).

    ``default`` may be written loosely (``"od"``); an unknown one raises ``ValueError`` listing the tasks.
    Used in ``notebooks/10_interactive_demo.ipynb``.
    """
    from helpers.tasks.run import CASCADED_TASKS, TASKS, resolve_task

    options = [(spec.name, token) for token, spec in TASKS.items()]
    cascades = {re.sub(r"\s+", "", name).upper(): name for name in CASCADED_TASKS}
    if include_cascaded:
        for name, spec in CASCADED_TASKS.items():
            grounding = TASKS[spec.grounding_task].name.lower()
            options.append((f"{TASKS[spec.caption_task].name}, then {grounding}", name))
    cascade = cascades.get(re.sub(r"\s+", "", str(default)).upper())
    if cascade is not None:
        if not include_cascaded:
            raise ValueError(f"{default!r} is a cascaded task, but include_cascaded=False; pass include_cascaded=True.")
        wanted = cascade
    else:
        wanted = resolve_task(default)  # ValueError with the list of tasks and the nearest match
    return _dropdown(options, wanted, "Task:")
