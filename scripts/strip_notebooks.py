"""Strip notebooks in place so they are stored clean: no outputs, no execution counts, minimal metadata.

Run it before committing a notebook (``tests/test_notebook_structure.py`` fails on an unstripped one):

    .venv/bin/python scripts/strip_notebooks.py              # every notebooks/*.ipynb
    .venv/bin/python scripts/strip_notebooks.py notebooks/04_captioning.ipynb
    .venv/bin/python scripts/strip_notebooks.py --check      # change nothing; exit 1 if a notebook needs stripping

What is kept: cell sources, attachments, cell ids and cell tags (nbval reads tags such as ``nbval-skip``).
What is removed: outputs, execution counts, widget state, and every other notebook or cell metadata field
(timings, collapsed/scrolled flags, editor state). The kernelspec becomes the standard ``python3`` one and
``language_info`` keeps only its name, so re-running a notebook on another machine leaves no diff.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parent.parent

#: The only notebook-level metadata a stored notebook keeps.
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
LANGUAGE_INFO = {"name": "python"}
#: The only cell-level metadata a stored notebook keeps.
KEPT_CELL_METADATA = ("tags",)


def strip_notebook(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Strip ``notebook`` in place (and return it): outputs, execution counts, all but minimal metadata."""
    notebook.metadata = nbformat.from_dict({"kernelspec": dict(KERNELSPEC), "language_info": dict(LANGUAGE_INFO)})
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        kept = {key: cell.metadata[key] for key in KEPT_CELL_METADATA if cell.metadata.get(key)}
        cell.metadata = nbformat.from_dict(kept)
    return notebook


def strip_file(path: Path, *, check: bool = False) -> bool:
    """Strip one notebook file. Returns whether it needs (``check``) or got changes; unchanged files stay untouched."""
    original = path.read_text(encoding="utf-8")
    notebook = nbformat.reads(original, as_version=4)
    stripped = nbformat.writes(strip_notebook(notebook)) + "\n"
    if stripped == original:
        return False
    if not check:
        path.write_text(stripped, encoding="utf-8")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", type=Path, help="notebooks to strip (default: notebooks/*.ipynb)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if any notebook needs stripping")
    args = parser.parse_args(argv)

    paths = args.paths or sorted((REPO / "notebooks").glob("*.ipynb"))
    changed = [path for path in paths if strip_file(path, check=args.check)]
    for path in changed:
        print(f"{'needs stripping' if args.check else 'stripped'}: {path}")
    if args.check and changed:
        print(f"run: python {Path(__file__).resolve().relative_to(REPO)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
