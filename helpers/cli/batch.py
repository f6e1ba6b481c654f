"""Run Florence-2 tasks over a folder of images: JSONL results, COCO JSON, drawings; resumable, failure-tolerant.

    python -m helpers photos/ --task "<OD>" --task "<CAPTION>" --output-dir out/ --coco --draw
    python -m helpers "scans/**/*.png" --task "<OCR_WITH_REGION>" --model tiny --batch-size 8

Every image gets one line in ``OUTPUT_DIR/results.jsonl``::

    {"file": "street.jpg", "sha256": "…", "width": 640, "height": 480,
     "results": {"<OD>": {"bboxes": [...], "labels": [...], "scores": [...]}, "<CAPTION>": "A street ..."},
     "requests": {"<OD>": "…", "<CAPTION>": "…"}}

``file`` is relative to the folder (or to the fixed part of the glob); ``sha256`` is the image file's content hash;
``requests`` holds, per task, the key of what was asked (:meth:`BatchRequest.key`: task, text input, model and the
hash of its weights, weight format, generation settings, scores). Box, polygon and OCR answers carry the confidence
scores of :mod:`helpers.outputs.scores` (``--no-scores`` to skip them). An image that cannot be read or answered gets
``"error": "..."`` and ``"error_cause"`` (``"image"``: the file could not be read; ``"request"``: answering failed)
with the answers that did succeed, and the run goes on.

**One output folder answers one request about one folder of images.** ``OUTPUT_DIR/request.json`` records the
image folder and, per task, the settings. A run whose image folder or settings differ is refused before any image,
with a message naming each difference: you choose a new ``--output-dir`` (keeps both answers), or ``--update``
(answers again, with the new settings, exactly the images whose answers were made with other settings, and
replaces those answers). This is what someone labelling a dataset needs: the default ``florence2_results`` folder
can never mix ``dayA/IMG_0001.jpg``'s answers into ``dayB``'s, nor answers from two models or two ``--text``.

**Resuming.** Lines are appended after every batch, so an interrupted run loses at most one batch: run the same
command again and it answers exactly what is missing: new images, tasks added since, images whose content changed
(a different ``sha256``), images that failed because of the request (retried by default). Images that failed
because the file could not be read are skipped and listed; ``--retry-errors`` tries them again. A half-written last
line left by a killed run is removed. One run at a time writes an output folder (a lock file, ``.lock``; the lock
of a run that died is taken over). ``--coco`` writes ``coco.json`` from all lines (:func:`helpers.outputs.export.to_coco`),
``--draw`` saves ``drawings/<file>.<TASK>.png``.

The steps are public functions, so another engine can run them: :func:`plan_batch` (which images and tasks are
pending), :func:`answer_chunk` (answer some of them → records), :func:`append_records`, :func:`write_coco` and
:func:`draw_record`, inside :func:`output_lock`. ``--engine ray --workers N`` does that on Ray Data
(:mod:`helpers.cli.ray_engine`); both engines write ``summary.json`` (engine, images/second, the model that ran;
the one-process engine also its peak memory, ``peak_rss_mb``).

Taught in ``notebooks/11_speed.ipynb`` (batches) and the README ("Use it in your own project").
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpers.process_memory import peak_rss_bytes
from helpers.cli.image_sources import GLOB_CHARS, glob_match, is_uri, list_uri_images, open_uri_image, uri_sha256

__all__ = [
    "IMAGE_SUFFIXES",
    "BatchLockedError",
    "BatchRequest",
    "BatchSummary",
    "ImageJob",
    "RequestMismatchError",
    "answer_chunk",
    "append_records",
    "build_parser",
    "check_output_folder",
    "describe",
    "draw_record",
    "file_sha256",
    "find_images",
    "is_batch_source",
    "main",
    "make_request",
    "model_identity",
    "output_lock",
    "plan_batch",
    "process_images",
    "read_results",
    "repair_results",
    "wants_batch",
    "write_coco",
    "write_run_summary",
]

#: File types picked up from a folder (a glob takes whatever it matches).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
RESULTS_FILE = "results.jsonl"
REQUEST_FILE = "request.json"
LOCK_FILE = ".lock"
COCO_FILE = "coco.json"
SUMMARY_FILE = "summary.json"
DRAWINGS_DIR = "drawings"


class BatchLockedError(RuntimeError):
    """Another live run is writing the same output folder."""


class RequestMismatchError(ValueError):
    """The output folder holds answers to another request (other images, model, text or settings)."""


# ----------------------------------------------------------------------------------------------------------------
# Finding images
# ----------------------------------------------------------------------------------------------------------------


def _is_glob(text: str) -> bool:
    return any(char in text for char in GLOB_CHARS)


def is_batch_source(source: str | Path) -> bool:
    """True for a folder, a glob pattern (``*``, ``?``, ``[``) that is not itself an existing file, or a URI
    (``s3://bucket/photos/`` …, see :mod:`helpers.cli.image_sources`)."""
    if is_uri(source):
        return True
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


def _walk_files(root: Path, *, recursive: bool) -> Iterator[Path]:
    """Files under ``root``. Symlinked folders are followed after every real folder, and each folder is visited once,
    so a symlink loop neither repeats files nor hangs the search, and a file keeps its real path when it has one."""
    seen: set[tuple[int, int]] = set()
    real, linked = [root], []
    while real or linked:
        folder = real.pop() if real else linked.pop(0)
        try:
            info = folder.stat()
        except OSError:
            continue  # a dangling link or a folder removed meanwhile
        if (info.st_dev, info.st_ino) in seen:
            continue
        seen.add((info.st_dev, info.st_ino))
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError:
            continue  # an unreadable folder: its images cannot be found, the others can
        for entry in entries:
            path = folder / entry.name
            try:
                if entry.is_dir():
                    if recursive:
                        (linked if entry.is_symlink() else real).append(path)
                elif entry.is_file():
                    yield path
            except OSError:
                continue


def _glob_files(pattern: str) -> tuple[Path, list[Path]]:
    """Like ``glob.glob(pattern, recursive=True)`` for files, without following a symlink loop more than once."""
    root = _glob_root(pattern)
    parts = Path(pattern).expanduser().parts[len(root.parts) if root != Path(".") else 0 :]
    walk = _walk_files(root, recursive=len(parts) > 1)
    return root, sorted(path for path in walk if glob_match(parts, path.relative_to(root).parts))


def find_images(source: str | Path, *, recursive: bool = False) -> tuple[Path | str, list[Path] | list[str]]:
    """``(root, image paths)`` for a folder (files with an image suffix, sorted; ``recursive`` descends into
    sub-folders) or a glob (every file it matches, sorted; ``**`` works). Symlink loops are visited once. A URI
    (``s3://…``, ``gs://…``, ``file://…``) gives its root and image URIs as strings
    (:func:`helpers.cli.image_sources.list_uri_images`). Raises ``ValueError`` when nothing is found. Taught in the
    README ("Use it in your own project")."""
    text = str(source)
    if is_uri(text):
        return list_uri_images(text, IMAGE_SUFFIXES, recursive=recursive)
    path = Path(text).expanduser()
    if path.is_dir():
        root = path
        files = sorted(p for p in _walk_files(path, recursive=recursive) if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(
                f"No images in {path} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}"
                f"{'' if recursive else ', not in sub-folders: add --recursive'})."
            )
    elif _is_glob(text):
        root, files = _glob_files(text)
        if not files:
            raise ValueError(f"The pattern {text!r} matches no files. Quote it so the shell does not expand it.")
    else:
        raise ValueError(
            f"{text} is neither a folder nor a glob pattern; for one image run `python -m helpers {text}`."
        )
    return root, files


def _key(path: Path | str, root: Path | str) -> str:
    if isinstance(path, str):  # a URI below a URI root
        return path[len(root) :].lstrip("/") if path.startswith(str(root)) else path
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (a path or a URI): what identifies an image across renames and reruns."""
    if is_uri(path):
        return uri_sha256(str(path))
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _shown(name: str) -> str:
    """A file name printable anywhere: bytes that are not valid UTF-8 appear as ``\\xNN``."""
    return os.fsencode(name).decode("utf-8", "backslashreplace") if name else name


# ----------------------------------------------------------------------------------------------------------------
# Reading and writing results
# ----------------------------------------------------------------------------------------------------------------


def _json_text(value: Any) -> str:
    """JSON text that can be written as UTF-8 even when a file name holds bytes that are not UTF-8 (they become
    ``\\udcNN`` escapes, which ``json.loads`` reads back as the same name)."""
    text = json.dumps(value, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(value, ensure_ascii=True)
    return text


def read_results(path: str | Path) -> tuple[dict[str, dict[str, Any]], int]:
    """The records of a results JSONL by ``file`` (a later line for the same file wins) and the number of lines that
    could not be read (e.g. the half-written last line of an interrupted run). A missing file gives ``({}, 0)``."""
    records: dict[str, dict[str, Any]] = {}
    bad = 0
    path = Path(path)
    if not path.exists():
        return records, 0
    with path.open("rb") as handle:
        for raw in handle:
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                bad += 1
                continue
            if isinstance(record, dict) and isinstance(record.get("file"), str):
                records[record["file"]] = record
            else:
                bad += 1
    return records, bad


def repair_results(path: str | Path) -> bool:
    """Remove a half-written last line (what a killed run leaves) so that every line is whole JSON again; True when
    something was removed. Lines before it are never touched."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return False
    with path.open("rb+") as handle:
        size = handle.seek(0, os.SEEK_END)
        handle.seek(max(0, size - (1 << 20)))
        tail = handle.read()
        if tail.endswith(b"\n"):
            return False
        cut = tail.rfind(b"\n")
        if cut < 0 and size > len(tail):
            return False  # a last line over 1 MB: leave it (read_results ignores it)
        handle.truncate(size - len(tail) + cut + 1)
        handle.flush()
        os.fsync(handle.fileno())
    return True


def append_records(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Append records as JSONL lines and make them durable (``fsync``) before returning."""
    data = "".join(_json_text(record) + "\n" for record in records).encode("utf-8")
    with open(path, "ab") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def write_coco(results_path: str | Path, coco_path: str | Path) -> None:
    """Write ``coco.json`` from every record of a results JSONL (atomically: a half-written file never stays)."""
    from helpers.outputs.export import to_coco

    records, _ = read_results(results_path)
    dataset = to_coco(sorted(records.values(), key=lambda r: r["file"]))
    coco_path = Path(coco_path)
    partial = coco_path.with_name(coco_path.name + ".partial")
    partial.write_text(_json_text(dataset), encoding="utf-8")
    partial.replace(coco_path)


def write_run_summary(output_dir: str | Path, facts: dict[str, Any]) -> Path:
    """``output_dir/summary.json``: what the last run did (engine, workers, images/second, the model that ran),
    written atomically."""
    path = Path(output_dir) / SUMMARY_FILE
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(facts, indent=1, ensure_ascii=True) + "\n", encoding="utf-8")
    partial.replace(path)
    return path


@contextlib.contextmanager
def output_lock(output_dir: str | Path) -> Iterator[Path]:
    """Hold ``output_dir/.lock`` while a run writes the folder: a second run gets :class:`BatchLockedError` naming
    the first one's process id. The lock is an OS file lock (released when its process dies, even by kill -9); where
    file locks do not exist, the file holds the pid and a dead pid's lock is taken over."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    try:
        import fcntl
    except ImportError:  # Windows
        fcntl = None  # type: ignore[assignment]
    if fcntl is None:
        yield from _pid_file_lock(path)
        return
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            raise BatchLockedError(
                f"Another run (process {holder}) is writing {folder}. Wait for it to finish, or choose another "
                "--output-dir. (Two runs writing one folder would answer every image twice.)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield folder
    finally:
        handle.close()  # closing releases the lock


def _pid_file_lock(path: Path) -> Iterator[Path]:
    from helpers.folders import pid_alive

    for _ in range(2):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = int(path.read_text().strip() or 0)
            except (OSError, ValueError):
                holder = 0
            if holder and pid_alive(holder):
                raise BatchLockedError(
                    f"Another run (process {holder}) is writing {path.parent}. Wait for it to finish, or choose "
                    "another --output-dir."
                ) from None
            path.unlink(missing_ok=True)  # the run that held it died: take it over
            continue
        os.write(descriptor, str(os.getpid()).encode())
        os.close(descriptor)
        try:
            yield path.parent
        finally:
            path.unlink(missing_ok=True)
        return
    raise BatchLockedError(f"Could not take {path}; another run keeps taking it. Choose another --output-dir.")


# ----------------------------------------------------------------------------------------------------------------
# What was asked
# ----------------------------------------------------------------------------------------------------------------


def model_identity(model: Any) -> dict[str, str]:
    """``{"model", "content", "weight_format"}`` of a loaded model: what ran, and a hash of its weights, so answers
    from a retrained or re-quantised model are never taken for the old ones. An OpenVINO model is identified by its
    conversion manifest (source, file hashes, weight format); a PyTorch model by its config name, a hash of its
    parameters and their dtype."""
    manifest = getattr(model, "manifest", None)
    if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict):
        hashes = sorted((name, entry.get("sha256", "")) for name, entry in manifest["files"].items())
        return {
            "model": str(manifest.get("source", "")),
            "content": hashlib.sha256(json.dumps(hashes).encode()).hexdigest()[:16],
            "weight_format": str(manifest.get("weight_format", "")),
        }
    digest = hashlib.sha256()
    dtype = ""
    state = model.state_dict() if hasattr(model, "state_dict") else {}
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(dtype=_byte_dtype()).numpy().tobytes())
        dtype = dtype or str(tensor.dtype).replace("torch.", "")
    config = getattr(model, "config", None)
    return {
        "model": str(getattr(config, "_name_or_path", "") or type(model).__name__),
        "content": digest.hexdigest()[:16],
        "weight_format": f"pytorch-{dtype}",
    }


def _byte_dtype() -> Any:
    import torch

    return torch.uint8


@dataclass(frozen=True)
class BatchRequest:
    """Everything that decides an answer besides the image: tasks, text input, the model (name, weight hash, weight
    format), generation settings and whether scores are added. Build it with :func:`make_request`."""

    tasks: tuple[str, ...]
    text_input: str | None
    scores: bool
    generate_kwargs: dict[str, Any]
    model: dict[str, str]

    def settings(self, task: str) -> dict[str, Any]:
        """What one task's answers depend on (besides the image); compared with an output folder's request.json."""
        from helpers.tasks.run import SCORED_TASKS, TASKS

        return {
            **self.model,
            "text": self.text_input if TASKS[task].needs_text else None,
            "generate": dict(sorted(self.generate_kwargs.items())),
            "scores": self.scores and task in SCORED_TASKS,
        }

    def key(self, task: str) -> str:
        """A short hash of :meth:`settings` plus the task: equal keys mean the same question."""
        return hashlib.sha256(_json_text({"task": task, **self.settings(task)}).encode()).hexdigest()[:16]


def make_request(
    model: Any,
    tasks: Sequence[str] | str,
    *,
    text_input: str | None = None,
    scores: bool = True,
    **generate_kwargs: Any,
) -> BatchRequest:
    """Check a batch request before any image (task names, text input, ``max_new_tokens``, ``num_beams``,
    ``min_new_tokens``) and return it; raises ``ValueError`` naming the problem."""
    from helpers.tasks.run import TASKS, build_prompt, check_generate_kwargs, resolve_task

    if isinstance(tasks, str):
        tasks = [tasks]
    tokens = tuple(dict.fromkeys(resolve_task(task) for task in tasks))
    if not tokens:
        raise ValueError('Give at least one task, e.g. --task "<OD>".')
    for token in tokens:  # fail before the first image, not at it
        build_prompt(token, text_input if TASKS[token].needs_text else None, image_size=(1000, 1000))
    check_generate_kwargs(model, generate_kwargs)
    return BatchRequest(tokens, text_input, bool(scores), dict(generate_kwargs), model_identity(model))


def _read_request_file(out: Path) -> dict[str, Any] | None:
    path = out / REQUEST_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise RequestMismatchError(f"{path} is unreadable ({error}). Delete it and rerun with --update.") from error
    return data if isinstance(data, dict) else {}


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [f"{name} was {old.get(name)!r}, now {new.get(name)!r}" for name in sorted(set(old) | set(new))
            if old.get(name) != new.get(name)]  # fmt: skip


def check_output_folder(out: Path, root: Path | str, request: BatchRequest, *, update: bool) -> None:
    """Refuse (``RequestMismatchError``) an output folder written for other images or other settings, naming each
    difference; with ``update`` accept it and record this request. Writes ``request.json``."""
    saved = _read_request_file(out)
    images = root if isinstance(root, str) else str(root.resolve())
    if saved is None and (out / RESULTS_FILE).exists() and (out / RESULTS_FILE).stat().st_size and not update:
        raise RequestMismatchError(
            f"{out / RESULTS_FILE} was written by an older version, without a record of what was asked. Rerun with "
            "--update (update=True) to answer again every image with these settings, or choose another --output-dir."
        )
    saved = saved or {}
    problems: list[str] = []
    if saved.get("images") not in (None, images):
        problems.append(f"images: this folder holds answers for {saved['images']}, this run reads {images}")
    saved_tasks = saved.get("tasks") if isinstance(saved.get("tasks"), dict) else {}
    for task in request.tasks:
        if task in saved_tasks and saved_tasks[task] != request.settings(task):
            problems += [f"{task}: {d}" for d in _differences(saved_tasks[task], request.settings(task))]
    if problems and not update:
        raise RequestMismatchError(
            f"{out} holds answers to another request:\n  " + "\n  ".join(problems) + "\nChoose another --output-dir "
            "to keep both, or rerun with --update (update=True) to answer those images again with this request."
        )
    record = {"images": images, "tasks": {**saved_tasks, **{t: request.settings(t) for t in request.tasks}}}
    partial = out / (REQUEST_FILE + ".partial")
    partial.write_text(json.dumps(record, indent=2, ensure_ascii=True), encoding="utf-8")
    partial.replace(out / REQUEST_FILE)


# ----------------------------------------------------------------------------------------------------------------
# Planning and answering
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ImageJob:
    """One image with the tasks it still needs; plain data, so it can travel to another process."""

    key: str
    path: str
    sha256: str | None
    tasks: list[str]
    previous: dict[str, Any] = field(default_factory=dict)  # earlier answers still valid for this image
    previous_requests: dict[str, str] = field(default_factory=dict)
    size: tuple[int, int] | None = None  # from an earlier line, for an image that no longer loads
    hash_error: str | None = None


@dataclass
class BatchSummary:
    """What a run did. ``processed``/``failed``: images answered/failed now; ``skipped``: already done;
    ``skipped_failed``: failed before because the file could not be read (``--retry-errors`` retries them);
    ``changed``: answered again because their content changed; ``updated``: answered again because the request
    changed (``--update``); ``retried``: failed before because of the request, tried again now."""

    processed: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)
    skipped_failed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    retried: list[str] = field(default_factory=list)
    unreadable_lines: int = 0
    repaired: bool = False
    results: Path | None = None
    coco: Path | None = None
    drawings: Path | None = None


def plan_batch(
    root: Path | str, files: Sequence[Path | str], records: dict[str, dict[str, Any]], request: BatchRequest,
    summary: BatchSummary, *, retry_errors: bool = False,
) -> list[ImageJob]:  # fmt: skip
    """The images of ``files`` that need work, each with the tasks it still needs: new images, new tasks, images
    whose content hash changed, answers made for another request, images that failed because of the request (and,
    with ``retry_errors``, those that failed because the file could not be read). Counts what it skips in
    ``summary``."""
    jobs: list[ImageJob] = []
    for path in files:
        key = _key(path, root)
        try:
            sha = file_sha256(path)
            hash_error = None
        except (OSError, ValueError) as error:  # ValueError: a URI that can no longer be opened
            sha, hash_error = None, f"{type(error).__name__}: {error}"
        previous = records.get(key)
        if previous is None:
            jobs.append(ImageJob(key, str(path), sha, list(request.tasks), hash_error=hash_error))
            continue
        if previous.get("sha256") != sha:
            summary.changed.append(key)
            jobs.append(ImageJob(key, str(path), sha, list(request.tasks), hash_error=hash_error))
            continue
        results = dict(previous.get("results") or {})
        asked = dict(previous.get("requests") or {})
        size = (previous["width"], previous["height"]) if "width" in previous and "height" in previous else None
        if previous.get("error") and previous.get("error_cause") == "image" and not retry_errors:
            summary.skipped_failed.append(key)
            continue
        stale = [t for t in request.tasks if t in results and asked.get(t) != request.key(t)]
        missing = [t for t in request.tasks if t not in results or t in stale]
        if stale:
            summary.updated.append(key)
        if previous.get("error"):
            summary.retried.append(key)
            missing = list(request.tasks) if previous.get("error_cause") == "image" else missing
        if not missing:
            summary.skipped += 1
            continue
        keep = {t: a for t, a in results.items() if t not in missing}
        jobs.append(ImageJob(key, str(path), sha, missing, keep, {t: asked[t] for t in keep if t in asked}, size))
    return jobs


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _task_file_name(task: str) -> str:
    return task.strip("<>").lower()


def _run_batch(model: Any, processor: Any, pictures: list[Any], task: str, request: BatchRequest) -> list[Any]:
    from helpers.tasks.run import SCORED_TASKS, TASKS, run_tasks_batch

    text = request.text_input if TASKS[task].needs_text else None
    if request.scores and task in SCORED_TASKS:
        from helpers.outputs.scores import (
            run_tasks_batch_with_scores,
        )  # needs torch: imported only when scores are asked for

        outputs = run_tasks_batch_with_scores(model, processor, pictures, task, text, **request.generate_kwargs)
    else:
        outputs = run_tasks_batch(model, processor, pictures, task, text, **request.generate_kwargs)
    return [output[task] for output in outputs]


@dataclass
class _Work:
    job: ImageJob
    picture: Any = None
    results: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    cause: str = "request"
    sha256: str | None = None  # of the bytes answered, when read in the same go as the pixels (URIs)


def _answer_task(work: list[_Work], model: Any, processor: Any, task: str, request: BatchRequest) -> None:
    """Answer ``task`` for ``work`` in one batch; if the batch fails, one image at a time to find the culprit."""
    try:
        answers = _run_batch(model, processor, [w.picture for w in work], task, request)
    except Exception as batch_error:  # one bad image must not stop the run
        if len(work) == 1:
            work[0].errors.append(f"{task}: {type(batch_error).__name__}: {batch_error}")
            return
        for item in work:
            _answer_task([item], model, processor, task, request)
        return
    for item, answer in zip(work, answers):
        item.results[task] = answer


def answer_chunk(
    model: Any, processor: Any, jobs: Sequence[ImageJob], request: BatchRequest, *, drawings: Path | None = None
) -> list[dict[str, Any]]:
    """Answer ``jobs`` (a few images: one ``generate`` call per task) and return one record per image, ready for
    :func:`append_records`. A file that cannot be read gets ``error_cause: "image"``; a failed answer
    ``"request"``. ``drawings`` saves a drawing of every new answer there."""
    from helpers.tasks.run import load_image

    work = [_Work(job) for job in jobs]
    for item in work:
        if item.job.hash_error:
            item.errors.append(item.job.hash_error)
            item.cause = "image"
            continue
        try:
            if is_uri(item.job.path):  # one read: the record's hash is that of the bytes answered
                picture, item.sha256 = open_uri_image(item.job.path)
                item.picture = load_image(picture)
            else:
                item.picture = load_image(item.job.path)
        except Exception as error:  # unreadable files are reported, not fatal
            item.errors.append(f"{type(error).__name__}: {error}")
            item.cause = "image"
    for task in request.tasks:
        ready = [item for item in work if item.picture is not None and task in item.job.tasks]
        if ready:
            _answer_task(ready, model, processor, task, request)
    records = []
    for item in work:
        if drawings is not None and item.picture is not None:
            item.errors += draw_record(item.picture, item.job.key, item.results, drawings)
        records.append(_record(item, request))
        item.picture = None  # free the pixels
    return records


def _record(item: _Work, request: BatchRequest) -> dict[str, Any]:
    job = item.job
    record: dict[str, Any] = {"file": job.key, "sha256": item.sha256 or job.sha256}
    size = item.picture.size if item.picture is not None else job.size
    if size is not None:
        record["width"], record["height"] = size
    record["results"] = {**job.previous, **item.results}
    record["requests"] = {**job.previous_requests, **{task: request.key(task) for task in item.results}}
    if item.errors:
        record["error"] = "; ".join(item.errors)
        record["error_cause"] = item.cause
    return record


def draw_record(picture: Any, key: str, results: dict[str, Any], folder: Path) -> list[str]:
    """Save ``folder/<key>.<task>.png`` for every answer in ``results``; returns the errors (a failed drawing never
    loses its answer)."""
    from helpers.outputs.plotting import draw_answer

    errors = []
    for task, answer in results.items():
        target = Path(folder) / f"{key}.{_task_file_name(task)}.png"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            draw_answer(picture, task, answer).save(target)
        except Exception as error:  # the answer is saved even if its drawing is not
            errors.append(f"drawing {task}: {type(error).__name__}: {error}")
    return errors


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
    update: bool = False,
    recursive: bool = False,
    progress: bool = True,
    **generate_kwargs: Any,
) -> BatchSummary:
    """Run ``tasks`` on every image of a folder or glob, ``batch_size`` images per ``generate`` call, appending one
    JSONL line per image to ``output_dir/results.jsonl``. Taught in the README ("Use it in your own project").

    Resumes as the module docstring says: a rerun answers exactly what is missing or different. An output folder
    written for other images or settings raises :class:`RequestMismatchError` naming the differences (``update``
    answers those images again instead); a folder another run is writing raises :class:`BatchLockedError`.
    ``text_input`` goes to the tasks that need one. ``scores`` adds :mod:`helpers.outputs.scores` confidences to
    box/polygon/OCR answers; ``coco`` writes ``coco.json``; ``draw`` saves drawings. ``generate_kwargs``
    (``max_new_tokens``, ``num_beams`` …) go to ``generate`` and are checked before the first image.
    """
    from tqdm.auto import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    request = make_request(model, tasks, text_input=text_input, scores=scores, **generate_kwargs)
    root, files = find_images(source, recursive=recursive)
    out = Path(output_dir)
    results_path = out / RESULTS_FILE
    with output_lock(out):
        check_output_folder(out, root, request, update=update)
        summary = BatchSummary(results=results_path, repaired=repair_results(results_path))
        records, summary.unreadable_lines = read_results(results_path)
        jobs = plan_batch(root, files, records, request, summary, retry_errors=retry_errors)
        if draw:
            summary.drawings = out / DRAWINGS_DIR
        with tqdm(total=len(jobs), unit="image", disable=not progress or not jobs, desc="Florence-2") as bar:
            for chunk in _chunks(jobs, batch_size):
                new = answer_chunk(model, processor, chunk, request, drawings=summary.drawings)
                append_records(results_path, new)
                for record in new:
                    if record.get("error"):
                        summary.failed.append(record["file"])
                    else:
                        summary.processed += 1
                bar.update(len(chunk))
        if coco:
            summary.coco = out / COCO_FILE
            write_coco(results_path, summary.coco)
    return summary


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
    from helpers.ir import WEIGHT_FORMATS
    from helpers.course.checkpoints import DEFAULT_DEVICE, model_from_env

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
    parser.add_argument("--retry-errors", action="store_true",
                        help="try again the images whose file could not be read before")  # fmt: skip
    parser.add_argument("--update", action="store_true",
                        help="the output folder holds answers to other settings: answer those images again")  # fmt: skip
    parser.add_argument("--recursive", action="store_true", help="include images in sub-folders of a folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--reconvert", action="store_true",
                        help="convert the model again over its cached conversion (repairs a damaged one)")  # fmt: skip
    parser.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="local: one process (default); ray: Ray Data actors, see helpers/cli/ray_engine.py")  # fmt: skip
    parser.add_argument("--workers", type=int, default=2, help="--engine ray: model-holding actors (default: 2)")
    parser.add_argument("--ray-address", default=None,
                        help="--engine ray: an existing cluster (e.g. auto, ray://head:10001); default: start a "
                        "local one")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    return parser


def _run_local(args: argparse.Namespace, tasks: list[str], options: dict[str, Any]) -> BatchSummary:
    """The one-process engine, timed (model loading apart), with ``summary.json`` beside the results."""
    import time

    from helpers.course.checkpoints import load_model

    model, processor = load_model(args.model, args.weight_format, args.device, reconvert=args.reconvert)
    started = time.perf_counter()
    summary = process_images(model, processor, args.source, tasks, args.output_dir, **options)
    seconds = time.perf_counter() - started
    answered = summary.processed + len(summary.failed)
    write_run_summary(args.output_dir, {
        "engine": "local", "workers": 1, "batch_size": args.batch_size, "images_answered": answered,
        "images_failed": len(summary.failed), "images_skipped": summary.skipped, "seconds": round(seconds, 3),
        "images_per_second": round(answered / seconds, 4) if answered and seconds > 0 else None,
        "model": args.model, "model_dirs_loaded": [str(model.model_dir)], "ov_configs": [model.ov_config],
        "peak_rss_mb": _peak_rss_mb(),
    })  # fmt: skip
    return summary


def _peak_rss_mb() -> float | None:
    """This process's peak memory, model loading included: what one worker of this engine needs."""
    try:
        return round(peak_rss_bytes() / 2**20, 1)
    except OSError:  # a system without /proc or the resource module
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """Batch command line; exit status 0 when every image of this run succeeded, 1 when some failed, 2 on a usage
    error (nothing processed)."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.out is not None:
        print("error: --out saves one drawing; for a folder use --output-dir DIR --draw.", file=sys.stderr)
        return 2
    from helpers.tasks.run import check_generate_kwargs

    generate_kwargs: dict[str, Any] = {"max_new_tokens": args.max_new_tokens}
    if args.num_beams is not None:
        generate_kwargs["num_beams"] = args.num_beams
    tasks = args.task or ["<CAPTION>"]
    from helpers.runtime.generation import TORCH_AVAILABLE

    scores = not args.no_scores and TORCH_AVAILABLE
    if not args.no_scores and not TORCH_AVAILABLE:
        print("note: confidence scores need torch (requirements.txt); answering without them (as --no-scores).",
              file=sys.stderr)  # fmt: skip
    options = dict(text_input=args.text, batch_size=args.batch_size, scores=scores, coco=args.coco,
                   draw=args.draw, retry_errors=args.retry_errors, update=args.update, recursive=args.recursive,
                   progress=not args.quiet, **generate_kwargs)  # fmt: skip
    try:
        check_generate_kwargs(None, generate_kwargs)  # a mistyped setting fails before the model loads
        find_images(args.source, recursive=args.recursive)  # so does a wrong path
        if args.engine == "ray":
            from helpers.cli.ray_engine import label_on_ray

            summary = label_on_ray(args.model, args.source, tasks, args.output_dir, workers=args.workers,
                                   ray_address=args.ray_address, weight_format=args.weight_format,
                                   device=args.device, reconvert=args.reconvert, **options)  # fmt: skip
        else:
            summary = _run_local(args, tasks, options)
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(describe(summary), file=sys.stderr)
    return 1 if summary.failed else 0


def describe(summary: BatchSummary) -> str:
    """What a run did, in words: answered (and why: changed content, new settings, retried), already done, failed,
    skipped failures and how to retry them, repaired or unreadable lines, where the outputs are."""
    why = [f"{len(names)} {what}" for names, what in (
        (summary.changed, "changed since the last run"), (summary.updated, "answered again for the new settings"),
        (summary.retried, "retried after an earlier failure"),
    ) if names]  # fmt: skip
    reasons = f" ({', '.join(why)})" if why else ""
    lines = [f"{summary.processed} images answered{reasons}, {summary.skipped} already done, "
             f"{len(summary.failed)} failed → {summary.results}"]  # fmt: skip
    if summary.repaired:
        lines.append(f"(removed a half-written last line left in {summary.results} by an interrupted run)")
    if summary.unreadable_lines:
        lines.append(f"({summary.unreadable_lines} unreadable line(s) in {summary.results} were ignored)")
    lines += [f"  failed: {_shown(key)}" for key in summary.failed]
    if summary.skipped_failed:
        lines.append(f"{len(summary.skipped_failed)} image(s) whose file could not be read before were skipped; "
                     "rerun with --retry-errors to try them again:")  # fmt: skip
        lines += [f"  skipped: {_shown(key)}" for key in summary.skipped_failed]
    if summary.coco:
        lines.append(f"COCO JSON: {summary.coco}")
    if summary.drawings:
        lines.append(f"drawings: {summary.drawings}/")
    return "\n".join(lines)
