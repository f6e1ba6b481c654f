"""Every executed task lesson (04–10) on the teaching model, read output by output: no answer to a task the model
was trained on is empty, no mask of such a task is all black, and no answer's label carries a raw ``<loc_N>`` token.

The lessons run once, in fresh kernels, as ``make run`` runs them (``scripts/run_collection.py``), about a minute in
all. To check notebooks that ``make run`` already executed on the teaching model instead, point
``FLORENCE2_EXECUTED_LESSONS`` at that folder (``output/``).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest

from helpers.course.teaching import TEACHING_MODEL_DIR, teaching_model_available
from helpers.tasks.run import LOCATION_TOKEN, TASKS

pytestmark = pytest.mark.skipif(not teaching_model_available(), reason="the teaching model is not installed")

REPO = Path(__file__).resolve().parent.parent
TASK_LESSONS = ("04", "05", "06", "07", "08", "09", "10")
#: What lesson 07 prints for the mask it draws from a <REFERRING_EXPRESSION_SEGMENTATION> answer.
MASK_LINE = re.compile(r"mask covers ([0-9.]+)% of the image")
ANSWER_LIST_KEYS = ("bboxes", "polygons", "quad_boxes")
LABEL_KEYS = ("labels", "bboxes_labels", "polygons_labels")


def parse_dict(text: str) -> dict | None:
    """The JSON or Python-literal dict that starts at the first ``{`` of ``text`` and runs to its end, if any."""
    if "{" not in text:
        return None
    body = text[text.index("{") :].strip()
    for parse in (json.loads, ast.literal_eval):
        try:
            value = parse(body)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        return value if isinstance(value, dict) else None
    return None


def printed_dicts(text: str) -> Iterator[dict]:
    """Every dict printed in ``text``: the whole output (multi-line JSON), else each line that ends in one."""
    whole = parse_dict(text)
    if whole is not None:
        yield whole
        return
    for line in text.splitlines():
        value = parse_dict(line)
        if value is not None:
            yield value


def task_answers(notebook) -> Iterator[tuple[int, str, object]]:
    """``(cell number, task, answer)`` for every ``{task: answer}`` dict a cell printed."""
    for number, cell in enumerate(notebook.cells, 1):
        for output in cell.get("outputs", []):
            text = output.get("text", "") if output.get("output_type") == "stream" else ""
            for printed in printed_dicts(text):
                for task, answer in printed.items():
                    if task in TASKS:
                        yield number, task, answer


def flagged_as_short(notebook) -> set[str]:
    """The tasks for which the lesson printed the teaching model's measured shortfall (:func:`untrained_notice`)."""
    texts = [o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", [])]
    return {task for text in texts for line in text.splitlines() if "falls short of its aim on" in line
            for task in TASKS if task in line}  # fmt: skip


def problems(notebook, trained: set[str]) -> list[str]:
    """What is wrong in an executed lesson for a model trained on ``trained``: empty answers and all-black masks of
    trained tasks (unless the lesson printed that the model falls short on that task, with its measured quality),
    and raw location tokens in any answer's labels."""
    trained = trained - flagged_as_short(notebook)
    found = []
    for number, task, answer in task_answers(notebook):
        if isinstance(answer, dict):
            labels = [label for key in LABEL_KEYS for label in answer.get(key, []) if isinstance(label, str)]
            raw = [label for label in labels if LOCATION_TOKEN.search(label)]
            if raw:
                found.append(f"cell {number}: {task} label(s) with raw location tokens: {raw}")
            empty = not any(answer.get(key) for key in ANSWER_LIST_KEYS)
        else:
            empty = not str(answer).strip()
        if empty and task in trained:
            found.append(f"cell {number}: empty {task} answer, a task the teaching model was trained on: {answer!r}")
    if "<REFERRING_EXPRESSION_SEGMENTATION>" in trained:
        for number, cell in enumerate(notebook.cells, 1):
            for output in cell.get("outputs", []):
                for share in MASK_LINE.findall(output.get("text", "")):
                    if float(share) == 0:
                        found.append(f"cell {number}: all-black mask from a trained segmentation task")
    return found


def run_collection_module():
    spec = importlib.util.spec_from_file_location("run_collection", REPO / "scripts" / "run_collection.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def executed_lessons(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, object]]:
    """The task lessons executed on the teaching model (or read from ``FLORENCE2_EXECUTED_LESSONS``)."""
    reuse = os.environ.get("FLORENCE2_EXECUTED_LESSONS")
    if reuse:
        paths = sorted(p for p in Path(reuse).glob("*.ipynb") if p.name[:2] in TASK_LESSONS)
        assert len(paths) == len(TASK_LESSONS), f"{reuse} lacks some of the lessons {TASK_LESSONS}"
        return [(p.name, nbformat.read(p, as_version=4)) for p in paths]
    runner = run_collection_module()
    executed = []
    with pytest.MonkeyPatch.context() as patch:  # the kernels inherit this process's environment
        patch.setenv("FLORENCE2_MODEL", "teaching")
        patch.setenv("FLORENCE2_DEVICE", "CPU")
        patch.delenv("FLORENCE2_KIT", raising=False)
        for path in runner.find_notebooks(list(TASK_LESSONS)):
            notebook, cell, error = runner.run_notebook(path, timeout=600)
            assert error is None, f"{path.name} failed:\n{runner.describe_failure(notebook, cell, error)}"
            executed.append((path.name, notebook))
    return executed


def test_every_task_lesson_answers_on_the_teaching_model(executed_lessons) -> None:
    from helpers.course.model_kind import teaching_tasks

    trained = set(teaching_tasks(TEACHING_MODEL_DIR))
    report = {name: problems(notebook, trained) for name, notebook in executed_lessons}
    seen = {task for _, notebook in executed_lessons for _, task, _ in task_answers(notebook)}
    assert trained <= seen, f"the lessons never printed an answer to {sorted(trained - seen)}"
    assert not any(report.values()), json.dumps({k: v for k, v in report.items() if v}, indent=1, ensure_ascii=False)
    for name, notebook in executed_lessons:  # the lessons ran on the model this test is about
        assert any("model kind: teaching" in o.get("text", "") or "TEACHING model" in o.get("text", "")
                   for cell in notebook.cells for o in cell.get("outputs", [])), name  # fmt: skip


def test_the_walk_finds_each_kind_of_problem() -> None:
    """The checks above can fail: a made-up executed notebook with each problem is reported three times."""
    printed = [
        '{"<OD>": {"bboxes": [], "labels": []}}',
        "answer: {'<OCR_WITH_REGION>': {'quad_boxes': [[1, 2, 3, 2, 3, 4, 1, 4]], 'labels': ['ship<loc_3><loc_4>']}}",
        "mask covers 0.0% of the image",
        '{"<DENSE_REGION_CAPTION>": {"bboxes": [], "labels": []}}',  # not trained: not a problem
    ]
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell("print(...)") for _ in printed]
    for cell, text in zip(notebook.cells, printed):
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=text + "\n")]
    found = problems(notebook, {"<OD>", "<OCR_WITH_REGION>", "<REFERRING_EXPRESSION_SEGMENTATION>"})
    assert len(found) == 3, found
    assert problems(notebook, {"<OCR_WITH_REGION>"}) == found[1:2]


def test_html_copies_say_widgets_need_a_kernel_and_load_no_widget_script(tmp_path: Path) -> None:
    """An executed lesson with a widget becomes a page that shows the widget's text form and the reason, offline."""
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell("model_widget")]
    notebook.cells[0].outputs = [nbformat.v4.new_output("execute_result", execution_count=1, data={
        "application/vnd.jupyter.widget-view+json": {"model_id": "abc", "version_major": 2, "version_minor": 0},
        "text/plain": "Dropdown(description='Model:', options=('teaching',), value='teaching')",
    })]  # fmt: skip
    notebook.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}, "version_major": 2}}
    ipynb_path, html_path = run_collection_module().write_outputs(notebook, "99_widget.ipynb", tmp_path)
    html = html_path.read_text()
    assert "need a live kernel" in html and "Dropdown(description=" in html
    assert "html-manager" not in html and "widget-view+json" not in html, "the page still wants widget JavaScript"
    assert "widgets" in nbformat.read(ipynb_path, as_version=4).metadata, "the .ipynb copy lost its widget state"


def test_task_caveats_follow_what_the_teaching_model_recorded(tmp_path: Path) -> None:
    """The lessons' caveats come from the model's own record: a retrained model that lists more tasks loses them."""
    from helpers.course.model_kind import TRAINED_TASKS_KEY, teaching_tasks, untrained_notice

    config = json.loads((TEACHING_MODEL_DIR / "config.json").read_text())
    retrained = tmp_path / "retrained"
    retrained.mkdir()
    (retrained / "config.json").write_text(json.dumps({**config, TRAINED_TASKS_KEY: list(TASKS)}))
    assert teaching_tasks(retrained) == tuple(TASKS)
    assert untrained_notice(retrained, ["<OD>", "<REGION_PROPOSAL>"]).startswith("✅")

    older = tmp_path / "older"
    older.mkdir()
    (older / "config.json").write_text(json.dumps({**config, TRAINED_TASKS_KEY: ["<CAPTION>", "<OD>"]}))
    notice = untrained_notice(older, ["<OD>", "<REGION_PROPOSAL>"])
    assert "not trained on <REGION_PROPOSAL>" in notice and "trained on <OD>" in notice
