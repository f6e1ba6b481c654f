"""The interactive demo: pick an image and a task, press Run, see the drawing and the raw answer side by side.

Two layers, so the demo can be tested without a browser and reused outside Jupyter:

* :func:`run_demo_request` — a plain function: image + task (+ text or a pixel region) in, :class:`DemoResult` out
  (drawn image, answer dict, seconds, error message). It never raises for bad input; the message says what to fix.
  The ipywidgets demo and the optional gradio app (:mod:`helpers.ui.gradio_app`) both call it.
* :func:`build_demo` — the ipywidgets front end: image from a sample, an upload or a path; all 15 tasks and the
  three cascades; a text box that is enabled only for tasks that take text, with the task's hint; a Run button
  that shows "Running…" while the model works; the drawing next to the answer as JSON; the time taken; errors in
  a red box inside the widget instead of a traceback.

Every control carries a CSS class (``florence2-task``, ``florence2-run``, ``florence2-output-image``, ...; see
:data:`CSS_CLASSES`) so a browser test can find it.

Taught in ``notebooks/10_interactive_demo.ipynb``.
"""

from __future__ import annotations

import html
import io
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ipywidgets as widgets
from PIL import Image

from helpers.outputs.plotting import draw_answer
from helpers.course.samples import SAMPLE_DESCRIPTIONS, list_samples, load_sample
from helpers.tasks.run import (
    CASCADED_TASKS,
    PIXEL_BOX_HINT,
    TASKS,
    load_image,
    loc_to_box,
    parse_pixel_box,
    run_cascaded_task,
    run_task,
)

__all__ = [
    "CSS_CLASSES",
    "DemoResult",
    "FlorenceDemo",
    "answer_to_json",
    "build_demo",
    "parse_pixel_box",
    "run_demo_request",
    "task_hint",
    "task_takes_text",
]

#: The CSS class of each part of the demo (``widget.add_class``), for browser tests and custom styling.
CSS_CLASSES: dict[str, str] = {
    "demo": "florence2-demo",
    "source": "florence2-source",
    "sample": "florence2-sample",
    "upload": "florence2-upload",
    "path": "florence2-path",
    "task": "florence2-task",
    "text": "florence2-text",
    "hint": "florence2-hint",
    "run": "florence2-run",
    "status": "florence2-status",
    "error": "florence2-error",
    "output_image": "florence2-output-image",
    "answer": "florence2-answer",
    "time": "florence2-time",
}

#: Longest side of the picture shown in the widget (the answer itself is computed on the full image).
DISPLAY_MAX_SIDE = 1024
RUN_LABEL = "Run"
BUSY_LABEL = "Running…"
_JSON_LINE = 72  # characters: a longer list of labels gets one label per line


# ----------------------------------------------------------------------------------------------------------------
# The callback
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class DemoResult:
    """What one press of Run produces. Taught in ``notebooks/10_interactive_demo.ipynb``.

    ``image_drawn``: the image with the answer drawn on it (the plain image for text answers; for region tasks the
    asked region is outlined and labelled with the answer); ``None`` only if no image could be loaded.
    ``answer``: ``{task_token: answer}`` as ``processor.post_process_generation`` returns it (a cascade gives two
    keys: the caption and its grounding); ``{}`` on error. ``seconds``: time spent in the model (0 when the request
    failed before reaching it). ``error``: ``None``, or a message saying what went wrong and how to fix it.
    ``task``: the task that ran; ``text_input``: the text the task got (a region as ``<loc_…>`` tokens).
    """

    image_drawn: Image.Image | None
    answer: dict[str, Any]
    seconds: float
    error: str | None = None
    task: str = ""
    text_input: str | None = None
    image_size: tuple[int, int] | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None


def task_takes_text(task: str) -> bool:
    """Whether ``task`` (a token from :data:`TASKS` or a cascade name) needs a text input."""
    spec = TASKS.get(task)
    return bool(spec and spec.needs_text)


def task_hint(task: str) -> str:
    """One line telling the user what to type for ``task``; region tasks ask for a pixel box."""
    if task in CASCADED_TASKS:
        spec = CASCADED_TASKS[task]
        return f"Captions the image with {spec.caption_task}, then grounds the caption's phrases. " + spec.hint
    spec = TASKS.get(task)
    if spec is None:
        return ""
    if spec.text_kind == "region":
        return f"{PIXEL_BOX_HINT}, or as four <loc_N> tokens such as <loc_100><loc_200><loc_500><loc_700>."
    return spec.hint


def _open_image(image: Any) -> Image.Image:
    """A PIL image, a path, or the raw bytes of an uploaded file → RGB image (via :func:`load_image`)."""
    if image is None:
        raise ValueError("No image: pick a sample, upload a file, or type the path of an image file.")
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not data:
            raise ValueError("The uploaded file is empty (0 bytes); upload the image again.")
        try:
            opened = Image.open(io.BytesIO(data))
        except Exception:
            raise ValueError(
                "The uploaded file is not an image Pillow can read (JPEG, PNG, WebP, ...). Upload a picture."
            )
        return load_image(opened)
    if isinstance(image, str):
        if not image.strip():
            raise ValueError("The image path is empty: type the path of an image file, or pick a sample.")
        image = Path(image.strip()).expanduser()
    return load_image(image)


def _region_text_input(task: str, text: str | None, region_px: Any, image_size: tuple[int, int]) -> str | None:
    """The text to give :func:`run_task`: pixel boxes become ``<loc_…>`` tokens with :func:`box_to_loc`."""
    from helpers.tasks.run import box_to_loc

    spec = TASKS.get(task)
    if region_px is not None and not (isinstance(region_px, str) and not region_px.strip()):
        if spec is None or spec.text_kind != "region":
            raise ValueError(f"{task} takes no region; pixel coordinates are only for the region tasks "
                             f"({', '.join(t for t, s in TASKS.items() if s.text_kind == 'region')}).")  # fmt: skip
        return box_to_loc(parse_pixel_box(region_px), image_size)
    if spec is not None and spec.text_kind == "region" and text and text.strip() and "<loc_" not in text:
        return box_to_loc(parse_pixel_box(text), image_size)  # the text box holds pixel coordinates
    return text if (text is not None and text.strip()) else None


def _draw(image: Image.Image, task: str, answer: dict[str, Any], text_input: str | None) -> Image.Image:
    """The picture for one answer: boxes/polygons drawn; for a region task the region too, labelled if text."""
    if task in CASCADED_TASKS:
        grounding = CASCADED_TASKS[task].grounding_task
        return draw_answer(image, grounding, answer[grounding])
    inner = answer[task]
    spec = TASKS[task]
    if spec.text_kind == "region" and text_input:
        region = loc_to_box(text_input, image.size)
        label = inner if isinstance(inner, str) else spec.name
        image = draw_answer(image, "<OD>", {"bboxes": [list(region)], "labels": [label]})
        if isinstance(inner, str):
            return image
    return draw_answer(image, task, inner)


def _error_message(error: BaseException) -> str:
    message = str(error).strip() or "(no message)"
    if isinstance(error, (ValueError, TypeError, FileNotFoundError)):
        return message
    return f"{type(error).__name__}: {message}"


def run_demo_request(
    model: Any,
    processor: Any,
    image: Image.Image | str | Path | bytes | None,
    task: str,
    text: str | None = None,
    region_px: Sequence[float] | str | None = None,
    **generate_kwargs: Any,
) -> DemoResult:
    """Run one demo request and never raise: what the Run button (and the gradio app) calls.
    Taught in ``notebooks/10_interactive_demo.ipynb``.

    ``image``: a PIL image, a file path, or the bytes of an uploaded file. ``task``: a task token from
    :data:`helpers.tasks.run.TASKS` (``"<OD>"``, written loosely is fine) or a cascade name from
    :data:`helpers.tasks.run.CASCADED_TASKS`. ``text``: the task's text, for the tasks that take one. Region tasks
    take the region either as ``region_px=(x1, y1, x2, y2)`` in pixels, as ``text`` holding a pixel box
    (``"100, 80, 400, 360"``) or as ``text`` holding four ``<loc_N>`` tokens; pixels are converted with
    :func:`helpers.tasks.run.box_to_loc`. ``generate_kwargs`` go to ``generate`` (e.g. ``num_beams=1``).

    Any problem — no image, an unreadable file, a missing or extra text, a region outside the image, an error in
    the model — comes back as :attr:`DemoResult.error` with the fix, so a widget can show it.
    """
    picture: Image.Image | None = None
    token = str(task)
    text_input: str | None = None
    seconds = 0.0
    try:
        if token not in CASCADED_TASKS:
            from helpers.tasks.run import resolve_task

            token = resolve_task(token)
        picture = _open_image(image)
        text_input = _region_text_input(token, text, region_px, picture.size)
        started = time.perf_counter()
        if token in CASCADED_TASKS:
            if text_input is not None:
                raise ValueError(f"{token} takes no text input: it writes its own caption. Clear the text box.")
            answer = run_cascaded_task(model, processor, picture, token, **generate_kwargs)
        else:
            answer = run_task(model, processor, picture, token, text_input, **generate_kwargs)
        seconds = time.perf_counter() - started
        drawn = _draw(picture, token, answer, text_input)
    except Exception as error:  # the demo shows every failure as a message, never as a traceback
        return DemoResult(picture, {}, seconds, _error_message(error), token, text_input,
                          picture.size if picture is not None else None)  # fmt: skip
    return DemoResult(drawn, dict(answer), seconds, None, token, text_input, picture.size)


def _json_value(value: Any, indent: int) -> str:
    """JSON with one line per box or polygon (a list of numbers stays on one line); long label lists one per line."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    pad, inner = " " * indent, " " * (indent + 2)
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        items = [
            f"{inner}{json.dumps(str(k), ensure_ascii=False)}: {_json_value(v, indent + 2)}" for k, v in value.items()
        ]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(value, (list, tuple)):
        if all(not isinstance(v, (Mapping, list, tuple)) for v in value):
            one_line = json.dumps([_scalar(v) for v in value], ensure_ascii=False)
            if len(one_line) <= _JSON_LINE or not any(isinstance(v, str) for v in value):
                return one_line  # a box, a polygon, or a few labels
            # A long list of labels: one per line, so the answer box needs no wide horizontal scroll.
            lines = (inner + json.dumps(_scalar(v), ensure_ascii=False) for v in value)
            return "[\n" + ",\n".join(lines) + "\n" + pad + "]"
        return "[\n" + ",\n".join(inner + _json_value(v, indent + 2) for v in value) + "\n" + pad + "]"
    return json.dumps(_scalar(value), ensure_ascii=False)


def _scalar(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float):
        return round(value, 2) if math.isfinite(value) else None
    return value if isinstance(value, (str, int, bool)) or value is None else str(value)


def answer_to_json(answer: Mapping[str, Any]) -> str:
    """The answer as readable JSON: one line per box, polygon or label list."""
    return _json_value(answer, 0)


# ----------------------------------------------------------------------------------------------------------------
# The ipywidgets front end
# ----------------------------------------------------------------------------------------------------------------

_ERROR_STYLE = (
    "border:1px solid #d93025;background:#fce8e6;color:#a50e0e;border-radius:4px;padding:6px 10px;"
    "white-space:pre-wrap;font-family:var(--jp-ui-font-family, sans-serif)"
)
_ANSWER_STYLE = (
    "max-height:420px;overflow:auto;margin:0;padding:6px;background:#f7f7f7;border:1px solid #ddd;"
    "border-radius:4px;font-size:12px;line-height:1.35;white-space:pre"
)
_WIDE = {"description_width": "initial"}


def _task_dropdown(default: str) -> widgets.Dropdown:
    """The task picker: :func:`helpers.ui.widgets.task_selector` (all 15 tasks and the 3 cascades)."""
    try:
        from helpers.ui.widgets import task_selector
    except ImportError:  # helpers.ui.widgets missing from a copied-out demo: build the same dropdown here
        options = [(spec.name, token) for token, spec in TASKS.items()] + [(name, name) for name in CASCADED_TASKS]
        return widgets.Dropdown(options=options, value=default, description="Task:", style=_WIDE)
    return task_selector(default, include_cascaded=True)


def _png(image: Image.Image) -> bytes:
    shown = image.copy()
    shown.thumbnail((DISPLAY_MAX_SIDE, DISPLAY_MAX_SIDE))
    buffer = io.BytesIO()
    shown.save(buffer, format="PNG")
    return buffer.getvalue()


def _sample_options(samples: Sequence[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """Sample name → what to load (a shipped sample name, a path or a PIL image)."""
    if samples is None:
        return {name: name for name in list_samples()}
    if isinstance(samples, Mapping):
        return dict(samples)
    if isinstance(samples, str):
        raise ValueError(f"samples must be a list of sample names, not the string {samples!r}; wrap it: [{samples!r}].")
    known = set(list_samples())
    unknown = [name for name in samples if name not in known]
    if unknown:
        raise ValueError(f"Unknown samples {unknown}; shipped samples are {', '.join(sorted(known))}. "
                         "Pass a dict {name: path or PIL image} for your own pictures.")  # fmt: skip
    return {name: name for name in samples}


class FlorenceDemo(widgets.VBox):
    """The demo widget (a ``VBox``); its controls are attributes so code and tests can drive it:
    ``source``, ``sample``, ``upload``, ``path``, ``task``, ``text``, ``hint``, ``run_button``, ``status``,
    ``error``, ``output_image``, ``answer``, ``time``; :attr:`last_result` is the latest :class:`DemoResult`.
    Build it with :func:`build_demo`."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        samples: Sequence[str] | Mapping[str, Any] | None = None,
        default_sample: str | None = None,
        default_task: str = "<OD>",
        generate_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.model, self.processor = model, processor
        self.generate_kwargs = dict(generate_kwargs or {})
        self.samples = _sample_options(samples)
        if not self.samples:
            raise ValueError("samples is empty; pass None for the shipped samples or at least one image.")
        sample_value = default_sample if default_sample is not None else next(iter(self.samples))
        if sample_value not in self.samples:
            raise ValueError(f"default_sample {sample_value!r} is not among the samples: {', '.join(self.samples)}.")
        self.last_result: DemoResult | None = None

        self.source = widgets.ToggleButtons(
            options=[("Sample", "sample"), ("Upload", "upload"), ("Path", "path")], value="sample",
            description="Image from:", style={**_WIDE, "button_width": "80px"},
        )  # fmt: skip
        self.sample = widgets.Dropdown(
            options=[(self._sample_label(name), name) for name in self.samples], value=sample_value,
            description="Sample:", style=_WIDE, layout=widgets.Layout(width="max-content"),
        )  # fmt: skip
        self.upload = widgets.FileUpload(accept="image/*", multiple=False, description="Upload image")
        self.path = widgets.Text(
            placeholder="path/to/image.jpg", description="Image path:", style=_WIDE, continuous_update=False,
            layout=widgets.Layout(width="480px"),
        )  # fmt: skip
        self.image_info = widgets.HTML()
        self.task = _task_dropdown(default_task)
        self.text = widgets.Text(description="Text:", style=_WIDE, layout=widgets.Layout(width="560px"))
        self.hint = widgets.HTML()
        self.run_button = widgets.Button(description=RUN_LABEL, button_style="primary", icon="play",
                                         tooltip="Run the task on the image")  # fmt: skip
        self.status = widgets.HTML()
        self.error = widgets.HTML(layout=widgets.Layout(display="none"))
        self.output_image = widgets.Image(format="png", layout=widgets.Layout(max_width="560px", height="auto"))
        self.answer = widgets.HTML(layout=widgets.Layout(width="100%"))
        self.time = widgets.HTML()

        for name, widget in (
            ("source", self.source), ("sample", self.sample), ("upload", self.upload), ("path", self.path),
            ("task", self.task), ("text", self.text), ("hint", self.hint), ("run", self.run_button),
            ("status", self.status), ("error", self.error), ("output_image", self.output_image),
            ("answer", self.answer), ("time", self.time),
        ):  # fmt: skip
            widget.add_class(CSS_CLASSES[name])

        self._source_boxes = {"sample": self.sample, "upload": self.upload, "path": self.path}
        self.source.observe(self._on_source, names="value")
        self.sample.observe(self._on_image_change, names="value")
        self.path.observe(self._on_image_change, names="value")
        self.upload.observe(self._on_upload, names="value")
        self.task.observe(self._on_task, names="value")
        self.run_button.on_click(lambda _button: self.run())

        answer_column = widgets.VBox(
            [self.time, self.answer], layout=widgets.Layout(flex="1 1 auto", min_width="300px", margin="0 0 0 12px")
        )
        output = widgets.HBox([self.output_image, answer_column], layout=widgets.Layout(align_items="flex-start"))
        super().__init__(
            [
                widgets.HTML("<b>Florence-2 demo</b>: choose an image and a task, then press <b>Run</b>."),
                self.source,
                widgets.HBox([self.sample, self.upload, self.path]),
                self.image_info,
                self.task,
                self.text,
                self.hint,
                widgets.HBox([self.run_button, self.status], layout=widgets.Layout(align_items="center")),
                self.error,
                output,
            ]  # fmt: skip
        )
        self.add_class(CSS_CLASSES["demo"])
        self._on_source()
        self._on_task()

    # --- reacting to the controls ---------------------------------------------------------------------------

    def _sample_label(self, name: str) -> str:
        description = SAMPLE_DESCRIPTIONS.get(name, "") if isinstance(self.samples[name], str) else ""
        return f"{name}: {description.split(':', 1)[-1].split('(')[0].strip()}" if description else name

    def _on_source(self, _change: Any = None) -> None:
        for key, box in self._source_boxes.items():
            box.layout.display = None if key == self.source.value else "none"
        self._on_image_change()

    def _on_upload(self, _change: Any = None) -> None:
        if self.upload.value:
            self.source.value = "upload"  # uploading a file means "use it"
        self._on_image_change()

    def _on_image_change(self, _change: Any = None) -> None:
        """Show the chosen image's size: region tasks need pixel coordinates inside it."""
        try:
            picture = _open_image(self.current_image())
        except Exception as error:
            self.image_info.value = f"<span style='color:#a50e0e'>{html.escape(_error_message(error))}</span>"
            return
        self.image_info.value = f"<small>Image size: {picture.width} × {picture.height} px (width × height)</small>"

    def _on_task(self, _change: Any = None) -> None:
        """Enable the text box only for tasks that take text, and show what to type."""
        task = self.task.value
        takes_text = task_takes_text(task)
        self.text.disabled = not takes_text
        hint = task_hint(task)
        self.text.placeholder = hint if takes_text else "This task takes no text."
        self.text.description = "Region:" if TASKS.get(task) and TASKS[task].text_kind == "region" else "Text:"
        self.hint.value = f"<small>ℹ️ {html.escape(hint)}</small>"

    def current_image(self) -> Any:
        """What the Run button would send: a sample, the uploaded bytes, or the typed path."""
        if self.source.value == "upload":
            return bytes(self.upload.value[0]["content"]) if self.upload.value else None
        if self.source.value == "path":
            return self.path.value
        value = self.samples[self.sample.value]
        return load_sample(value) if isinstance(value, str) and value in list_samples() else value

    # --- running --------------------------------------------------------------------------------------------

    def run(self) -> DemoResult:
        """What the Run button does: disable it, run :func:`run_demo_request`, show the result or the error."""
        self.run_button.disabled = True
        self.run_button.description = BUSY_LABEL
        self.run_button.icon = "hourglass-half"
        self.status.value = "<i>Running the model…</i>"
        self.error.layout.display = "none"
        try:
            try:
                image = self.current_image()
            except Exception as error:
                result = DemoResult(None, {}, 0.0, _error_message(error), str(self.task.value))
            else:
                text = self.text.value if task_takes_text(self.task.value) else None
                result = run_demo_request(self.model, self.processor, image, self.task.value, text,
                                          **self.generate_kwargs)  # fmt: skip
            self.show(result)
            return result
        finally:
            self.run_button.disabled = False
            self.run_button.description = RUN_LABEL
            self.run_button.icon = "play"

    def show(self, result: DemoResult) -> None:
        """Fill the output widgets from ``result``."""
        self.last_result = result
        if result.error is not None:
            self.error.value = f"<div style='{_ERROR_STYLE}'>⚠️ {html.escape(result.error)}</div>"
            self.error.layout.display = None
            self.status.value = "<span style='color:#a50e0e'>Failed — see the message below.</span>"
            return
        self.error.value = ""
        self.output_image.value = _png(result.image_drawn) if result.image_drawn is not None else b""
        self.answer.value = f"<pre style='{_ANSWER_STYLE}'>{html.escape(answer_to_json(result.answer))}</pre>"
        self.time.value = f"<b>Answered in {result.seconds:.2f} s</b> — {html.escape(result.task)}"
        texts = [value for value in result.answer.values() if isinstance(value, str)]
        summary = f" Answer: <i>{html.escape(texts[0][:200])}</i>" if texts else ""
        self.status.value = f"<span style='color:#1e7e34'>Done.</span>{summary}"


def build_demo(
    model: Any,
    processor: Any,
    *,
    samples: Sequence[str] | Mapping[str, Any] | None = None,
    default_sample: str | None = None,
    default_task: str = "<OD>",
    generate_kwargs: Mapping[str, Any] | None = None,
) -> FlorenceDemo:
    """The interactive demo as one ipywidgets widget; display it as a cell's last line.
    Taught in ``notebooks/10_interactive_demo.ipynb``.

    ``samples``: ``None`` for every image shipped in :mod:`helpers.course.samples`, a list of their names, or a dict
    ``{name: path or PIL image}`` of your own. ``default_task``: the task selected at first (token or cascade
    name). ``generate_kwargs`` go to every ``generate`` call (e.g. ``{"num_beams": 1}`` for speed). The Run button
    calls :func:`run_demo_request`; ``demo.run()`` does the same from code, and ``demo.last_result`` holds the
    latest :class:`DemoResult`.
    """
    return FlorenceDemo(model, processor, samples=samples, default_sample=default_sample, default_task=default_task,
                        generate_kwargs=generate_kwargs)  # fmt: skip
