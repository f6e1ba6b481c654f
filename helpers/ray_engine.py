"""Label a folder of images on Ray Data: the batch command's work spread over a pool of model-holding actors.

    python -m helpers photos/ --task "<OD>" --output-dir out/ --engine ray --workers 2
    python -m helpers photos/ --task "<OD>" --output-dir out/ --engine ray --workers 8 --ray-address auto

The driver (this process) decides what is missing exactly as the one-process engine does
(:func:`helpers.batch.plan_jobs`), cuts it into the same chunks of ``batch_size`` images, and hands the chunks to
Ray Data. ``map_batches`` runs :class:`LabelWorker`, a stateful actor class: each actor loads the converted model
once, with ``INFERENCE_NUM_THREADS`` equal to its CPUs and ``ENABLE_CPU_PINNING`` off (OpenVINO otherwise pins
every actor's threads onto the same cores), and answers a chunk with :func:`helpers.batch.answer_chunk`, the
function the one-process engine runs. So every ``generate`` call sees the same images as it would in one process,
and the answers are the same, image for image.

Answered chunks stream back to the driver, which alone appends them to ``results.jsonl`` (one fsync per chunk:
no torn or duplicated lines from concurrent writers). Killing the driver loses at most the chunks in flight;
rerunning the same command answers only what is missing. A worker that dies mid-chunk is restarted by Ray and
the chunk retried (:data:`TASK_RETRIES` times); a chunk that keeps killing workers is left out of this run and
answered on the next one. ``coco.json`` and ``drawings/`` are written as by the one-process engine, and
``summary.json`` records the engine, the workers, images/second and the model the actors actually loaded.

Taught in ``notebooks/13_label_dataset.ipynb``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from helpers.batch import (
    COCO_FILE,
    DRAWINGS_DIR,
    BatchSummary,
    ImageJob,
    answer_chunk,
    append_records,
    check_request,
    draw_job,
    job_record,
    open_results,
    plan_jobs,
    write_coco,
    write_run_summary,
)

__all__ = ["TASK_RETRIES", "LabelWorker", "actor_ov_config", "label_on_ray"]

#: How often Ray runs a chunk again on a restarted actor after its worker process died.
TASK_RETRIES = 2


def actor_ov_config(cpus: int, ov_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """OpenVINO settings for one actor: as many inference threads as the actor has CPUs, and no pinning of threads
    to cores (every actor on a machine would otherwise pin onto the same first cores). ``ov_config`` adds to it."""
    return {"INFERENCE_NUM_THREADS": int(cpus), "ENABLE_CPU_PINNING": False, **(ov_config or {})}


# ----------------------------------------------------------------------------------------------------------------
# What runs in every actor


def _job_row(job: ImageJob) -> dict[str, Any]:
    return {"key": job.key, "path": str(job.path), "tasks": job.tasks, "previous": job.previous,
            "size": list(job.size) if job.size else None}  # fmt: skip


def _job_from_row(row: dict[str, Any]) -> ImageJob:
    size = tuple(row["size"]) if row["size"] else None
    return ImageJob(row["key"], Path(row["path"]), list(row["tasks"]), dict(row["previous"]), size)  # type: ignore[arg-type]


def _drawings_of(job: ImageJob) -> dict[str, str]:
    """Draw the job's answers in a scratch folder (the actor may run on another machine than the driver) and return
    them as ``{path relative to drawings/: base64 PNG}``."""
    with tempfile.TemporaryDirectory(prefix="florence2-drawings-") as scratch:
        draw_job(job, Path(scratch))
        return {
            path.relative_to(scratch).as_posix(): base64.b64encode(path.read_bytes()).decode("ascii")
            for path in Path(scratch).rglob("*.png")
        }


class LabelWorker:
    """A Ray Data actor: loads the converted model once, then answers one chunk of images per call.

    Rows are chunks: ``{"jobs": JSON list of jobs}``; the output row is ``{"records": JSON list of JSONL records,
    "drawings": JSON {path: base64 PNG}, "worker": JSON facts about the loaded model}``. Everything the actor prints
    goes to stderr, so the driver's stdout stays free for the command's answer."""

    def __init__(self, model: str, weight_format: str, device: str, cpus: int, request: dict[str, Any]) -> None:
        from helpers.models import load_model

        self.request = request
        self.ov_config = actor_ov_config(cpus, request.get("ov_config"))
        with contextlib.redirect_stdout(sys.stderr):
            self.model, self.processor = load_model(model, weight_format, device, self.ov_config)
        self.facts = {
            "model_dir": str(self.model.model_dir), "device": device, "ov_config": self.ov_config,
            "node": os.uname().nodename, "pid": os.getpid(),
        }  # fmt: skip

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        request = self.request
        records, drawings = [], []
        for chunk in batch["jobs"]:
            jobs = [_job_from_row(row) for row in json.loads(chunk)]
            with contextlib.redirect_stdout(sys.stderr):
                answer_chunk(self.model, self.processor, jobs, request["tokens"], text_input=request["text_input"],
                             scores=request["scores"], **request["generate_kwargs"])  # fmt: skip
                pictures = {}
                for job in jobs:
                    if request["draw"] and job.picture is not None:
                        pictures.update(_drawings_of(job))
            records.append(json.dumps([job_record(job) for job in jobs], ensure_ascii=False))
            drawings.append(json.dumps(pictures))
        return {"records": records, "drawings": drawings, "worker": [json.dumps(self.facts)] * len(records)}


# ----------------------------------------------------------------------------------------------------------------
# The driver


@contextlib.contextmanager
def _ray_cluster(address: str | None, num_cpus: int) -> Iterator[Any]:
    """Connect to ``address`` (an existing cluster, or ``auto``), start a local cluster of ``num_cpus`` CPUs, or use
    the cluster this process already joined (left running: it is the caller's)."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    try:
        yield ray
    finally:
        ray.shutdown()


def _chunk_rows(jobs: Sequence[ImageJob], batch_size: int) -> list[dict[str, str]]:
    return [{"jobs": json.dumps([_job_row(j) for j in jobs[i : i + batch_size]], ensure_ascii=False)}
            for i in range(0, len(jobs), batch_size)]  # fmt: skip


def _save_drawings(drawings: dict[str, str], folder: Path) -> None:
    for relative, data in drawings.items():
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(base64.b64decode(data))


def _answered_chunks(ray: Any, rows: list[dict[str, str]], workers: int, cpus: int,
                     worker_kwargs: dict[str, Any]) -> Iterator[dict[str, Any]]:  # fmt: skip
    """Stream the answered chunks as the actors finish them (in any order)."""
    context = ray.data.DataContext.get_current()
    saved = context.enable_progress_bars, context.max_errored_blocks
    context.enable_progress_bars = False  # one bar: ours, in images
    context.max_errored_blocks = -1  # a chunk that keeps killing workers is dropped: the next run retries it
    try:
        with warnings.catch_warnings():  # 2.60 has no named parameter for max_task_retries yet
            warnings.simplefilter("ignore", DeprecationWarning)
            answered = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
                LabelWorker,
                fn_constructor_kwargs={**worker_kwargs, "cpus": cpus},
                compute=ray.data.ActorPoolStrategy(size=workers),
                batch_size=1,
                num_cpus=cpus,
                max_task_retries=TASK_RETRIES,
            )
        yield from answered.iter_rows()
    finally:
        context.enable_progress_bars, context.max_errored_blocks = saved


def label_on_ray(
    model: str,
    source: str | Path,
    tasks: Sequence[str] | str,
    output_dir: str | Path,
    *,
    workers: int = 2,
    cpus_per_worker: int | None = None,
    ray_address: str | None = None,
    weight_format: str = "fp16",
    device: str = "CPU",
    ov_config: dict[str, Any] | None = None,
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
    """Answer ``tasks`` for every image of ``source`` not yet in ``output_dir/results.jsonl`` on ``workers`` Ray
    actors of ``cpus_per_worker`` CPUs each (default: this machine's CPUs shared out). Same arguments, files and
    resume rules as :func:`helpers.batch.process_images`; ``model`` is what ``--model`` takes (each actor loads
    it with :func:`helpers.models.load_model`; it is converted here first). ``ray_address`` joins an existing
    cluster; without it a local one is started and stopped (a cluster this process already joined is used and left
    running). Writes ``summary.json`` too. Taught in ``notebooks/13_label_dataset.ipynb``."""
    from tqdm.auto import tqdm

    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}.")
    cpus = cpus_per_worker or max(1, (os.cpu_count() or 1) // workers)
    tokens = check_request(tasks, text_input, batch_size)
    plan = plan_jobs(source, tokens, output_dir, retry_errors=retry_errors, recursive=recursive)
    summary = BatchSummary(skipped=plan.skipped, unreadable_lines=plan.unreadable_lines, results=plan.results)
    out = plan.results.parent
    summary.drawings = out / DRAWINGS_DIR if draw else None
    seen: dict[str, set[str]] = {"model_dirs": set(), "actors": set(), "ov_configs": set()}
    clock = _Clock()
    cluster = None
    if plan.jobs:
        from helpers.models import ensure_converted

        with contextlib.redirect_stdout(sys.stderr):
            ensure_converted(model, weight_format)  # once, before the actors look for it (on this machine)
        request = {"tokens": tokens, "text_input": text_input, "scores": scores, "draw": draw,
                   "generate_kwargs": generate_kwargs, "ov_config": ov_config}  # fmt: skip
        worker_kwargs = {"model": model, "weight_format": weight_format, "device": device, "request": request}
        with _ray_cluster(ray_address, workers * cpus) as ray, open_results(plan.results) as handle, tqdm(
            total=len(plan.jobs), unit="image", disable=not progress, desc=f"Florence-2 on Ray ({workers} workers)"
        ) as bar:
            cluster = ray.get_runtime_context().gcs_address
            clock.start()
            for row in _answered_chunks(ray, _chunk_rows(plan.jobs, batch_size), workers, cpus, worker_kwargs):
                records = json.loads(row["records"])
                if summary.drawings:
                    _save_drawings(json.loads(row["drawings"]), summary.drawings)
                append_records(handle, records)
                clock.chunk_done(len(records))
                _count(summary, records)
                _note_worker(seen, json.loads(row["worker"]))
                bar.update(len(records))
    answered = summary.processed + len(summary.failed)
    missing = len(plan.jobs) - answered
    if missing:
        print(f"{missing} image(s) were not answered (their chunk kept failing); run the same command again to "
              "answer them.", file=sys.stderr)  # fmt: skip
    if coco:
        summary.coco = out / COCO_FILE
        write_coco(plan.results, summary.coco)
    write_run_summary(out, {
        "engine": "ray", "workers": workers, "cpus_per_worker": cpus, "ray_address": ray_address, "cluster": cluster,
        "batch_size": batch_size, "tasks": tokens, "images_answered": answered, "images_failed": len(summary.failed),
        "images_skipped": summary.skipped, "images_missing": missing, **clock.facts(answered),
        "model": model, "model_dirs_loaded": sorted(seen["model_dirs"]), "actors_seen": len(seen["actors"]),
        "ov_configs": [json.loads(c) for c in sorted(seen["ov_configs"])],
    })  # fmt: skip
    return summary


class _Clock:
    """Times a run: from the start of the dataset (actors starting, loading the model) to the first answered chunk,
    and from there to the last one (answering only)."""

    def __init__(self) -> None:
        self.started = self.last = time.perf_counter()
        self.first: tuple[float, int] | None = None  # (when, images in it)

    def start(self) -> None:
        self.started = self.last = time.perf_counter()

    def chunk_done(self, images: int) -> None:
        self.last = time.perf_counter()
        if self.first is None:
            self.first = (self.last, images)

    def facts(self, answered: int) -> dict[str, Any]:
        seconds = self.last - self.started
        first_at, first_images = self.first or (self.last, answered)
        return {
            "seconds": round(seconds, 3),
            "images_per_second": round(answered / seconds, 4) if answered and seconds > 0 else None,
            "first_chunk_seconds": round(first_at - self.started, 3),
            "images_after_first_chunk": answered - first_images,
            "seconds_after_first_chunk": round(self.last - first_at, 3),
        }


def _count(summary: BatchSummary, records: list[dict[str, Any]]) -> None:
    for record in records:
        if record.get("error"):
            summary.failed.append(record["file"])
        else:
            summary.processed += 1


def _note_worker(seen: dict[str, set[str]], worker: dict[str, Any]) -> None:
    seen["model_dirs"].add(worker["model_dir"])
    seen["actors"].add(f"{worker['node']}:{worker['pid']}")
    seen["ov_configs"].add(json.dumps(worker["ov_config"], sort_keys=True))
