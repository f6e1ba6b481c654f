"""Label a folder of images on Ray Data: the batch command's work spread over a pool of model-holding actors.

    python -m helpers photos/ --task "<OD>" --output-dir out/ --engine ray --workers 2
    python -m helpers photos/ --task "<OD>" --output-dir out/ --engine ray --workers 8 --ray-address auto

The driver (this process) decides what is missing exactly as the one-process engine does (the same request,
output-folder check, lock and :func:`helpers.cli.batch.plan_batch`), cuts it into the same chunks of ``batch_size``
images, and hands the chunks to Ray Data. ``map_batches`` runs :class:`LabelWorker`, a stateful actor class:
each actor loads the converted model once, with ``INFERENCE_NUM_THREADS`` equal to its CPUs and
``ENABLE_CPU_PINNING`` off (OpenVINO otherwise pins every actor's threads onto the same cores), and answers a chunk
with :func:`helpers.cli.batch.answer_chunk`, the function the one-process engine runs. So every ``generate`` call sees the same images as it would in one process,
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
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from helpers.cli.batch import (
    COCO_FILE,
    DRAWINGS_DIR,
    RESULTS_FILE,
    BatchRequest,
    BatchSummary,
    ImageJob,
    answer_chunk,
    append_records,
    check_output_folder,
    find_images,
    make_request,
    model_identity,
    output_lock,
    plan_batch,
    read_results,
    repair_results,
    write_coco,
    write_run_summary,
)

__all__ = [
    "TASK_RETRIES",
    "ConvertedModelInfo",
    "LabelWorker",
    "actor_ov_config",
    "keep_local_cluster_on_loopback",
    "label_on_ray",
]

#: How often Ray runs a chunk again on a restarted actor after its worker process died.
TASK_RETRIES = 2


#: Ray reads this when it is imported: "0" makes a local cluster bind to 127.0.0.1 instead of the machine's network
#: address (Ray's own switch, named for macOS and Windows, where loopback is its default).
LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def keep_local_cluster_on_loopback() -> bool:
    """Make a local Ray cluster started later by this process listen on 127.0.0.1 only, not on the network.

    Must run before ``import ray`` (Ray reads the switch once); returns False when Ray was imported already and the
    choice is Ray's defaults. A cluster you join with ``--ray-address`` is not affected. Sets one environment
    variable of this process (inherited by the cluster it starts), which is why it is a call, not an import effect.
    """
    if "ray" in sys.modules:
        return os.environ.get(LOOPBACK_SWITCH) == "0"
    os.environ.setdefault(LOOPBACK_SWITCH, "0")
    return True


def actor_ov_config(cpus: int, ov_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """OpenVINO settings for one actor: as many inference threads as the actor has CPUs, and no pinning of threads
    to cores (every actor on a machine would otherwise pin onto the same first cores). ``ov_config`` adds to it."""
    return {"INFERENCE_NUM_THREADS": int(cpus), "ENABLE_CPU_PINNING": False, **(ov_config or {})}


class ConvertedModelInfo:
    """What a batch request needs to know about a converted model (its manifest, config and generation config),
    read from the folder without compiling it: the driver plans with it, the actors load the model itself."""

    def __init__(self, model_dir: str | Path) -> None:
        from transformers import AutoConfig, GenerationConfig

        from helpers.ir import verify_conversion

        self.model_dir = Path(model_dir)
        self.manifest = verify_conversion(self.model_dir, check_hashes=False)
        self.config = AutoConfig.from_pretrained(self.model_dir, trust_remote_code=False)
        self.generation_config = GenerationConfig.from_pretrained(self.model_dir)


# ----------------------------------------------------------------------------------------------------------------
# What runs in every actor


def _job_from_row(row: dict[str, Any]) -> ImageJob:
    job = ImageJob(**row)
    job.size = tuple(job.size) if job.size else None  # type: ignore[assignment]  # JSON made it a list
    return job


def _drawings_in(folder: Path) -> dict[str, str]:
    """The PNGs under ``folder`` as ``{relative path: base64}``: drawn on the actor's machine, saved by the driver."""
    return {path.relative_to(folder).as_posix(): base64.b64encode(path.read_bytes()).decode("ascii")
            for path in folder.rglob("*.png")}  # fmt: skip


class LabelWorker:
    """A Ray Data actor: loads the converted model once, then answers one chunk of images per call with
    :func:`helpers.cli.batch.answer_chunk`.

    Rows are chunks, ``{"jobs": JSON list of ImageJob fields}``; an output row is ``{"records": JSON list of JSONL
    records, "drawings": JSON {path: base64 PNG}, "worker": JSON facts about the loaded model}``. The actor refuses
    to answer with a model other than the one the driver planned for (another conversion, other weights).
    Everything it prints goes to stderr, so the driver's stdout stays free for the command's answer."""

    def __init__(self, model: str, weight_format: str, device: str, cpus: int, request: BatchRequest,
                 ov_config: dict[str, Any] | None = None, draw: bool = False) -> None:  # fmt: skip
        from helpers.course.checkpoints import load_model

        self.request, self.draw = request, draw
        self.ov_config = actor_ov_config(cpus, ov_config)
        with contextlib.redirect_stdout(sys.stderr):
            self.model, self.processor = load_model(model, weight_format, device, self.ov_config)
        loaded = model_identity(self.model)
        if loaded != request.model:
            raise RuntimeError(f"This worker loaded {loaded} from {self.model.model_dir}, but the run was planned "
                               f"for {request.model}. Convert the model on every machine from the same source.")  # fmt: skip
        self.facts = {"model_dir": str(self.model.model_dir), "device": device, "ov_config": self.ov_config,
                      "node": platform.node(), "pid": os.getpid()}  # fmt: skip

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        records, drawings = [], []
        for chunk in batch["jobs"]:
            jobs = [_job_from_row(row) for row in json.loads(chunk)]
            with tempfile.TemporaryDirectory(prefix="florence2-drawings-") as scratch, \
                    contextlib.redirect_stdout(sys.stderr):  # fmt: skip
                folder = Path(scratch) if self.draw else None
                answered = answer_chunk(self.model, self.processor, jobs, self.request, drawings=folder)
                drawings.append(json.dumps(_drawings_in(Path(scratch))))
            records.append(json.dumps(answered, ensure_ascii=True))
        return {"records": records, "drawings": drawings, "worker": [json.dumps(self.facts)] * len(records)}


# ----------------------------------------------------------------------------------------------------------------
# The driver


@contextlib.contextmanager
def _ray_cluster(address: str | None, num_cpus: int) -> Iterator[Any]:
    """Connect to ``address`` (an existing cluster, or ``auto``), start a local cluster of ``num_cpus`` CPUs, or use
    the cluster this process already joined (left running: it is the caller's)."""
    if not address:
        keep_local_cluster_on_loopback()  # a laptop's cluster serves this machine only
    import ray
    import ray.data  # ray.data.* below

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
    """The jobs in the one-process engine's chunks, one Ray Data row each (JSON: file names may hold any bytes)."""
    return [{"jobs": json.dumps([dataclasses.asdict(j) for j in jobs[i : i + batch_size]], ensure_ascii=True)}
            for i in range(0, len(jobs), batch_size)]  # fmt: skip


def _save_drawings(drawings: dict[str, str], folder: Path) -> None:
    for relative, data in drawings.items():
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(base64.b64decode(data))


def _answered_chunks(ray: Any, rows: list[dict[str, str]], workers: int,
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
                fn_constructor_kwargs=worker_kwargs,
                compute=ray.data.ActorPoolStrategy(size=workers),
                batch_size=1,
                num_cpus=worker_kwargs["cpus"],
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
    update: bool = False,
    recursive: bool = False,
    progress: bool = True,
    reconvert: bool = False,
    **generate_kwargs: Any,
) -> BatchSummary:
    """Answer ``tasks`` for every image of ``source`` that ``output_dir/results.jsonl`` still lacks, on ``workers``
    Ray actors of ``cpus_per_worker`` CPUs each (default: this machine's CPUs shared out).

    Same arguments, files, checks and resume rules as :func:`helpers.cli.batch.process_images`; ``model`` is what
    ``--model`` takes (converted here first, again over the cache with ``reconvert``; each actor loads it with
    :func:`helpers.course.checkpoints.load_model`).
    ``ray_address`` joins an existing cluster; without it a local one is started and stopped (a cluster this process
    already joined is used and left running). Also writes ``summary.json``. Taught in
    ``notebooks/13_label_dataset.ipynb``.
    """
    from helpers.course.checkpoints import ensure_converted

    for name, value in (("workers", workers), ("batch_size", batch_size), ("cpus_per_worker", cpus_per_worker or 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    cpus = cpus_per_worker or max(1, (os.cpu_count() or 1) // workers)
    with contextlib.redirect_stdout(sys.stderr):
        folder = ensure_converted(model, weight_format, reconvert=reconvert)  # before the actors look for it
    request = make_request(ConvertedModelInfo(folder), tasks, text_input=text_input, scores=scores, **generate_kwargs)
    root, files = find_images(source, recursive=recursive)
    out = Path(output_dir)
    results_path = out / RESULTS_FILE
    clock, seen = _Clock(), _Seen()
    with output_lock(out):
        check_output_folder(out, root, request, update=update)
        summary = BatchSummary(results=results_path, repaired=repair_results(results_path))
        records, summary.unreadable_lines = read_results(results_path)
        jobs = plan_batch(root, files, records, request, summary, retry_errors=retry_errors)
        summary.drawings = out / DRAWINGS_DIR if draw else None
        if jobs:
            worker_kwargs = {"model": model, "weight_format": weight_format, "device": device, "cpus": cpus,
                             "request": request, "ov_config": ov_config, "draw": draw}  # fmt: skip
            _run(jobs, batch_size, workers, ray_address, worker_kwargs, summary, clock, seen, progress)
        if coco:
            summary.coco = out / COCO_FILE
            write_coco(results_path, summary.coco)
    answered = summary.processed + len(summary.failed)
    missing = len(jobs) - answered
    if missing:
        print(f"{missing} image(s) were not answered (their chunk kept failing); run the same command again to "
              "answer them.", file=sys.stderr)  # fmt: skip
    write_run_summary(out, {
        "engine": "ray", "workers": workers, "cpus_per_worker": cpus, "ray_address": ray_address,
        "cluster": seen.cluster, "batch_size": batch_size, "tasks": list(request.tasks), "images_answered": answered,
        "images_failed": len(summary.failed), "images_skipped": summary.skipped, "images_missing": missing,
        **clock.facts(answered), "model": model, "model_dirs_loaded": sorted(seen.model_dirs),
        "actors_seen": len(seen.actors), "ov_configs": [json.loads(c) for c in sorted(seen.ov_configs)],
    })  # fmt: skip
    return summary


def _run(jobs: Sequence[ImageJob], batch_size: int, workers: int, ray_address: str | None,
         worker_kwargs: dict[str, Any], summary: BatchSummary, clock: _Clock, seen: _Seen, progress: bool) -> None:  # fmt: skip
    """Answer ``jobs`` on the cluster, appending each answered chunk to the results as it arrives."""
    from tqdm.auto import tqdm

    with (
        _ray_cluster(ray_address, workers * worker_kwargs["cpus"]) as ray,
        tqdm(total=len(jobs), unit="image", disable=not progress, desc=f"Florence-2 on Ray ({workers} workers)") as bar,
    ):
        seen.cluster = ray.get_runtime_context().gcs_address
        clock.start()
        for row in _answered_chunks(ray, _chunk_rows(jobs, batch_size), workers, worker_kwargs):
            records = json.loads(row["records"])
            if summary.drawings:
                _save_drawings(json.loads(row["drawings"]), summary.drawings)
            append_records(summary.results, records)
            clock.chunk_done(len(records))
            _count(summary, records)
            seen.note(json.loads(row["worker"]))
            bar.update(len(records))


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


class _Seen:
    """What the answered chunks say about the actors: the model folders they loaded, who they were, their settings."""

    def __init__(self) -> None:
        self.cluster: str | None = None
        self.model_dirs: set[str] = set()
        self.actors: set[str] = set()
        self.ov_configs: set[str] = set()

    def note(self, worker: dict[str, Any]) -> None:
        self.model_dirs.add(worker["model_dir"])
        self.actors.add(f"{worker['node']}:{worker['pid']}")
        self.ov_configs.add(json.dumps(worker["ov_config"], sort_keys=True))
