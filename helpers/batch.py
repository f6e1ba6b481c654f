"""Run Florence-2 tasks over a folder of images: JSONL results, COCO JSON, drawings; resumable, failure-tolerant.

    python -m helpers photos/ --task "<OD>" --task "<CAPTION>" --output-dir out/ --coco --draw
    python -m helpers "scans/**/*.png" --task "<OCR_WITH_REGION>" --model tiny --batch-size 8

Every image gets one line in ``OUTPUT_DIR/results.jsonl``::

    {"file": "street.jpg", "width": 640, "height": 480,
     "results": {"<OD>": {"bboxes": [...], "labels": [...], "scores": [...]}, "<CAPTION>": "A street ..."}}

``file`` is relative to the folder (or to the fixed part of the glob). Box, polygon and OCR answers carry the
confidence scores of :mod:`helpers.scores` (``--no-scores`` to skip them); text answers are as ``run_task`` returns
them. An image that cannot be read or answered gets ``"error": "..."`` (with the answers that did succeed) and the
run goes on. Lines are appended after every batch, so an interrupted run loses at most one batch: run the same
command again and it skips every image already in the JSONL (``--retry-errors`` retries the failed ones; a new
``--task`` runs just that task on the images already done). ``--coco`` writes ``coco.json`` from all lines
(:func:`helpers.export.to_coco`), ``--draw`` saves ``drawings/<file>.<TASK>.png``.

Taught in ``notebooks/11_speed.ipynb`` (batches) and the README ("Use it in your own project").
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

__all__ = [
    "IMAGE_SUFFIXES",
    "BatchSummary",
    "ImageJob",
    "JobPlan",
    "answer_chunk",
    "append_records",
    "build_parser",
    "check_request",
    "draw_job",
    "find_images",
    "is_batch_source",
    "job_record",
    "main",
    "open_results",
    "plan_jobs",
    "process_images",
    "read_results",
    "wants_batch",
    "write_coco",
    "write_run_summary",
]

#: File types picked up from a folder (a glob takes whatever it matches).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
RESULTS_FILE = "results.jsonl"
COCO_FILE = "coco.json"
SUMMARY_FILE = "summary.json"
DRAWINGS_DIR = "drawings"
_GLOB_CHARS = ("*", "?", "[")


# ----------------------------------------------------------------------------------------------------------------
# Finding images and reading earlier results
# ----------------------------------------------------------------------------------------------------------------


def _is_glob(text: str) -> bool:
    return any(char in text for char in _GLOB_CHARS)


def is_batch_source(source: str | Path) -> bool:
    """True for a folder, or a glob pattern (``*``, ``?``, ``[``) that is not itself an existing file."""
    path = Path(source).expanduser()
    return path.is_dir() or (_is_glob(str(source)) and not path.is_file())


def _glob_root(pattern: str) -> Path:
    """The fixed leading folders of a glob: ``photos/2024/*.jpg`` → ``photos/2024``."""
    parts = Path(pattern).expanduser().parts
    fixed = []
    for part in parts[:-1]:
        if _is_glob(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def find_images(source: str | Path, *, recursive: bool = False) -> tuple[Path, list[Path]]:
    """``(root, image paths)`` for a folder (files with an image suffix, sorted; ``recursive`` descends into
    sub-folders) or a glob (every file it matches, sorted; ``**`` works). Raises ``ValueError`` when nothing is found.
    Taught in the README ("Use it in your own project")."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        candidates = path.rglob("*") if recursive else path.iterdir()
        files = sorted(p for p in candidates if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        root = path
        if not files:
            raise ValueError(
                f"No images in {path} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}"
                f"{'' if recursive else ', not in sub-folders: add --recursive'})."
            )
    elif _is_glob(text):
        root = _glob_root(text)
        files = sorted(Path(p) for p in glob.glob(str(Path(text).expanduser()), recursive=True) if Path(p).is_file())
        if not files:
            raise ValueError(f"The pattern {text!r} matches no files. Quote it so the shell does not expand it.")
    else:
        raise ValueError(
            f"{text} is neither a folder nor a glob pattern; for one image run `python -m helpers {text}`."
        )
    return root, files


def _key(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def read_results(path: str | Path) -> tuple[dict[str, dict[str, Any]], int]:
    """The records of a results JSONL by ``file`` (a later line for the same file wins) and the number of lines that
    could not be read (e.g. the half-written last line of an interrupted run). A missing file gives ``({}, 0)``."""
    records: dict[str, dict[str, Any]] = {}
    bad = 0
    path = Path(path)
    if not path.exists():
        return records, 0
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(record, dict) and isinstance(record.get("file"), str):
                records[record["file"]] = record
            else:
                bad += 1
    return records, bad


# ----------------------------------------------------------------------------------------------------------------
# Processing
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class BatchSummary:
    """What :func:`process_images` did: images answered now, skipped (already in the JSONL), failed now."""

    processed: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)
    unreadable_lines: int = 0
    results: Path | None = None
    coco: Path | None = None
    drawings: Path | None = None


@dataclass
class ImageJob:
    """One image still to answer: ``tasks`` are the missing ones, ``previous`` the answers an earlier run kept."""

    key: str
    path: Path
    tasks: list[str]
    previous: dict[str, Any]
    size: tuple[int, int] | None = None  # from an earlier line, for an image that no longer loads
    picture: Any = None
    results: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _task_file_name(task: str) -> str:
    return task.strip("<>").lower()


def _run_batch(model: Any, processor: Any, pictures: list[Any], task: str, text: Any, scores: bool,
               generate_kwargs: dict[str, Any]) -> list[Any]:  # fmt: skip
    from helpers.scores import SCORED_TASKS, run_tasks_batch_with_scores
    from helpers.tasks import run_tasks_batch

    if scores and task in SCORED_TASKS:
        outputs = run_tasks_batch_with_scores(model, processor, pictures, task, text, **generate_kwargs)
    else:
        outputs = run_tasks_batch(model, processor, pictures, task, text, **generate_kwargs)
    return [output[task] for output in outputs]


def _answer(jobs: list[ImageJob], model: Any, processor: Any, task: str, text: Any, scores: bool,
            generate_kwargs: dict[str, Any]) -> None:  # fmt: skip
    """Answer ``task`` for ``jobs`` in one batch; if the batch fails, one image at a time to find the culprit."""
    try:
        answers = _run_batch(model, processor, [j.picture for j in jobs], task, text, scores, generate_kwargs)
    except Exception:
        if len(jobs) == 1:
            raise
        for job in jobs:
            try:
                job.results[task] = _run_batch(model, processor, [job.picture], task, text, scores, generate_kwargs)[0]
            except Exception as error:  # noqa: BLE001 - one bad image must not stop the run
                job.errors.append(f"{task}: {type(error).__name__}: {error}")
        return
    for job, answer in zip(jobs, answers):
        job.results[task] = answer


def append_records(handle: Any, records: Iterable[dict[str, Any]]) -> None:
    """Append one JSONL line per record to the open results file and force them to disk (an interrupted run then
    loses at most the records not yet appended)."""
    for record in records:
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    handle.flush()
    os.fsync(handle.fileno())


def _ends_with_newline(path: Path) -> bool:
    if not path.exists() or path.stat().st_size == 0:
        return True
    with path.open("rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


@contextmanager
def open_results(results_path: Path) -> Iterator[TextIO]:
    """The results JSONL opened for appending, after ending a line an interrupted run left half-written."""
    needs_newline = not _ends_with_newline(results_path)
    with results_path.open("a", encoding="utf-8") as handle:
        if needs_newline:
            handle.write("\n")  # the previous run stopped in the middle of a line
        yield handle


def write_run_summary(output_dir: Path, facts: dict[str, Any]) -> Path:
    """``output_dir/summary.json``: what the last run did (engine, workers, images/second, the model that ran)."""
    path = Path(output_dir) / SUMMARY_FILE
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(facts, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    partial.replace(path)
    return path


def write_coco(results_path: Path, coco_path: Path) -> None:
    """``coco.json`` from every record of the results JSONL (:func:`helpers.export.to_coco`), written atomically."""
    from helpers.export import to_coco

    records, _ = read_results(results_path)
    dataset = to_coco(sorted(records.values(), key=lambda r: r["file"]))
    partial = coco_path.with_name(coco_path.name + ".partial")
    partial.write_text(json.dumps(dataset, ensure_ascii=False), encoding="utf-8")
    partial.replace(coco_path)


def check_request(tasks: Sequence[str] | str, text_input: str | None, batch_size: int) -> list[str]:
    """The task tokens of a request, checked before the first image (a missing text input, a bad batch size)."""
    from helpers.tasks import TASKS, build_prompt, resolve_task

    if isinstance(tasks, str):
        tasks = [tasks]
    tokens = list(dict.fromkeys(resolve_task(task) for task in tasks))
    if not tokens:
        raise ValueError('Give at least one task, e.g. --task "<OD>".')
    for token in tokens:  # fail before the first image, not at it
        build_prompt(token, text_input if TASKS[token].needs_text else None, image_size=(1000, 1000))
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    return tokens


@dataclass
class JobPlan:
    """What a run still has to do: ``jobs`` (images or tasks missing from ``results``), ``skipped`` images already
    done, and the unreadable lines found in the results file."""

    results: Path
    jobs: list[ImageJob]
    skipped: int
    unreadable_lines: int


def plan_jobs(
    source: str | Path, tokens: Sequence[str], output_dir: str | Path, *, retry_errors: bool = False,
    recursive: bool = False,
) -> JobPlan:  # fmt: skip
    """Compare the images of ``source`` with ``output_dir/results.jsonl``: every image without a line, or missing
    some of ``tokens``, becomes a job (failed images only with ``retry_errors``). Creates ``output_dir``."""
    root, files = find_images(source, recursive=recursive)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / RESULTS_FILE
    done, bad_lines = read_results(results_path)
    jobs: list[ImageJob] = []
    skipped = 0
    for path in files:
        key = _key(path, root)
        previous = done.get(key)
        if previous is None or (previous.get("error") and retry_errors):
            jobs.append(ImageJob(key, path, list(tokens), {}))
            continue
        missing = [t for t in tokens if t not in (previous.get("results") or {})]
        if previous.get("error") or not missing:
            skipped += 1
        else:
            size = (previous["width"], previous["height"]) if "width" in previous and "height" in previous else None
            jobs.append(ImageJob(key, path, missing, dict(previous.get("results") or {}), size))
    return JobPlan(results_path, jobs, skipped, bad_lines)


def answer_chunk(
    model: Any, processor: Any, jobs: Sequence[ImageJob], tokens: Sequence[str], *, text_input: str | None = None,
    scores: bool = True, **generate_kwargs: Any,
) -> None:  # fmt: skip
    """Load the pictures of ``jobs`` and answer each of ``tokens`` they still miss in one ``generate`` batch per
    task; a failing image gets an error in ``job.errors`` and the others go on. Both engines run this (one process
    here, one Ray actor per chunk in :mod:`helpers.ray_engine`)."""
    from helpers.tasks import TASKS, load_image

    for job in jobs:
        try:
            job.picture = load_image(job.path)
        except Exception as error:  # noqa: BLE001 - unreadable files are reported, not fatal
            job.errors.append(f"{type(error).__name__}: {error}")
    for token in tokens:
        ready = [job for job in jobs if job.picture is not None and token in job.tasks]
        if not ready:
            continue
        text = text_input if TASKS[token].needs_text else None
        try:
            _answer(ready, model, processor, token, text, scores, generate_kwargs)
        except Exception as error:  # noqa: BLE001
            ready[0].errors.append(f"{token}: {type(error).__name__}: {error}")


def job_record(job: ImageJob) -> dict[str, Any]:
    """The JSONL line of an answered job: its earlier answers merged with the new ones, and its errors."""
    record: dict[str, Any] = {"file": job.key}
    size = job.picture.size if job.picture is not None else job.size
    if size is not None:
        record["width"], record["height"] = size
    record["results"] = {**job.previous, **job.results}
    if job.errors:
        record["error"] = "; ".join(job.errors)
    return record


def process_images(
    model: Any,
    processor: Any,
    source: str | Path,
    tasks: Sequence[str],
    output_dir: str | Path,
    *,
    text_input: str | None = None,
    batch_size: int = 4,
    scores: bool = True,
    coco: bool = False,
    draw: bool = False,
    retry_errors: bool = False,
    recursive: bool = False,
    progress: bool = True,
    **generate_kwargs: Any,
) -> BatchSummary:
    """Run ``tasks`` on every image of a folder or glob, ``batch_size`` images per ``generate`` call, appending one
    JSONL line per image to ``output_dir/results.jsonl``. Taught in the README ("Use it in your own project").

    Resumes: images already in the JSONL are skipped (failed ones too, unless ``retry_errors``); an image missing
    some of ``tasks`` runs only those and gets a new line with all its answers. ``text_input`` goes to the tasks
    that need one. ``scores`` adds :mod:`helpers.scores` confidences to box/polygon/OCR answers; ``coco`` writes
    ``coco.json``; ``draw`` saves drawings. ``generate_kwargs`` (``max_new_tokens``, ``num_beams`` …) go to
    ``generate``. A failing image is recorded with ``"error"`` and the run continues.
    """
    from tqdm.auto import tqdm

    tokens = check_request(tasks, text_input, batch_size)
    plan = plan_jobs(source, tokens, output_dir, retry_errors=retry_errors, recursive=recursive)
    results_path, jobs = plan.results, plan.jobs
    summary = BatchSummary(skipped=plan.skipped, unreadable_lines=plan.unreadable_lines, results=results_path)

    drawings = results_path.parent / DRAWINGS_DIR
    if draw:
        summary.drawings = drawings
    with open_results(results_path) as handle, tqdm(
        total=len(jobs), unit="image", disable=not progress or not jobs, desc="Florence-2"
    ) as bar:
        for batch in _chunks(jobs, batch_size):
            answer_chunk(model, processor, batch, tokens, text_input=text_input, scores=scores, **generate_kwargs)
            records = []
            for job in batch:
                if draw and job.picture is not None:
                    draw_job(job, drawings)
                records.append(job_record(job))
                if job.errors:
                    summary.failed.append(job.key)
                else:
                    summary.processed += 1
                job.picture = None  # free the pixels
            append_records(handle, records)
            bar.update(len(batch))
    if coco:
        summary.coco = results_path.parent / COCO_FILE
        write_coco(results_path, summary.coco)
    return summary


def draw_job(job: ImageJob, folder: Path) -> None:
    """Save ``folder/<file>.<task>.png`` for every new answer of ``job``; a drawing that fails becomes an error."""
    from helpers.plotting import draw_answer

    for task, answer in job.results.items():
        target = folder / f"{job.key}.{_task_file_name(task)}.png"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            draw_answer(job.picture, task, answer).save(target)
        except Exception as error:  # noqa: BLE001 - the answer is saved even if its drawing is not
            job.errors.append(f"drawing {task}: {type(error).__name__}: {error}")


# ----------------------------------------------------------------------------------------------------------------
# Command line (python -m helpers FOLDER_OR_GLOB ...)
# ----------------------------------------------------------------------------------------------------------------

#: Options (of this parser and of the single-image one) that take a value: used to find the positional argument.
_VALUE_OPTIONS = (
    "--task", "--text", "--model", "--device", "--weight-format", "--max-new-tokens", "--num-beams", "--out",
    "--output-dir", "--batch-size", "--engine", "--workers", "--ray-address",
)  # fmt: skip


def wants_batch(argv: Sequence[str]) -> bool:
    """Whether a ``python -m helpers`` command line names a folder or glob (batch mode) rather than one image."""
    positionals: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg == "--":
            positionals += argv[index + 1 :]
            break
        if arg.startswith("-") and len(arg) > 1:
            name = arg.split("=", 1)[0]
            takes_value = name in _VALUE_OPTIONS or sum(o.startswith(name) for o in _VALUE_OPTIONS) == 1
            if takes_value and "=" not in arg and name.startswith("--"):
                index += 1  # skip the option's value
        else:
            positionals.append(arg)
        index += 1
    return bool(positionals) and is_batch_source(positionals[0])


def build_parser() -> argparse.ArgumentParser:
    from helpers.conversion import WEIGHT_FORMATS
    from helpers.models import DEFAULT_DEVICE, model_from_env

    parser = argparse.ArgumentParser(
        prog="python -m helpers FOLDER_OR_GLOB",
        description="Run Florence-2 tasks on every image of a folder or glob with OpenVINO; JSONL (+ COCO JSON, "
        "drawings). Rerun the same command to resume.",
    )
    parser.add_argument("source", help='a folder, or a quoted glob such as "photos/**/*.jpg"')
    parser.add_argument("--task", action="append", default=None,
                        help='task token, repeat for several (default: <CAPTION>), e.g. --task "<OD>"')  # fmt: skip
    parser.add_argument("--text", default=None, help="text input for the tasks that take one (phrase, region …)")
    parser.add_argument("--model", default=model_from_env(), help="hub id, local folder, or 'tiny'")
    parser.add_argument("--device", default=DEFAULT_DEVICE, help="OpenVINO device: CPU, GPU, AUTO … (default: AUTO)")
    parser.add_argument("--weight-format", default="fp16", choices=WEIGHT_FORMATS)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--num-beams", type=int, default=None, help="default: the model's generation config (3)")
    parser.add_argument("--output-dir", type=Path, default=Path("florence2_results"),
                        help="folder for results.jsonl, coco.json, drawings/ (default: florence2_results)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=4, help="images per generate call (default: 4)")
    parser.add_argument("--coco", action="store_true", help="also write coco.json (box, polygon and OCR tasks)")
    parser.add_argument("--draw", action="store_true", help="also save a drawing of every answer")
    parser.add_argument("--no-scores", action="store_true", help="skip confidence scores")
    parser.add_argument("--retry-errors", action="store_true", help="run again the images that failed before")
    parser.add_argument("--recursive", action="store_true", help="include images in sub-folders of a folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="local: one process (default); ray: Ray Data actors, see helpers/ray_engine.py")  # fmt: skip
    parser.add_argument("--workers", type=int, default=2, help="--engine ray: model-holding actors (default: 2)")
    parser.add_argument("--ray-address", default=None,
                        help="--engine ray: an existing cluster (e.g. auto, ray://head:10001); default: start a "
                        "local one")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    return parser


def _run_local(args: argparse.Namespace, tasks: list[str], options: dict[str, Any]) -> BatchSummary:
    """The one-process engine, timed, with ``summary.json`` beside the results."""
    import time

    from helpers.models import load_model

    model, processor = load_model(args.model, args.weight_format, args.device)
    started = time.perf_counter()
    summary = process_images(model, processor, args.source, tasks, args.output_dir, **options)
    seconds = time.perf_counter() - started
    answered = summary.processed + len(summary.failed)
    write_run_summary(args.output_dir, {
        "engine": "local", "workers": 1, "batch_size": args.batch_size, "images_answered": answered,
        "images_failed": len(summary.failed), "images_skipped": summary.skipped, "seconds": round(seconds, 3),
        "images_per_second": round(answered / seconds, 4) if answered and seconds > 0 else None,
        "model": args.model, "model_dirs_loaded": [str(model.model_dir)], "ov_configs": [model.ov_config],
    })  # fmt: skip
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Batch command line; exit status 0 when every image of this run succeeded, 1 when some failed, 2 on a usage
    error (nothing processed)."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.out is not None:
        print("error: --out saves one drawing; for a folder use --output-dir DIR --draw.", file=sys.stderr)
        return 2
    generate_kwargs: dict[str, Any] = {"max_new_tokens": args.max_new_tokens}
    if args.num_beams is not None:
        generate_kwargs["num_beams"] = args.num_beams
    tasks = args.task or ["<CAPTION>"]
    common = dict(text_input=args.text, batch_size=args.batch_size, scores=not args.no_scores, coco=args.coco,
                  draw=args.draw, retry_errors=args.retry_errors, recursive=args.recursive, progress=not args.quiet,
                  **generate_kwargs)  # fmt: skip
    try:
        find_images(args.source, recursive=args.recursive)  # report a wrong path before loading the model
        if args.engine == "ray":
            from helpers.ray_engine import label_on_ray

            summary = label_on_ray(args.model, args.source, tasks, args.output_dir, workers=args.workers,
                                   ray_address=args.ray_address, weight_format=args.weight_format,
                                   device=args.device, **common)  # fmt: skip
        else:
            summary = _run_local(args, tasks, common)
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{summary.processed} images answered, {summary.skipped} already done, {len(summary.failed)} failed "
          f"→ {summary.results}", file=sys.stderr)  # fmt: skip
    if summary.unreadable_lines:
        print(f"({summary.unreadable_lines} unreadable line(s) in {summary.results} were ignored)", file=sys.stderr)
    for key in summary.failed:
        print(f"  failed: {key}", file=sys.stderr)
    if summary.coco:
        print(f"COCO JSON: {summary.coco}", file=sys.stderr)
    if summary.drawings:
        print(f"drawings: {summary.drawings}/", file=sys.stderr)
    return 1 if summary.failed else 0
