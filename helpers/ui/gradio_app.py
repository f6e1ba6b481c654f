"""The same demo as a gradio web page, for people who prefer a browser tab to a notebook widget.

gradio is an optional extra, not in ``requirements.txt`` (it is large and pins its own versions of common
packages): ``pip install gradio`` in the environment first. This module imports gradio only inside
:func:`build_gradio_app` / :func:`launch_gradio_app`, so ``import helpers.ui.gradio_app`` works without it, and
:func:`gradio_callback` — the function the page calls, built on :func:`helpers.ui.demo.run_demo_request` — can be
used and tested anywhere.

The app listens on ``127.0.0.1`` only (this machine), never on the network, and never creates a public share link.

Taught in ``notebooks/10_interactive_demo.ipynb``.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from PIL import Image

from helpers.ui.demo import run_demo_request, task_hint, task_takes_text
from helpers.course.samples import list_samples, sample_path
from helpers.tasks.run import CASCADED_TASKS, TASKS

__all__ = ["GRADIO_MISSING", "build_gradio_app", "gradio_callback", "launch_gradio_app", "task_choices"]

GRADIO_MISSING = (
    "gradio is not installed. It is an optional extra of this collection: run `pip install gradio` "
    "(in a notebook: `%pip install gradio`) in this environment, restart the kernel, and try again. "
    "The ipywidgets demo (helpers.ui.demo.build_demo) needs nothing extra."
)
#: The only address the app listens on: this machine.
HOST = "127.0.0.1"


def _import_gradio() -> Any:
    try:
        import gradio
    except ImportError as error:
        raise ImportError(GRADIO_MISSING) from error
    return gradio


def task_choices() -> list[tuple[str, str]]:
    """``(label, value)`` pairs for a task dropdown: the 15 tasks, then the 3 cascades."""
    tasks = [(f"{spec.name}  {token}", token) for token, spec in TASKS.items()]
    return tasks + [(name, name) for name in CASCADED_TASKS]


def gradio_callback(
    model: Any, processor: Any, **generate_kwargs: Any
) -> Callable[[Image.Image | str | None, str, str | None], tuple[Image.Image | None, dict[str, Any], str]]:
    """The function the gradio page calls: ``(image, task, text) -> (drawn image, answer, status markdown)``.

    A thin wrapper over :func:`helpers.ui.demo.run_demo_request`: errors come back in the status text (with
    ``⚠️``), not as exceptions, and the drawn image is ``None`` then. Region tasks take a pixel box
    ``x1, y1, x2, y2`` in the text box.
    """

    def callback(
        image: Image.Image | str | None, task: str, text: str | None
    ) -> tuple[Image.Image | None, dict[str, Any], str]:
        result = run_demo_request(model, processor, image, task, text if task_takes_text(task) else None,
                                  **generate_kwargs)  # fmt: skip
        if result.error is not None:
            return None, {}, f"⚠️ **Error:** {html.escape(result.error)}"
        return result.image_drawn, result.answer, f"Answered in **{result.seconds:.2f} s** (`{result.task}`)"

    return callback


def build_gradio_app(
    model: Any,
    processor: Any,
    *,
    samples: Sequence[str] | None = None,
    default_task: str = "<OD>",
    generate_kwargs: Mapping[str, Any] | None = None,
) -> Any:
    """A ``gradio.Blocks`` app: image (upload, paste or a sample), task, text, Run; drawing, JSON answer, time.

    Raises ``ImportError`` saying how to install gradio when it is missing. Start it with
    :func:`launch_gradio_app` (or ``app.launch(server_name="127.0.0.1")``).
    """
    gr = _import_gradio()
    callback = gradio_callback(model, processor, **dict(generate_kwargs or {}))
    choices = task_choices()
    if default_task not in {value for _, value in choices}:
        raise ValueError(f"Unknown default_task {default_task!r}; choose one of {', '.join(v for _, v in choices)}.")

    def on_task(task: str) -> Any:
        takes = task_takes_text(task)
        return gr.Textbox(interactive=takes, placeholder=task_hint(task) if takes else "This task takes no text.")

    with gr.Blocks(title="Florence-2 on OpenVINO", analytics_enabled=False) as app:  # no calls home
        gr.Markdown("## Florence-2 on OpenVINO\nChoose an image and a task, then press **Run**.")
        with gr.Row():
            with gr.Column():
                # A file path, not a decoded picture: load_image reads the pixel count from the header and refuses
                # a decompression bomb before decoding it (type="pil" decoded a 12000² upload first: +700 MB).
                image = gr.Image(type="filepath", image_mode=None, label="Image", sources=["upload", "clipboard"])
                task = gr.Dropdown(choices=choices, value=default_task, label="Task")
                text = gr.Textbox(label="Text (or region x1, y1, x2, y2 in pixels)", interactive=False,
                                  placeholder="This task takes no text.")  # fmt: skip
                run = gr.Button("Run", variant="primary")
                gr.Examples([[str(sample_path(name))] for name in (samples or list_samples())], inputs=[image])
            with gr.Column():
                drawn = gr.Image(type="pil", label="Answer drawn on the image")
                status = gr.Markdown()
                answer = gr.JSON(label="Raw answer")
        task.change(on_task, inputs=task, outputs=text)
        run.click(callback, inputs=[image, task, text], outputs=[drawn, answer, status], concurrency_limit=1)
    return app


def launch_gradio_app(model: Any, processor: Any, *, port: int | None = None, **build_kwargs: Any) -> Any:
    """Build the app and serve it on http://127.0.0.1:PORT (no public link). Taught in
    ``notebooks/10_interactive_demo.ipynb``.

    In a notebook the call returns once the server runs; stop it with ``app.close()``. In a script it blocks
    until you press Ctrl+C. ``port=None`` lets gradio pick a free one (7860 first).
    """
    app = build_gradio_app(model, processor, **build_kwargs)
    app.launch(server_name=HOST, server_port=port, share=False, inbrowser=False)
    return app
