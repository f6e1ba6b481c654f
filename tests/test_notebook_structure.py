"""Every lesson in notebooks/ follows the collection's shape (see docs/CONTRIBUTING.md).

Checked per notebook: stored clean (no outputs, no execution counts, minimal metadata — fix with
``python scripts/strip_notebooks.py``); a ``# `` title first; a "What you will learn" section; a table of contents
whose anchors exist; a parameters cell reading ``FLORENCE2_MODEL`` from the environment; prose before every code
cell; a last cell linking to the next lesson; every relative link resolving; none of the forbidden patterns
(``trust_remote_code``, ``sys.path`` edits, ``!pip``, torchvision/timm).

These tests read the notebooks; running them is nbval's job (``make test``).
"""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
STRIP_HINT = "run `.venv/bin/python scripts/strip_notebooks.py` (or `python scripts/strip_notebooks.py`) and commit"

DEFAULT_MODEL = "florence-community/Florence-2-base-ft"
#: Notebooks that need no parameters cell, with the reason. An exempt notebook must not load a model.
EXEMPT_FROM_PARAMETERS: dict[str, str] = {
    "00_setup.ipynb": "checks the installation and explains the offline model; it loads no Florence-2 model",
}

NOTEBOOK_NAME = re.compile(r"^\d\d_[a-z0-9_]+\.ipynb$")
LINK = re.compile(r"!?\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(?P<text>.+?)\s*#*\s*$", re.MULTILINE)
HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)\s*=\s*[\"'](?P<id>[^\"']+)[\"']", re.IGNORECASE)
PARAMETERS = re.compile(
    r"os\.(?:environ\.get|getenv)\(\s*[\"']FLORENCE2_MODEL[\"']\s*,\s*[\"']" + re.escape(DEFAULT_MODEL) + r"[\"']\s*\)"
)
LOADS_A_MODEL = re.compile(r"\b(?:from_pretrained|OVFlorence2Model|convert_florence2|run_task)\s*\(")
FORBIDDEN_IN_CODE = {
    "trust_remote_code (transformers has Florence-2 natively)": re.compile(r"trust_remote_code"),
    "a sys.path edit (helpers is installed; import it)": re.compile(
        r"sys\.path\s*(?:\.\s*(?:append|insert|extend|remove)\b|\+?=|\[)"
    ),
    "!pip (use %pip, which installs into the kernel's own environment)": re.compile(
        r"^\s*!\s*(?:pip3?|python3?\s+-m\s+pip)\b", re.MULTILINE
    ),
    "torchvision or timm (they pull a multi-GB CUDA build of torch)": re.compile(
        r"^\s*(?:import|from)\s+(?:torchvision|timm)\b|%pip\s+install\b.*\b(?:torchvision|timm)\b", re.MULTILINE
    ),
}


def _params():
    if not NOTEBOOKS:
        return [pytest.param(None, marks=pytest.mark.skip(reason="notebooks/ has no notebooks yet"), id="no-notebooks")]
    return [pytest.param(path, id=path.name) for path in NOTEBOOKS]


@pytest.fixture(params=_params())
def notebook_path(request) -> Path:
    return request.param


@pytest.fixture
def notebook(notebook_path: Path) -> nbformat.NotebookNode:
    return nbformat.read(notebook_path, as_version=4)


def _markdown(notebook: nbformat.NotebookNode) -> list[str]:
    return [cell.source for cell in notebook.cells if cell.cell_type == "markdown"]


def _code(notebook: nbformat.NotebookNode) -> list[str]:
    return [cell.source for cell in notebook.cells if cell.cell_type == "code"]


def _plain_heading(text: str) -> str:
    """Heading text as rendered: no markdown emphasis, code ticks or link syntax."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    return text.replace("`", "").replace("**", "").strip()


def _anchors(notebook: nbformat.NotebookNode) -> set[str]:
    """Anchor ids a link may target: JupyterLab's (spaces → '-'), GitHub-style slugs, explicit <a id=...>."""
    anchors: set[str] = set()
    for source in _markdown(notebook):
        for match in HEADING.finditer(source):
            text = _plain_heading(match.group("text"))
            anchors.add(text.replace(" ", "-").lower())
            anchors.add(re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-"))
        anchors.update(match.group("id").lower() for match in HTML_ANCHOR.finditer(source))
    return anchors


def _links(source: str) -> list[tuple[str, str]]:
    return [(m.group("text"), m.group("target")) for m in LINK.finditer(source)]


def _is_external(target: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target))  # https:, mailto:, ...


def test_file_name(notebook_path: Path):
    assert NOTEBOOK_NAME.match(notebook_path.name), (
        f"{notebook_path.name}: lessons are named NN_lowercase_name.ipynb (e.g. 04_captioning.ipynb)"
    )


def test_valid_nbformat(notebook_path: Path):
    nbformat.validate(nbformat.read(notebook_path, as_version=4))


def test_stored_without_outputs(notebook_path: Path, notebook):
    dirty = [
        index + 1
        for index, cell in enumerate(notebook.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not dirty, f"{notebook_path.name}: cells {dirty} have outputs or execution counts; {STRIP_HINT}"


def test_minimal_metadata(notebook_path: Path, notebook):
    extra = set(notebook.metadata) - {"kernelspec", "language_info"}
    assert not extra, f"{notebook_path.name}: notebook metadata {sorted(extra)} (e.g. widget state); {STRIP_HINT}"
    assert set(notebook.metadata.get("language_info", {})) <= {"name"}, (
        f"{notebook_path.name}: language_info carries version details; {STRIP_HINT}"
    )
    kernel = notebook.metadata.get("kernelspec", {}).get("name", "python3")
    assert kernel == "python3", f"{notebook_path.name}: kernelspec {kernel!r} is machine-specific; {STRIP_HINT}"
    noisy = [index + 1 for index, cell in enumerate(notebook.cells) if set(cell.metadata) - {"tags"}]
    assert not noisy, f"{notebook_path.name}: cells {noisy} carry metadata other than tags; {STRIP_HINT}"


def test_title_first(notebook_path: Path, notebook):
    assert notebook.cells, f"{notebook_path.name} is empty"
    first = notebook.cells[0]
    assert first.cell_type == "markdown", f"{notebook_path.name}: the first cell must be markdown with the title"
    first_line = next((line for line in first.source.splitlines() if line.strip()), "")
    assert first_line.startswith("# "), f"{notebook_path.name}: the first cell must start with a '# Title' line"


def test_what_you_will_learn(notebook_path: Path, notebook):
    headings = [m.group("text") for source in _markdown(notebook) for m in HEADING.finditer(source)]
    assert any("what you will learn" in _plain_heading(h).lower() for h in headings), (
        f"{notebook_path.name}: add a '## What you will learn' section near the top"
    )


def test_table_of_contents(notebook_path: Path, notebook):
    toc_cells = [s for s in _markdown(notebook) if sum(t.startswith("#") for _, t in _links(s)) >= 2]
    assert toc_cells, (
        f"{notebook_path.name}: add a table of contents: a markdown list of links to the sections, "
        "e.g. '- [Convert the model](#Convert-the-model)'"
    )


def test_anchor_links_resolve(notebook_path: Path, notebook):
    anchors = _anchors(notebook)
    broken = [
        target
        for source in _markdown(notebook)
        for _, target in _links(source)
        if target.startswith("#") and urllib.parse.unquote(target[1:]).lower() not in anchors
    ]
    assert not broken, f"{notebook_path.name}: links to anchors no heading or <a id> defines: {broken}"


def test_relative_links_exist(notebook_path: Path, notebook):
    missing = []
    for source in _markdown(notebook):
        for _, target in _links(source):
            if target.startswith("#") or _is_external(target):
                continue
            path = urllib.parse.unquote(target.split("#", 1)[0])
            if not (notebook_path.parent / path).exists():
                missing.append(target)
    assert not missing, f"{notebook_path.name}: links to files that do not exist: {missing}"


def test_parameters_cell(notebook_path: Path, notebook):
    code = _code(notebook)
    has_parameters = any(PARAMETERS.search(source) for source in code)
    if notebook_path.name in EXEMPT_FROM_PARAMETERS:
        loading = [source.strip().splitlines()[0] for source in code if LOADS_A_MODEL.search(source)]
        assert has_parameters or not loading, (
            f"{notebook_path.name} is exempt from the parameters cell "
            f"({EXEMPT_FROM_PARAMETERS[notebook_path.name]!r}) but loads a model in cells starting {loading}: "
            "give it a parameters cell"
        )
        return
    assert has_parameters, (
        f"{notebook_path.name}: add a parameters code cell with "
        f'MODEL_ID = os.environ.get("FLORENCE2_MODEL", "{DEFAULT_MODEL}") '
        "so tests and `make run` can swap in the offline model"
    )


def test_prose_before_every_code_cell(notebook_path: Path, notebook):
    def has_prose_before(index: int) -> bool:
        before = notebook.cells[index - 1] if index > 0 else None
        return before is not None and before.cell_type == "markdown" and bool(before.source.strip())

    cells = enumerate(notebook.cells)
    bare = [index + 1 for index, cell in cells if cell.cell_type == "code" and not has_prose_before(index)]
    assert not bare, f"{notebook_path.name}: code cells {bare} need a markdown cell right before them saying why"


def test_last_cell_links_onward(notebook_path: Path, notebook):
    last = notebook.cells[-1]
    assert last.cell_type == "markdown", f"{notebook_path.name}: the last cell must be markdown linking onward"
    targets = {target.removeprefix("./").split("#", 1)[0] for _, target in _links(last.source)}
    position = NOTEBOOKS.index(notebook_path)
    if position + 1 < len(NOTEBOOKS):
        expected = NOTEBOOKS[position + 1].name
        assert expected in targets and re.search(r"\bnext\b", last.source, re.IGNORECASE), (
            f"{notebook_path.name}: the last cell must say 'Next' and link to [{expected}]({expected}); "
            f"it links to {sorted(targets)}"
        )
    else:
        allowed = {NOTEBOOKS[0].name, "../README.md"}
        assert targets & allowed, (
            f"{notebook_path.name} is the last lesson: its last cell must link back to {NOTEBOOKS[0].name} "
            f"or ../README.md; it links to {sorted(targets)}"
        )


def test_no_forbidden_code(notebook_path: Path, notebook):
    found = [
        f"{what} in code cell starting {source.strip().splitlines()[0]!r}"
        for source in _code(notebook)
        for what, pattern in FORBIDDEN_IN_CODE.items()
        if pattern.search(source)
    ]
    assert not found, f"{notebook_path.name}: " + "; ".join(found)
