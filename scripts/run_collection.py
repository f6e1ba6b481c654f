"""Run every lesson of the collection headless, in order, and keep the executed copies.

This is what ``make run`` does:

1. choose the model the notebooks use: ``FLORENCE2_MODEL`` if you set it (a hub id, a local folder, ``teaching``,
   ``tiny``), else ``florence-community/Florence-2-base-ft``. A hub id is used when it can be had without a download
   (a classroom kit in ``FLORENCE2_KIT``, an earlier conversion, the Hugging Face cache) or the hub answers. When the
   default model cannot be had, the run says so and uses the teaching model shipped in ``helpers/data/teaching-model``
   (trained here on generated shape scenes: the lessons then show it such a scene and its answers are real there;
   if it is missing, a tiny random-weight model whose answers are noise). Any other model that cannot be had stops
   the run before the first notebook;
2. execute ``notebooks/NN_*.ipynb`` one after the other in fresh kernels started in ``notebooks/``;
3. write each executed notebook to ``output/`` as ``.ipynb`` and ``.html``. The HTML page is static: it says that
   widgets need a live kernel and shows their text form (ipywidgets' page JavaScript ships in no Python package,
   and an offline page must not fetch it from a CDN).

It stops at the first notebook that fails, names the notebook and the cell, and exits non-zero. The executed copy
of the failing notebook is still written, so the traceback can be read in ``output/``.

Environment passed to the kernels: ``FLORENCE2_MODEL`` (the model chosen above), ``FLORENCE2_DEVICE`` (default
``AUTO``) and whatever else you set, e.g. ``FLORENCE2_KIT`` or ``FLORENCE2_MODELS_DIR`` (where conversions are cached,
default ``<repo>/models``).

Usage: ``python scripts/run_collection.py [NAME ...] [--timeout SECONDS] [--output-dir DIR]``; each NAME selects the notebooks whose
file name starts with it (``04`` or ``04_captioning``).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS_DIR = REPO / "notebooks"
OUTPUT_DIR = REPO / "output"
NOTEBOOK_NAME = re.compile(r"^\d\d_.+\.ipynb$")


def choose_model() -> str:
    """The model the notebooks will use: ``FLORENCE2_MODEL`` (default Florence-2-base-ft) when it can be had — a
    local folder, the classroom kit (``FLORENCE2_KIT``), the converted-model cache, the Hugging Face cache or the
    hub; for the default model otherwise the offline teaching model (else the tiny one), announced as such. Any
    other model that cannot be had stops the run before a notebook starts."""
    from helpers.course.checkpoints import (
        DEFAULT_MODEL,
        TEACHING_MODEL,
        hub_model_unavailable,
        hub_reachable,
        resolve_model,
    )
    from helpers.course.teaching import TEACHING_MODEL_DIR

    if not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"  # the kernels must not wait on the network either
    asked = os.environ.get("FLORENCE2_MODEL", "").strip()
    model = asked or DEFAULT_MODEL
    if model != DEFAULT_MODEL and (reason := hub_model_unavailable(model)) is not None:
        raise SystemExit(
            f"error: {model} (FLORENCE2_MODEL) cannot be loaded: {reason}. Download it once (`hf download {model}`), "
            "point FLORENCE2_KIT at a classroom kit that holds it, or set FLORENCE2_MODEL to a local model folder."
        )
    if model == DEFAULT_MODEL and (fallback := resolve_model(model)) != model:  # says why, and which model instead
        return TEACHING_MODEL if fallback == str(TEACHING_MODEL_DIR) else fallback
    print(f"Model: {model} ({'from FLORENCE2_MODEL' if asked else 'the default'})")
    return model


def find_notebooks(selectors: list[str]) -> list[Path]:
    notebooks = sorted(p for p in NOTEBOOKS_DIR.glob("*.ipynb") if NOTEBOOK_NAME.match(p.name))
    if selectors:
        unknown = [s for s in selectors if not any(p.name.startswith(s) for p in notebooks)]
        if unknown:
            names = ", ".join(p.name for p in notebooks) or "none"
            raise SystemExit(f"error: no notebook starts with {', '.join(unknown)} (notebooks: {names})")
        notebooks = [p for p in notebooks if any(p.name.startswith(s) for s in selectors)]
    return notebooks


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
#: Shown at the top of an HTML copy that had widgets: their JavaScript (ipywidgets' HTML manager) ships in no Python
#: package, and the page must not load it from a CDN, so the copy shows each widget's text form instead.
WIDGETS_NOTE = (
    "> **This page is a static copy of an executed lesson.** Widgets (the model, format and device selectors, the "
    "demo, progress bars) need a live kernel: open the notebook in Jupyter (`make lab`) to use them. Where a widget "
    "was, this page shows its text form."
)


def static_copy(notebook):
    """A copy of ``notebook`` for the HTML page: widget views replaced by their text form, the widget state dropped
    (so the page loads no widget JavaScript from a CDN), and a note saying so when there were widgets."""
    import copy

    import nbformat

    page = copy.deepcopy(notebook)
    had_widgets = False
    for cell in page.cells:
        for output in cell.get("outputs", []):
            if WIDGET_VIEW in output.get("data", {}):
                had_widgets = True
                del output["data"][WIDGET_VIEW]
    page.metadata.pop("widgets", None)
    if had_widgets:
        page.cells.insert(0, nbformat.v4.new_markdown_cell(WIDGETS_NOTE))
    return page


def write_outputs(notebook, name: str, output_dir: Path = OUTPUT_DIR) -> tuple[Path, Path]:
    """Write the executed notebook (widget state included) and its HTML rendering (see :func:`static_copy`) to
    ``output_dir``."""
    import nbformat
    from nbconvert import HTMLExporter

    output_dir.mkdir(parents=True, exist_ok=True)
    ipynb_path = output_dir / name
    nbformat.write(notebook, ipynb_path)
    html, _ = HTMLExporter().from_notebook_node(static_copy(notebook))
    html_path = ipynb_path.with_suffix(".html")
    html_path.write_text(html, encoding="utf-8")
    return ipynb_path, html_path


def describe_failure(notebook, cell_index: int | None, error: BaseException) -> str:
    """Where a notebook failed: cell number (1-based, counting every cell), its first source line, the error."""
    lines = []
    if cell_index is not None:
        cell = notebook.cells[cell_index]
        code_number = sum(1 for c in notebook.cells[: cell_index + 1] if c.cell_type == "code")
        first_line = next((line for line in cell.source.splitlines() if line.strip()), "")
        lines.append(f"  cell {cell_index + 1} of {len(notebook.cells)} (code cell #{code_number}): {first_line[:90]}")
    ename = getattr(error, "ename", type(error).__name__)
    evalue = getattr(error, "evalue", str(error))
    lines.append(f"  error: {ename}: {evalue}".rstrip())
    return "\n".join(lines)


def run_notebook(path: Path, timeout: int) -> tuple[object, int | None, BaseException | None]:
    """Execute one notebook in a fresh kernel started in notebooks/. Returns (notebook, failing cell, error)."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    current = {"index": None}

    def on_cell_start(cell, cell_index):
        current["index"] = cell_index

    client = NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name="python3",  # runs on this script's own interpreter (the project's venv)
        resources={"metadata": {"path": str(path.parent)}},
        on_cell_start=on_cell_start,
    )
    try:
        client.execute()
    except Exception as error:  # CellExecutionError, CellTimeoutError, DeadKernelError...
        return notebook, current["index"], error
    return notebook, None, None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="run only notebooks whose file name starts with one of these")
    parser.add_argument(
        "--timeout",
        type=int,
        default=int(os.environ.get("FLORENCE2_CELL_TIMEOUT", "3600")),
        help="seconds one cell may take (default 3600, or FLORENCE2_CELL_TIMEOUT)",
    )
    parser.add_argument(
        "--output-dir", type=Path, default=OUTPUT_DIR, help=f"where executed copies go (default {OUTPUT_DIR})"
    )
    args = parser.parse_args(argv)

    notebooks = find_notebooks(args.names)
    if not notebooks:
        print(f"error: no lessons to run: {NOTEBOOKS_DIR} has no NN_*.ipynb notebooks.", file=sys.stderr)
        return 1

    os.environ["FLORENCE2_MODEL"] = choose_model()
    os.environ.setdefault("FLORENCE2_DEVICE", "AUTO")
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # quiets a debugger warning at kernel start
    from helpers.course.checkpoints import kit_from_env, models_dir

    kit = kit_from_env()
    print(
        f"Device: {os.environ['FLORENCE2_DEVICE']}; converted models cached in {models_dir()}"
        + (f"; classroom kit: {kit}" if kit else "")
    )
    print(f"Running {len(notebooks)} notebook(s); executed copies go to {args.output_dir}/\n")

    started = time.perf_counter()
    for number, path in enumerate(notebooks, 1):
        print(f"[{number}/{len(notebooks)}] {path.name} ...", flush=True)
        t0 = time.perf_counter()
        notebook, cell_index, error = run_notebook(path, args.timeout)
        seconds = time.perf_counter() - t0
        ipynb_path, html_path = write_outputs(notebook, path.name, args.output_dir)
        if error is not None:
            print(f"[{number}/{len(notebooks)}] {path.name} FAILED after {seconds:.1f} s", flush=True)
            print(f"\nFAILED: notebooks/{path.name}", file=sys.stderr)
            print(describe_failure(notebook, cell_index, error), file=sys.stderr)
            where = f"{ipynb_path} and {html_path}"
            print(f"  full traceback: {where}", file=sys.stderr)
            skipped = notebooks[number:]
            if skipped:
                print(f"  not run: {', '.join(p.name for p in skipped)}", file=sys.stderr)
            return 1
        print(f"[{number}/{len(notebooks)}] {path.name} ok in {seconds:.1f} s", flush=True)

    # A lesson that cannot use this model (e.g. one needing PyTorch weights a kit lacks) says so in its own output.
    print(
        f"\nAll {len(notebooks)} notebook(s) ran with FLORENCE2_MODEL={os.environ['FLORENCE2_MODEL']} in "
        f"{time.perf_counter() - started:.1f} s; see {args.output_dir}/"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
