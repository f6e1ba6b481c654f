"""Soak test: many consecutive generations on one OpenVINO Florence-2, watching memory.

A classroom or a service runs thousands of requests on one loaded model; a few kilobytes kept per request add up.
This script runs ``--iterations`` generations (default 500) through :func:`helpers.tasks.run.run_task`, cycling over all
15 tasks, images of varying size and mode, greedy and beam search, then prints how much the process's memory grew
after a warm-up:

* **peak RSS growth** — the peak resident memory during the measured iterations versus the peak during the warm-up,
  in %. On Linux the kernel's own high-water mark (``VmHWM``) is reset between the phases (``/proc/self/clear_refs``),
  so a one-off spike while loading the model cannot hide a leak; elsewhere the RSS sampled after every iteration is
  used;
* **RSS growth** — the resident memory over the last iterations versus the last warm-up iterations (medians of
  the RSS sampled after each iteration, so one allocator hiccup does not decide), in %.

The warm-up (default 30 iterations, at least one per task) lets allocator pools, OpenVINO's per-shape kernels and
the image-feature cache reach their steady size first. ``tests/test_robustness.py`` runs a short version and
requires less than 5% growth.

``--mixed`` cycles single calls, two calls from two threads at once, calls with scores and batch runs (3 images, 2
tasks, into a fresh output folder each time), and also reports the bytes on disk (model folder with its compiled
cache, and the batch outputs). Measured on the tiny model, 300 calls after 40 warm-up calls (2026-12-01): disk
6,916,168 → 6,916,168 bytes; RSS +1.7% (peak +2.6%) with ``MALLOC_ARENA_MAX=2``, +17% (peak +16%) without it: glibc
gives every new thread its own malloc arena (up to 8 per core), so thread-heavy runs grow until that cap is reached.

Usage::

    python scripts/soak.py [--iterations 500] [--warmup 30] [--model-dir CONVERTED_DIR] [--device CPU] [--json]
    python scripts/soak.py --mixed --iterations 300 --warmup 40   # threads + scores + batch runs, disk watched too

Without ``--model-dir`` the offline tiny model is built and converted once (cached under ``FLORENCE2_MODELS_DIR``,
default ``models/``). ``--json`` prints the figures as one JSON line at the end. ``--simulate-leak-kb N`` keeps N KB
per iteration on purpose: it shows that the measurement sees a leak (the test suite checks this).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import numpy as np
from PIL import Image

from helpers.process_memory import peak_rss_bytes, reset_peak_rss, rss_bytes
from helpers.tasks.run import TASKS, run_task

#: Text inputs for the tasks that need one, regions given both ways (string and pixel box).
TEXT_INPUTS = {
    "<CAPTION_TO_PHRASE_GROUNDING>": "a red car next to a green tree",
    "<OPEN_VOCABULARY_DETECTION>": "bicycle",
    "<REFERRING_EXPRESSION_SEGMENTATION>": "the dog on the left",
    "<REGION_TO_SEGMENTATION>": "<loc_100><loc_150><loc_600><loc_700>",
    "<REGION_TO_CATEGORY>": (5.0, 5.0, 40.0, 30.0),
    "<REGION_TO_DESCRIPTION>": "<loc_0><loc_0><loc_500><loc_999>",
    "<REGION_TO_OCR>": (0.0, 0.0, 30.0, 20.0),
}
SIZES = [(64, 48), (200, 120), (97, 301), (48, 48), (320, 240)]
MODES = ["RGB", "L", "RGBA", "P"]


def request(iteration: int) -> tuple[Image.Image, str, object, dict]:
    """The iteration-th request: task, image (size, mode, content) and generation settings all vary."""
    tasks = list(TASKS)
    task = tasks[iteration % len(tasks)]
    width, height = SIZES[iteration % len(SIZES)]
    rng = np.random.default_rng(iteration % 40)  # 40 distinct images: more than the image-feature cache holds
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    mode = MODES[(iteration // len(tasks)) % len(MODES)]
    image = image.convert(mode) if mode != "P" else image.quantize(16)
    kwargs = {"max_new_tokens": 20, "num_beams": 1 if iteration % 3 else 3}
    return image, task, TEXT_INPUTS.get(task), kwargs


def disk_bytes(folder: Path) -> int:
    """Bytes of every file under ``folder`` (0 when it does not exist)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def mixed_call(model, processor, iteration: int, workdir: Path) -> None:
    """The iteration-th call of ``--mixed``: in turn one request, two requests from two threads at once, a request
    with confidence scores, and a batch run (3 images, 2 tasks) into a fresh output folder under ``workdir``."""
    from concurrent.futures import ThreadPoolExecutor

    from helpers.cli.batch import process_images
    from helpers.outputs.scores import SCORED_TASKS, run_task_with_scores

    kind = iteration % 4
    if kind == 0:
        image, task, text, kwargs = request(iteration)
        run_task(model, processor, image, task, text, **kwargs)
    elif kind == 1:

        def one(index: int) -> None:
            image, task, text, kwargs = request(index)
            run_task(model, processor, image, task, text, **kwargs)

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(one, [iteration, iteration + 1]))
    elif kind == 2:
        image, _, _, kwargs = request(iteration)
        task = SCORED_TASKS[iteration % len(SCORED_TASKS)]
        run_task_with_scores(model, processor, image, task, TEXT_INPUTS.get(task), **kwargs)
    else:
        images = workdir / "images"
        if not images.exists():
            images.mkdir(parents=True)
            for index in range(3):
                request(index)[0].convert("RGB").save(images / f"{index}.png")
        out = workdir / "batch"
        shutil.rmtree(out, ignore_errors=True)
        process_images(model, processor, images, ["<OD>", "<CAPTION>"], out, batch_size=2, coco=True, progress=False,
                       max_new_tokens=16, num_beams=1 + iteration % 2 * 2)  # fmt: skip


def soak(model, processor, iterations: int, warmup: int, *, simulate_leak_kb: int = 0, verbose: bool = True,
         mixed_workdir: Path | None = None) -> dict:  # fmt: skip
    """Run ``iterations`` requests (``mixed_workdir``: :func:`mixed_call` calls instead) and return the memory and
    disk figures (bytes and % growth after ``warmup``; disk: the model folder, its compiled cache included, and the
    work folder)."""
    if not 1 < warmup < iterations:
        raise ValueError(f"Need 1 < warmup < iterations, got warmup={warmup}, iterations={iterations}.")
    kept: list[bytes] = []
    kernel_peak = False
    sampled_peak = baseline_peak = 0
    samples: list[int] = []  # RSS after each iteration
    window = max(1, min(10, warmup // 2))
    start = time.perf_counter()
    for iteration in range(iterations):
        if mixed_workdir is not None:
            mixed_call(model, processor, iteration, mixed_workdir)
        else:
            image, task, text, kwargs = request(iteration)
            run_task(model, processor, image, task, text, **kwargs)
        if simulate_leak_kb:
            kept.append(os.urandom(simulate_leak_kb * 1024))  # random bytes: the pages are really touched
        samples.append(rss_bytes())
        sampled_peak = max(sampled_peak, samples[-1])
        if iteration == 0:  # loading and compiling the model peak once; that is not what is measured
            kernel_peak, sampled_peak = reset_peak_rss(), rss_bytes()
        if iteration + 1 == warmup:
            gc.collect()
            baseline_rss, baseline_peak = median(samples[-window:]), peak_rss_bytes() if kernel_peak else sampled_peak
            baseline_disk = _disk(model, mixed_workdir)
            kernel_peak, sampled_peak = reset_peak_rss(), rss_bytes()
        if verbose and (iteration + 1) % 50 == 0:
            print(f"{iteration + 1:5d}/{iterations}  RSS {rss_bytes() / 2**20:7.1f} MiB", flush=True)
    final_rss, final_peak = median(samples[-window:]), peak_rss_bytes() if kernel_peak else sampled_peak
    return {
        "peak_source": "kernel VmHWM" if kernel_peak else "sampled RSS",
        "iterations": iterations,
        "warmup": warmup,
        "seconds": round(time.perf_counter() - start, 2),
        "baseline_rss_mib": round(baseline_rss / 2**20, 1),
        "final_rss_mib": round(final_rss / 2**20, 1),
        "baseline_peak_rss_mib": round(baseline_peak / 2**20, 1),
        "final_peak_rss_mib": round(final_peak / 2**20, 1),
        "rss_growth_percent": round(100.0 * (final_rss - baseline_rss) / baseline_rss, 2),
        "peak_rss_growth_percent": round(100.0 * (final_peak - baseline_peak) / baseline_peak, 2),
        "baseline_disk_bytes": baseline_disk,
        "final_disk_bytes": _disk(model, mixed_workdir),
    }


def _disk(model, workdir: Path | None) -> int:
    return disk_bytes(Path(model.model_dir)) + (disk_bytes(workdir) if workdir is not None else 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--model-dir", type=Path, default=None, help="a folder written by convert_florence2")
    parser.add_argument("--device", default="CPU")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON line at the end")
    parser.add_argument("--simulate-leak-kb", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--mixed", action="store_true",
                        help="cycle single calls, two threads at once, scores and batch runs (see mixed_call)")  # fmt: skip
    args = parser.parse_args(argv)

    from transformers import AutoProcessor

    from helpers.runtime.ov_model import OVFlorence2Model

    model_dir = args.model_dir
    if model_dir is None:
        from helpers.course.checkpoints import TINY_MODEL, ensure_converted

        model_dir = ensure_converted(TINY_MODEL, "fp32")
    model = OVFlorence2Model(model_dir, args.device)
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=False)
    with tempfile.TemporaryDirectory(prefix="florence2-soak-") as workdir:
        result = soak(model, processor, args.iterations, args.warmup, simulate_leak_kb=args.simulate_leak_kb,
                      mixed_workdir=Path(workdir) if args.mixed else None)  # fmt: skip
    print(
        f"{result['iterations']} generations in {result['seconds']} s on {model_dir} ({args.device}). "
        f"After {result['warmup']} warm-up iterations: peak RSS ({result['peak_source']}) "
        f"{result['baseline_peak_rss_mib']} → "
        f"{result['final_peak_rss_mib']} MiB ({result['peak_rss_growth_percent']:+.2f}%), RSS "
        f"{result['baseline_rss_mib']} → {result['final_rss_mib']} MiB ({result['rss_growth_percent']:+.2f}%); disk "
        f"{result['baseline_disk_bytes']:,} → {result['final_disk_bytes']:,} bytes."
    )
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
