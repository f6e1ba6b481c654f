"""Florence-2 speed, side by side: PyTorch eager FP32 against OpenVINO at several precisions.

    python benchmarks/benchmark.py                      # full-size Florence-2-base architecture, random weights
    python benchmarks/benchmark.py --model florence-community/Florence-2-base-ft
    python benchmarks/benchmark.py --model path/to/folder
    python benchmarks/benchmark.py --quick              # seconds, on the tiny offline model (used by a test)
    python benchmarks/benchmark.py --engines            # images/second: one process (batch 1, 4) vs Ray (1, 2 workers)

Every backend is measured in its own subprocess (so its peak RSS is its own) with the same image, prompts and
generation arguments; generation is forced to exactly ``--new-tokens`` tokens (``min_new_tokens = max_new_tokens``)
so that every backend does the same work. Reported values are medians over ``--repeats``. Results go to
``benchmarks/results/<name>.json`` and a bar chart beside it; the table and the ratios against PyTorch are printed.

``--engines`` measures the batch command's engines instead (:func:`run_engine_throughput`): the same images
labelled by one process at batch 1 and 4 and by Ray Data with 1 and 2 workers, in one run.

Taught in ``notebooks/11_speed.ipynb`` (engines: ``notebooks/13_label_dataset.ipynb``); latest numbers in
``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from helpers.process_memory import peak_rss_bytes, rss_bytes

RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: backend name -> (weight format of the IR, OpenVINO config, description). ``None`` config: the model's defaults.
OV_BACKENDS: dict[str, tuple[str, dict | None, str]] = {
    "ov-fp32": ("fp32", {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}, "OpenVINO FP32 IR, f32 hint"),
    "ov-default": ("fp16", None, "OpenVINO FP16 IR, CPU default precision"),
    "ov-int8": ("int8", None, "OpenVINO INT8 weights"),
    "ov-int4": ("int4", None, "OpenVINO INT4 weights (vision INT8)"),
    "ov-w8a8": ("w8a8", None, "OpenVINO INT8 weights + INT8 vision activations"),
}
#: Weight formats in the order they are converted and shown.
FORMAT_ORDER = ["fp32", "fp16", "int8", "int4", "w8a8"]
BACKENDS = ["pytorch", *OV_BACKENDS]
DESCRIPTIONS = {"pytorch": "PyTorch FP32 eager", **{k: v[2] for k, v in OV_BACKENDS.items()}}
FIRST_TASK, SECOND_TASK = "<OD>", "<CAPTION>"


# ----------------------------------------------------------------------------------------------------------------
# helpers


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def timed(fn, repeats: int) -> tuple[float, Any]:
    """Median wall time of ``fn()`` over ``repeats`` calls, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return median(times), result


def peak_rss_mb() -> float:
    return peak_rss_bytes() / 2**20


def current_rss_mb() -> float:
    return rss_bytes() / 2**20


def folder_mb(folder: Path, suffixes=(".bin", ".xml", ".safetensors")) -> float:
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.suffix in suffixes) / 2**20


class StepTimer:
    """Times every decoder call that ``generate`` makes (by wrapping the model's ``forward``)."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.ends: list[float] = []  # perf_counter() when each call returned

    def wrap(self, forward):
        import functools

        @functools.wraps(forward)  # generate() validates its arguments against forward's signature
        def timed_forward(*args, **kwargs):
            start = time.perf_counter()
            out = forward(*args, **kwargs)
            end = time.perf_counter()
            self.steps.append(end - start)
            self.ends.append(end)
            return out

        return timed_forward


# ----------------------------------------------------------------------------------------------------------------
# the measurement of one backend (runs in a subprocess)


def load_backend(
    backend: str, source: str, ov_dir: str | None, cache_dir: str | None, threads: int | None = None
) -> Any:
    """Load one backend's model: PyTorch eager, or ``OVFlorence2Model`` compiled with ``cache_dir``."""
    if backend == "pytorch":
        from helpers.convert.conversion import load_torch_model

        return load_torch_model(Path(source))
    from helpers.runtime.ov_model import OVFlorence2Model

    _, ov_config, _ = OV_BACKENDS[backend]
    if threads:  # a thread-scaling run: OpenVINO on exactly this many threads (else the plugin's default, all cores)
        ov_config = {**(ov_config or {}), "INFERENCE_NUM_THREADS": threads}
    return OVFlorence2Model(ov_dir, "CPU", ov_config, cache_dir=cache_dir)


def time_loads(backend: str, source: str, ov_dir: str | None, cache_dir: str) -> dict:
    """Load twice: the first load compiles (OpenVINO) or reads cold files; the second reads the compiled-model cache
    (OpenVINO) or the OS page cache. Run in its own process, so loading twice never inflates a peak RSS."""
    load_times = []
    for _ in range(2):
        gc.collect()
        start = time.perf_counter()
        model = load_backend(backend, source, ov_dir, cache_dir)
        load_times.append(time.perf_counter() - start)
        del model  # never hold two copies
    return {"load_first_s": load_times[0], "load_second_s": load_times[1]}


def measure_backend(backend: str, source: str, ov_dir: str | None, args: dict) -> dict:
    """Load one backend and measure everything about it. Returns a JSON-able dict.

    ``args["cache_dir"]`` is a compiled-model cache that :func:`time_loads` already filled (one load here, as a
    user's second run does); without it, the load times are measured here too (in-process mode)."""
    import numpy as np
    import torch
    from transformers import AutoProcessor

    from helpers.course.samples import load_sample

    torch.set_num_threads(args["threads"])
    n, repeats = args["new_tokens"], args["repeats"]
    result: dict[str, Any] = {"backend": backend, "description": DESCRIPTIONS[backend]}
    processor = AutoProcessor.from_pretrained(source)
    image = load_sample("grace_hopper")
    second_image = load_sample("pagoda")
    rss_before = current_rss_mb()

    # ---- loading -----------------------------------------------------------------------------------------------
    ov_threads = args.get("ov_threads")
    if args.get("cache_dir"):
        model = load_backend(backend, source, ov_dir, args["cache_dir"], ov_threads)
    else:
        cache_dir = tempfile.mkdtemp(prefix="ov-compiled-cache-")
        try:
            result.update(time_loads(backend, source, ov_dir, cache_dir))
            model = load_backend(backend, source, ov_dir, cache_dir, ov_threads)
        finally:
            shutil.rmtree(cache_dir, ignore_errors=True)
    result["weights_mb"] = folder_mb(Path(source if backend == "pytorch" else ov_dir))
    if backend != "pytorch":
        result["ov_config"] = model.ov_config
    result["rss_after_load_mb"] = current_rss_mb() - rss_before

    def inputs_for(task: str, images):
        return processor(text=[task] * len(images), images=images, return_tensors="pt")

    inputs = inputs_for(FIRST_TASK, [image])
    pixel_values = inputs["pixel_values"]
    result["encoder_tokens"] = int(inputs["input_ids"].shape[1])
    gen = {"min_new_tokens": n, "max_new_tokens": n, "do_sample": False}

    def clear_image_cache() -> None:
        if backend != "pytorch":
            model.image_cache.clear()

    # ---- parts -------------------------------------------------------------------------------------------------
    with torch.no_grad():
        if backend == "pytorch":
            vision = lambda: model.get_image_features(pixel_values).pooler_output  # noqa: E731
            features = vision()
            embeds = model.get_input_embeddings()(inputs["input_ids"])
            mask = inputs["input_ids"] == model.config.image_token_id
            embeds[mask] = features.reshape(-1, features.shape[-1])
            encoder = model.model.language_model.encoder
            text_encoder = lambda: encoder(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])  # noqa: E731
        else:
            pixels = pixel_values.numpy()
            vision = lambda: model.ov_vision_encoder(pixels)  # noqa: E731
            vision()
            ids, att = inputs["input_ids"].numpy(), inputs["attention_mask"].numpy()
            embeds = model.embed_tokens(ids).copy()
            embeds[ids == model.config.image_token_id] = model.image_features(pixels).reshape(-1, embeds.shape[-1])
            text_encoder = lambda: model.ov_text_encoder([embeds, att])  # noqa: E731
        text_encoder()
        result["vision_s"], _ = timed(vision, repeats)
        result["encoder_s"], _ = timed(text_encoder, repeats)

        # ---- end-to-end generate, greedy and beam ------------------------------------------------------------
        # Time every decoder call: PyTorch's forward, or the OpenVINO model's decoder_step (both generators use it).
        timer = StepTimer()
        step_method = "forward" if backend == "pytorch" else "decoder_step"
        original_step = getattr(model, step_method)
        setattr(model, step_method, timer.wrap(original_step))

        def generate(num_beams: int, task_inputs=inputs, clear: bool = True):
            if clear:
                clear_image_cache()
            timer.steps.clear()
            timer.ends.clear()
            return model.generate(**task_inputs, num_beams=num_beams, **gen)

        generate(1)  # warm-up (first inference allocates)
        generate(3)
        searches = {"greedy": 1, "beam3": 3}
        times, steps, after_first, tokens = ({key: [] for key in searches} for _ in range(4))
        # Rounds interleaved (greedy, beam 3, greedy, …): a slow spell of the machine hits both searches alike, and
        # neither is always the first one timed after loading (greedy used to be, and came out slower than beam 3).
        for _ in range(repeats):
            for key, beams in searches.items():
                start = time.perf_counter()
                tokens[key] = generate(beams)
                end = time.perf_counter()
                times[key].append(end - start)
                steps[key].append(list(timer.steps))
                after_first[key].append((end - timer.ends[0]) / max(1, n - 1))
        for key in searches:
            result[f"generate_{key}_s"] = median(times[key])
            result[f"generate_{key}_all_s"] = times[key]
            decode = [median(s[1:]) for s in steps[key] if len(s) > 1]
            result[f"decode_step_{key}_ms"] = 1000 * median(decode)
            result[f"first_step_{key}_ms"] = 1000 * median([s[0] for s in steps[key]])
            result[f"steps_{key}"] = len(steps[key][-1])
            # from the first token to the end of the same run, per new token (so never negative): decoder calls
            # plus generate's Python work, without vision and encoder (which run before the first token)
            result[f"ms_per_token_{key}"] = 1000 * median(after_first[key])
            result[f"tokens_{key}"] = tokens[key][0].tolist()
        setattr(model, step_method, original_step)
        if args.get("parts_only"):  # a thread-scaling run: parts, greedy and beam 3 only
            result["peak_rss_mb"] = result["peak_rss_one_image_mb"] = peak_rss_mb()
            result["threads"] = args["threads"]
            return result
        if backend != "pytorch":
            # the same greedy run through transformers' generate, to show what the numpy decode loop saves
            def transformers_greedy():
                clear_image_cache()
                return model.generate(**inputs, num_beams=1, generation="transformers", **gen)

            result["generate_greedy_transformers_s"], _ = timed(transformers_greedy, repeats)

        # ---- a second task on the same image (the OpenVINO model caches image features) -----------------------
        second_inputs = inputs_for(SECOND_TASK, [image])
        firsts, seconds, first_ttft, second_ttft = [], [], [], []
        for _ in range(repeats):
            clear_image_cache()
            start = time.perf_counter()
            model.generate(**inputs, num_beams=1, **gen)
            firsts.append(time.perf_counter() - start)
            start = time.perf_counter()
            model.generate(**second_inputs, num_beams=1, **gen)
            seconds.append(time.perf_counter() - start)
            # time to first token (prefill: vision + encoder + one decoder step), where the cache matters most
            clear_image_cache()
            one = {"min_new_tokens": 1, "max_new_tokens": 1, "do_sample": False}
            start = time.perf_counter()
            model.generate(**inputs, num_beams=1, **one)
            first_ttft.append(time.perf_counter() - start)
            start = time.perf_counter()
            model.generate(**second_inputs, num_beams=1, **one)
            second_ttft.append(time.perf_counter() - start)
        result["first_task_s"], result["second_task_s"] = median(firsts), median(seconds)
        result["first_task_ttft_s"], result["second_task_ttft_s"] = median(first_ttft), median(second_ttft)

        # one image at a time: the peak so far is what a user running one image per call needs
        result["peak_rss_one_image_mb"] = peak_rss_mb()

        # ---- batching: images per second ----------------------------------------------------------------------
        result["batch"] = {}
        pool = [image, second_image, load_sample("flower"), load_sample("shapes")]
        for size in args["batch_sizes"]:
            batch_inputs = inputs_for(FIRST_TASK, pool[:size] if size <= len(pool) else (pool * size)[:size])
            seconds_per_batch, _ = timed(lambda: generate(1, batch_inputs), max(1, repeats - 1))
            result["batch"][str(size)] = {"seconds": seconds_per_batch, "images_per_s": size / seconds_per_batch}

    result["peak_rss_mb"] = peak_rss_mb()
    result["threads"] = args["threads"]
    del np
    return result


def measure_deployed_memory(backend: str, source: str, ov_dir: str | None, args: dict) -> dict:
    """Peak RSS of a process that does only what a user's script does with one image: load the model once (warm
    compiled-model cache), then ``<OD>`` greedy, ``<OD>`` with 3 beams and ``<CAPTION>`` on the same image.

    Run for OpenVINO in the torch-free environment (``scripts/torch_free_venv.py``) when it is available, because a
    deployment needs no torch and importing it (transformers does, when it is installed) costs ≈300 MB; PyTorch
    runs in the main environment. Nothing here imports torch unless the backend is PyTorch."""
    import contextlib

    from transformers import AutoProcessor

    from helpers.course.samples import load_sample

    no_grad = contextlib.nullcontext()
    if backend == "pytorch":
        import torch

        torch.set_num_threads(args["threads"])
        no_grad = torch.no_grad()
    processor = AutoProcessor.from_pretrained(source)
    model = load_backend(backend, source, ov_dir, args.get("cache_dir"))
    image = load_sample("grace_hopper")
    n = args["new_tokens"]
    with no_grad:
        for task, beams in ((FIRST_TASK, 1), (FIRST_TASK, 3), (SECOND_TASK, 1)):
            inputs = processor(text=[task], images=[image], return_tensors="pt" if backend == "pytorch" else "np")
            model.generate(**inputs, num_beams=beams, min_new_tokens=n, max_new_tokens=n, do_sample=False)
    return {
        "deployed_peak_rss_mb": peak_rss_mb(),
        "deployed_torch_imported": "torch" in sys.modules,
        "deployed_python": sys.executable,
    }


# ----------------------------------------------------------------------------------------------------------------
# orchestration


def prepare(
    model: str, formats: list[str], verbose: bool, record: Path | None = None
) -> tuple[str, dict[str, Path], dict[str, float]]:
    """Resolve the model (building ``base-random``/``large-random``/``tiny`` offline) and convert it to each format
    (cached). A conversion that has to run runs in its own process, which records its time and peak RSS in
    ``record`` (``conversion-<model>.json`` beside the report, :func:`conversion_record`): a cached conversion takes
    no time to measure. Without ``record`` conversions run in this process."""
    from helpers.ir import is_converted
    from helpers.course.checkpoints import converted_dir, ensure_converted, resolve_model

    source = resolve_model(model)
    folders, seconds = {}, {}
    for weight_format in formats:
        start = time.perf_counter()
        if record is not None and not is_converted(converted_dir(source, weight_format)):
            measured = _subprocess(
                ["--worker-convert", weight_format, "--worker-source", source], f"converting to {weight_format}"
            )
            _remember_conversion(record, weight_format, measured)
        folders[weight_format] = ensure_converted(source, weight_format)
        seconds[weight_format] = time.perf_counter() - start
        if verbose:
            print(f"  {weight_format}: {folders[weight_format]} ({seconds[weight_format]:.1f} s)", flush=True)
    return source, folders, seconds


def conversion_record(path: Path) -> dict:
    """``{weight_format: {seconds, peak_rss_mb, ir_mb, when, load_average}}`` of the last measured conversions."""
    return json.loads(path.read_text()) if path.exists() else {}


def _remember_conversion(path: Path, weight_format: str, measured: dict) -> None:
    record = conversion_record(path)
    record[weight_format] = measured
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(record, indent=1))
    partial.replace(path)


def measure_conversion(source: str, weight_format: str) -> dict:
    """Convert ``source`` into the model cache (this process does nothing else): seconds, peak RSS, IR size."""
    import logging

    import nncf

    from helpers.ir import ir_size_bytes
    from helpers.course.checkpoints import ensure_converted

    nncf.set_log_level(logging.ERROR)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    folder = ensure_converted(source, weight_format)
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb(), "ir_mb": ir_size_bytes(folder) / 2**20,
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_average": [load_before, os.getloadavg()[0]]}  # fmt: skip


def _subprocess(command_args: list[str], what: str, python: str = sys.executable) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [python, __file__, *command_args, "--worker-out", str(out)]
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode != 0 or not out.exists():
            raise RuntimeError(f"{what} failed:\n{completed.stderr[-4000:]}")
        return json.loads(out.read_text())


def run_worker(
    backend: str, source: str, ov_dir: str | None, args: dict, in_process: bool, deploy_python: str = sys.executable
) -> dict:
    """Measure one backend: in this process, or in three fresh ones (load times; everything else with one load
    from the warm compiled-model cache, so the peak RSS is that of one loaded model; and the deployed memory, with
    OpenVINO in ``deploy_python``)."""
    if in_process:
        return measure_backend(backend, source, ov_dir, args)
    cache_dir = tempfile.mkdtemp(prefix="ov-compiled-cache-")
    try:
        where = ["--worker", backend, "--worker-source", source, "--worker-ov-dir", ov_dir or ""]
        # parts only (a large model): no load timing; the measuring process's first load compiles
        loads = (
            {} if args.get("parts_only") else _subprocess([*where, "--worker-loads", cache_dir], f"{backend} (loading)")
        )
        worker_args = json.dumps({**args, "cache_dir": cache_dir})
        result = _subprocess([*where, "--worker-args", worker_args], backend)
        python = sys.executable if backend == "pytorch" else deploy_python
        deployed_args = [*where, "--worker-args", worker_args, "--worker-deployed"]
        deployed = _subprocess(deployed_args, f"{backend} (deployed)", python)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    return {**result, **loads, **deployed}


def torch_free_python(verbose: bool) -> str:
    """The torch-free environment's interpreter (built on first use), or this one if it cannot be built."""
    builder = Path(__file__).resolve().parent.parent / "scripts" / "torch_free_venv.py"
    try:
        built = subprocess.run([sys.executable, str(builder)], check=True, capture_output=True, text=True)
        return built.stdout.strip().splitlines()[-1]  # the script prints the interpreter last
    except (OSError, subprocess.CalledProcessError, IndexError) as error:  # e.g. pip: no network, no cached wheels
        if verbose:
            print(f"  (no torch-free environment: {error}; deployed memory is measured with torch importable)")
        return sys.executable


def token_agreement(reference: list[int], tokens: list[int]) -> float:
    """Fraction of positions where two token sequences agree (over the longer length)."""
    length = max(len(reference), len(tokens))
    same = sum(a == b for a, b in zip(reference, tokens))
    return same / length if length else 1.0


def add_ratios(results: dict[str, dict]) -> dict[str, dict]:
    """Speed-ups against PyTorch (>1 = faster) and memory ratios (<1 = smaller)."""
    torch_result = results["pytorch"]
    ratios = {}
    for backend, r in results.items():
        pairs = {  # ratio -> (numerator, denominator) as (result, field); a parts-only run lacks some fields
            "generate_greedy": ((torch_result, "generate_greedy_s"), (r, "generate_greedy_s")),
            "generate_beam3": ((torch_result, "generate_beam3_s"), (r, "generate_beam3_s")),
            "vision": ((torch_result, "vision_s"), (r, "vision_s")),
            "encoder": ((torch_result, "encoder_s"), (r, "encoder_s")),
            "decode_step": ((torch_result, "decode_step_greedy_ms"), (r, "decode_step_greedy_ms")),
            "peak_rss": ((r, "peak_rss_mb"), (torch_result, "peak_rss_mb")),
            "peak_rss_one_image": ((r, "peak_rss_one_image_mb"), (torch_result, "peak_rss_one_image_mb")),
            "second_task_vs_first": ((r, "first_task_s"), (r, "second_task_s")),
            "second_task_vs_pytorch": ((torch_result, "second_task_s"), (r, "second_task_s")),
            "second_task_ttft_vs_first": ((r, "first_task_ttft_s"), (r, "second_task_ttft_s")),
            "load_first_vs_second": ((r, "load_first_s"), (r, "load_second_s")),
        }
        ratios[backend] = {name: top[0][top[1]] / bottom[0][bottom[1]] for name, (top, bottom) in pairs.items()
                           if top[1] in top[0] and bottom[1] in bottom[0]}  # fmt: skip
        ratios[backend]["token_agreement_greedy"] = token_agreement(torch_result["tokens_greedy"], r["tokens_greedy"])
        ratios[backend]["token_agreement_beam3"] = token_agreement(torch_result["tokens_beam3"], r["tokens_beam3"])
        if "deployed_peak_rss_mb" in r and "deployed_peak_rss_mb" in torch_result:
            ratios[backend]["peak_rss_deployed"] = r["deployed_peak_rss_mb"] / torch_result["deployed_peak_rss_mb"]
    return ratios


#: name -> (backends it needs, check on the ratios). Issue 16's targets first, then the earlier ones still kept.
TARGETS = {
    "greedy ≥4.0× (default precision)": (["ov-default"], lambda ratios: ratios["ov-default"]["generate_greedy"] >= 4.0),
    "greedy ≥6.0× (w8a8)": (["ov-w8a8"], lambda ratios: ratios["ov-w8a8"]["generate_greedy"] >= 6.0),
    "beam 3 ≥5.0× (default precision)": (["ov-default"], lambda ratios: ratios["ov-default"]["generate_beam3"] >= 5.0),
    "greedy ≥4.0× (INT8)": (["ov-int8"], lambda ratios: ratios["ov-int8"]["generate_greedy"] >= 4.0),
    "second task ≥10× faster than first (default, end-to-end)": (
        ["ov-default"],
        lambda ratios: ratios["ov-default"]["second_task_vs_first"] >= 10,
    ),
    "INT8 peak RSS ≤60% of PyTorch (one image per call, each as deployed)": (
        ["ov-int8"],
        lambda ratios: ratios["ov-int8"].get("peak_rss_deployed", ratios["ov-int8"]["peak_rss_one_image"]) <= 0.60,
    ),
}


# ----------------------------------------------------------------------------------------------------------------
# threads, roofline, Amdahl


def thread_scaling(counts: list[int], backends: list[str], results: dict, source: str, folders: dict, args: dict,
                   in_process: bool, verbose: bool) -> dict[str, dict]:  # fmt: skip
    """``{threads: {backend: parts, greedy and beam 3}}`` at each count: PyTorch with ``torch.set_num_threads``,
    OpenVINO with ``INFERENCE_NUM_THREADS``; each in a fresh process unless ``in_process``. The machine's own thread
    count is the main run (OpenVINO's default there uses every core)."""
    scaling: dict[str, dict] = {}
    for count in counts:
        scaling[str(count)] = {}
        for backend in backends:
            if count == args["threads"]:
                scaling[str(count)][backend] = results[backend]
                continue
            if verbose:
                print(f"Measuring {backend} at {count} thread{'s' * (count > 1)} …", flush=True)
            ov_dir = str(folders[OV_BACKENDS[backend][0]]) if backend in OV_BACKENDS else None
            run_args = {**args, "threads": count, "ov_threads": count, "parts_only": True}
            if in_process:
                import torch

                before = torch.get_num_threads()
                try:
                    scaling[str(count)][backend] = measure_backend(backend, source, ov_dir, run_args)
                finally:
                    torch.set_num_threads(before)  # this process goes on at its own thread count
                continue
            cache_dir = tempfile.mkdtemp(prefix="ov-compiled-cache-")
            try:
                run_args["cache_dir"] = cache_dir
                where = ["--worker", backend, "--worker-source", source, "--worker-ov-dir", ov_dir or ""]
                scaling[str(count)][backend] = _subprocess([*where, "--worker-args", json.dumps(run_args)], backend)
            finally:
                shutil.rmtree(cache_dir, ignore_errors=True)
    return scaling


def roofline_module():
    """``benchmarks/roofline.py``, loaded by path (the benchmarks folder is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("florence2_roofline", Path(__file__).resolve().parent / "roofline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _activation_precision(backend: str) -> str:
    """The precision of the vision encoder's matrix products: f32 (PyTorch, the f32 hint), int8 (w8a8), else what
    the CPU plugin defaults to (bf16 on CPUs with bf16 support)."""
    if backend in ("pytorch", "ov-fp32"):
        return "f32"
    if backend == "ov-w8a8":
        return "int8"
    import openvino as ov

    default = str(ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT"))
    return "bf16" if "bf16" in default else "f32"


def measure_roofline(results: dict, folders: dict, source: str, quick: bool, in_process: bool) -> dict:
    """Work per part from the IR (any format: the same graph), this CPU's rates measured now, and one row per
    backend and part (``benchmarks/roofline.py``)."""
    from transformers import AutoProcessor

    from helpers.convert.conversion import image_size_of

    roofline = roofline_module()
    image_size = image_size_of(AutoProcessor.from_pretrained(source))
    tokens = next(iter(results.values()))["encoder_tokens"]
    work = {
        fmt: roofline.graph_work(folder, image_size=image_size, encoder_tokens=tokens)
        for fmt, folder in folders.items()
    }
    threads = os.cpu_count() or 1
    if in_process:
        rates = roofline.microbenchmarks(threads, quick=quick)
    else:
        rates = _subprocess(["--worker-rates", str(threads)], "microbenchmarks")
    any_work = next(iter(work.values()))
    rows = {}
    for backend, r in results.items():
        times = {"vision_s": r["vision_s"], "encoder_s": r["encoder_s"], "decode_step_ms": r["decode_step_greedy_ms"]}
        if backend == "pytorch":  # the same graph; PyTorch reads the weights in f32
            step_bytes = 4.0 * any_work["decoder_step"]["weight_elements"]
            rows[backend] = roofline.roofline_rows(any_work, times, rates, "f32", step_bytes)
        else:
            rows[backend] = roofline.roofline_rows(
                work[OV_BACKENDS[backend][0]], times, rates, _activation_precision(backend)
            )
    return {"image_size": list(image_size), "encoder_tokens": tokens, "work": work, "rates": rates, "rows": rows}


def amdahl(results: dict, roofline: dict) -> dict:
    """The best greedy ratio a faster vision encoder can give when the rest stays as measured (Amdahl's law):
    the measured greedy time minus the measured vision time, plus the vision time at the INT8 matmul rate measured
    here (the vision work over it), and with the vision encoder free (the hard bound)."""
    torch_greedy = results["pytorch"]["generate_greedy_s"]
    gflop = next(iter(roofline["work"].values()))["vision"]["total"]
    int8_rate = roofline["rates"]["matmul"]["int8"]["gflops"]
    bounds = {}
    for backend, r in results.items():
        if backend == "pytorch":
            continue
        rest = r["generate_greedy_s"] - r["vision_s"]
        vision_at_peak = gflop / int8_rate
        if rest <= 0:  # separately timed calls on a busy machine: no bound to give
            continue
        bounds[backend] = {
            "rest_s": rest, "vision_at_int8_peak_s": vision_at_peak,
            "greedy_ratio_vision_at_int8_peak": torch_greedy / (rest + vision_at_peak),
            "greedy_ratio_vision_free": torch_greedy / rest,
        }  # fmt: skip
    return bounds


def _deployed_rss(r: dict) -> str:
    """The deployed process's peak RSS, marked when torch was imported in it although OpenVINO does not need it."""
    if "deployed_peak_rss_mb" not in r:
        return "–"
    marker = " (torch)" if r["deployed_torch_imported"] and r["backend"] != "pytorch" else ""
    return f"{r['deployed_peak_rss_mb']:.0f}{marker}"


def format_parts_table(report: dict) -> str:
    """A parts-only run: parts, greedy and beam 3, peak memory, and the ratios against PyTorch."""
    results, ratios = report["results"], report["ratios"]
    lines = ["| backend | vision s | encoder s | decode step ms | greedy s | beam 3 s | peak RSS MB (deployed / measuring) "
             "| IR/weights MB | greedy vs PyTorch | beam 3 vs PyTorch | vision vs PyTorch |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for backend, r in results.items():
        q = ratios[backend]
        lines.append(f"| {r['description']} | {r['vision_s']:.3f} | {r['encoder_s']:.3f} | {r['decode_step_greedy_ms']:.1f} "
                     f"| {r['generate_greedy_s']:.2f} | {r['generate_beam3_s']:.2f} | {_deployed_rss(r)} / {r['peak_rss_mb']:.0f} "
                     f"| {r['weights_mb']:.0f} | {q['generate_greedy']:.2f}× | {q['generate_beam3']:.2f}× | {q['vision']:.2f}× |")  # fmt: skip
    return "\n".join(lines + _extra_tables(report))


def format_table(report: dict) -> str:
    if report["settings"].get("parts_only"):
        return format_parts_table(report)
    results, ratios = report["results"], report["ratios"]
    n = report["settings"]["new_tokens"]
    header = (
        f"| backend | vision s | encoder s | decode step ms | greedy {n} tok s | beam3 {n} tok s | 2nd task s "
        "| load 1st/2nd s | peak RSS MB (deployed / 1 image / all) | IR/weights MB | tokens = PyTorch |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for backend, r in results.items():
        q = ratios[backend]
        lines.append(
            f"| {r['description']} | {r['vision_s']:.3f} | {r['encoder_s']:.3f} | {r['decode_step_greedy_ms']:.1f} "
            f"| {r['generate_greedy_s']:.2f} | {r['generate_beam3_s']:.2f} | {r['second_task_s']:.2f} "
            f"| {r['load_first_s']:.1f}/{r['load_second_s']:.1f} "
            f"| {_deployed_rss(r)} / {r['peak_rss_one_image_mb']:.0f} / {r['peak_rss_mb']:.0f} | {r['weights_mb']:.0f} "
            f"| {q['token_agreement_greedy']:.0%} / {q['token_agreement_beam3']:.0%} |"
        )
    lines += ["", "Ratios against PyTorch FP32 in the same run (speed-up >1 is faster; RSS <1 is smaller):", ""]
    header = (
        "| backend | greedy | beam3 | vision | encoder | decode step | 2nd task vs own 1st (e2e / TTFT) "
        "| 2nd task vs PyTorch's | peak RSS (deployed / 1 image / all) |"
    )
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for backend, q in ratios.items():
        deployed = f"{q['peak_rss_deployed']:.0%}" if "peak_rss_deployed" in q else "–"
        lines.append(
            f"| {backend} | {q['generate_greedy']:.2f}× | {q['generate_beam3']:.2f}× | {q['vision']:.2f}× "
            f"| {q['encoder']:.2f}× | {q['decode_step']:.2f}× | {q['second_task_vs_first']:.2f}× / "
            f"{q['second_task_ttft_vs_first']:.1f}× | {q['second_task_vs_pytorch']:.1f}× "
            f"| {deployed} / {q['peak_rss_one_image']:.0%} / {q['peak_rss']:.0%} |"
        )
    batch_backends = [b for b in results if results[b].get("batch")]
    if batch_backends:
        sizes = list(results[batch_backends[0]]["batch"])
        lines += ["", "Throughput (images/s, greedy, forced length):", ""]
        lines += ["| backend | " + " | ".join(f"batch {s}" for s in sizes) + " |", "|" + "---|" * (len(sizes) + 1)]
        for backend in batch_backends:
            batch = results[backend]["batch"]
            lines.append(f"| {backend} | " + " | ".join(f"{batch[s]['images_per_s']:.2f}" for s in sizes) + " |")
    lines += _extra_tables(report)
    if report.get("targets"):
        lines += ["", "Targets:"] + [f"- {'MET ' if ok else 'MISSED'} {name}" for name, ok in report["targets"].items()]
    elif report.get("settings", {}).get("quick"):
        lines += ["", "Targets: not graded on a quick run (they are the full-size model's; see a full run)."]
    return "\n".join(lines)


def format_threads_table(report: dict) -> str:
    """Parts, greedy and beam 3 at each thread count, and the speed-up from the fewest threads to the most."""
    scaling = report["threads"]
    counts = sorted(scaling, key=int)
    lines = ["| backend | threads | vision s | encoder s | decode step ms | greedy s | beam 3 s | greedy vs PyTorch (same threads) |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for backend in scaling[counts[0]]:
        for count in counts:
            r, torch_r = scaling[count][backend], scaling[count]["pytorch"]
            lines.append(f"| {backend} | {count} | {r['vision_s']:.3f} | {r['encoder_s']:.3f} | {r['decode_step_greedy_ms']:.1f} "
                         f"| {r['generate_greedy_s']:.2f} | {r['generate_beam3_s']:.2f} "
                         f"| {torch_r['generate_greedy_s'] / r['generate_greedy_s']:.2f}× |")  # fmt: skip
    if len(counts) > 1:
        low, high = counts[0], counts[-1]
        lines += ["", f"Scaling from {low} to {high} threads (time at {low} / time at {high}):", "",
                  "| backend | vision | encoder | decode step | greedy | beam 3 |", "|---|---|---|---|---|---|"]  # fmt: skip
        for backend in scaling[low]:
            a, b = scaling[low][backend], scaling[high][backend]
            lines.append(f"| {backend} | {a['vision_s'] / b['vision_s']:.2f}× | {a['encoder_s'] / b['encoder_s']:.2f}× "
                         f"| {a['decode_step_greedy_ms'] / b['decode_step_greedy_ms']:.2f}× "
                         f"| {a['generate_greedy_s'] / b['generate_greedy_s']:.2f}× | {a['generate_beam3_s'] / b['generate_beam3_s']:.2f}× |")  # fmt: skip
    return "\n".join(lines)


def format_amdahl(report: dict) -> str:
    lines = ["| backend | greedy minus vision s | vision at the INT8 matmul rate s | best greedy ratio (vision at INT8 peak) "
             "| bound (vision free) |", "|---|---|---|---|---|"]  # fmt: skip
    for backend, a in report["amdahl"].items():
        lines.append(
            f"| {backend} | {a['rest_s']:.3f} | {a['vision_at_int8_peak_s']:.3f} "
            f"| {a['greedy_ratio_vision_at_int8_peak']:.2f}× | {a['greedy_ratio_vision_free']:.2f}× |"
        )
    return "\n".join(lines)


def format_conversion(report: dict) -> str:
    lines = [
        "| weight format | conversion s | peak RSS MB | IR MB | measured (load average) |",
        "|---|---|---|---|---|",
    ]
    for fmt, c in report["conversion"].items():
        lines.append(
            f"| {fmt} | {c['seconds']:.0f} | {c['peak_rss_mb']:.0f} | {c['ir_mb']:.0f} "
            f"| {c['when']} ({c['load_average'][0]:.1f} → {c['load_average'][1]:.1f}) |"
        )
    return "\n".join(lines)


def _extra_tables(report: dict) -> list[str]:
    lines: list[str] = []
    if report.get("threads"):
        lines += ["", "Threads:", "", format_threads_table(report)]
    if report.get("roofline"):
        lines += ["", "Roofline (work from the IR graph, rates measured in this run):", "",
                  roofline_module().format_roofline(report["roofline"]["rows"], report["roofline"]["rates"])]  # fmt: skip
    if report.get("amdahl"):
        lines += [
            "",
            "What a faster vision encoder can give (Amdahl; the rest as measured):",
            "",
            format_amdahl(report),
        ]
    if report.get("conversion"):
        lines += ["", "Conversion (a fresh process each; cached conversions keep the figures of when they ran):", "",
                  format_conversion(report)]  # fmt: skip
    return lines


def plot(report: dict, path: Path) -> Path:
    """Bar chart: generate time per backend (greedy and beam 3) and the speed-ups against PyTorch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    results, ratios = report["results"], report["ratios"]
    backends = list(results)
    x = np.arange(len(backends))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.38
    for offset, key, label in ((-width / 2, "generate_greedy_s", "greedy"), (width / 2, "generate_beam3_s", "beam 3")):
        bars = left.bar(x + offset, [results[b][key] for b in backends], width, label=label)
        left.bar_label(bars, fmt="%.2f", fontsize=8)
    left.set_xticks(x, backends, rotation=20)
    left.set_ylabel("seconds (lower is better)")
    n = report["settings"]["new_tokens"]
    left.set_title(f"generate, {n} new tokens, one image")
    left.legend()
    parts = (
        ("vision", "vision"),
        ("encoder", "text encoder"),
        ("decode_step", "decoder step"),
        ("generate_greedy", "greedy e2e"),
    )
    width = 0.8 / len(parts)
    for i, (key, label) in enumerate(parts):
        right.bar(x + (i - (len(parts) - 1) / 2) * width, [ratios[b][key] for b in backends], width, label=label)
    right.axhline(1.0, color="grey", linewidth=0.8)
    right.set_xticks(x, backends, rotation=20)
    right.set_ylabel("speed-up vs PyTorch FP32 (higher is better)")
    right.set_title("speed-up per part")
    right.legend(fontsize=8)
    fig.suptitle(
        f"{report['settings']['model']} — {report['machine']['threads']} threads, {report['machine']['cpu']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run_benchmark(
    model: str = "base-random",
    *,
    quick: bool = False,
    repeats: int | None = None,
    new_tokens: int | None = None,
    backends: list[str] | None = None,
    batch_sizes: list[int] | None = None,
    in_process: bool | None = None,
    output: str | Path | None = None,
    verbose: bool = True,
    threads: list[int] | None = None,
    roofline: bool = True,
    parts_only: bool = False,
) -> dict:
    """Run the whole benchmark and return the report (also written as JSON + PNG). Used by ``11_speed.ipynb``.

    ``threads`` (e.g. ``[1, 2]``): also measure the parts, greedy and beam 3 of PyTorch and every OpenVINO backend
    at each of these thread counts (:func:`thread_scaling`; the machine's own count reuses the main run).
    ``roofline``: count each part's work in the IR and measure this CPU's rates (``benchmarks/roofline.py``).
    ``parts_only``: the parts, greedy, beam 3 and peak memory only (no load times, second task or batches): for
    the large model, whose full measurement takes long."""
    import openvino
    import torch
    import transformers

    repeats = repeats or (1 if quick else 3)
    new_tokens = new_tokens or (8 if quick else 50)
    batch_sizes = batch_sizes or ([1, 2] if quick else [1, 2, 4])
    in_process = quick if in_process is None else in_process
    backends = backends or BACKENDS
    if "pytorch" not in backends:
        backends = ["pytorch", *backends]
    formats = sorted({OV_BACKENDS[b][0] for b in backends if b in OV_BACKENDS}, key=FORMAT_ORDER.index)
    if verbose:
        print(f"Preparing {model} ({', '.join(formats)}) …", flush=True)
    name = Path(output) if output else RESULTS_DIR / f"{'quick' if quick else 'full'}-{Path(str(model)).name}.json"
    name.parent.mkdir(parents=True, exist_ok=True)  # before any measuring: the partial report is written beside it
    record = name.with_name(f"conversion-{Path(str(model)).name}.json")
    source, folders, convert_seconds = prepare(model, formats, verbose, None if in_process else record)
    args = {
        "new_tokens": new_tokens,
        "repeats": repeats,
        "threads": os.cpu_count() or 1,
        "batch_sizes": batch_sizes,
        "parts_only": parts_only,
    }
    deploy_python = sys.executable if in_process else torch_free_python(verbose)
    results = {}
    for backend in backends:
        if verbose:
            print(f"Measuring {backend} …", flush=True)
        ov_dir = str(folders[OV_BACKENDS[backend][0]]) if backend in OV_BACKENDS else None
        results[backend] = run_worker(backend, source, ov_dir, args, in_process, deploy_python)
        if verbose:
            r = results[backend]
            print(f"  greedy {r['generate_greedy_s']:.2f} s, beam3 {r['generate_beam3_s']:.2f} s, "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)  # fmt: skip
            # a backend at a time, so an interrupted run keeps what it measured
            Path(name.with_suffix(".partial.json")).write_text(json.dumps(results, indent=1))
    report = {
        "settings": {
            "model": model, "source": source, "quick": quick, "new_tokens": new_tokens, "repeats": repeats,
            "batch_sizes": batch_sizes, "first_task": FIRST_TASK, "second_task": SECOND_TASK, "image": "grace_hopper",
            "rss": "in-process: peak of the whole process" if in_process else "one subprocess per backend, one load",
            "parts_only": parts_only,
        },
        "machine": {
            "cpu": cpu_name(), "threads": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "openvino": openvino.get_version(), "transformers": transformers.__version__,
        },
        "conversion_s": convert_seconds,
        "conversion": {f: m for f, m in conversion_record(record).items() if f in formats},
        "results": results,
    }  # fmt: skip
    report["ratios"] = add_ratios(results)
    if threads:
        report["threads"] = thread_scaling(threads, backends, results, source, folders, args, in_process, verbose)
    if roofline:
        report["roofline"] = measure_roofline(results, folders, source, quick, in_process)
        report["amdahl"] = amdahl(results, report["roofline"])
    # The targets are the full-size model's: a quick run (a small model, 8 tokens, one process) is not graded.
    if not quick and not parts_only:
        report["targets"] = {name: bool(check(report["ratios"])) for name, (needs, check) in TARGETS.items()
                             if all(b in results for b in needs)}  # fmt: skip
    name.write_text(json.dumps(report, indent=1))
    report["json_path"] = str(name)
    report["chart_path"] = str(plot(report, name.with_suffix(".png")))
    report["table"] = format_table(report)
    if verbose:
        print(report["table"])
        print(f"\nWrote {name} and {report['chart_path']}")
    return report


# ----------------------------------------------------------------------------------------------------------------
# engines: images per second of the batch command, one process against Ray Data workers

#: (engine, batch size, Ray workers) measured by :func:`run_engine_throughput`, in this order.
ENGINE_SETUPS: tuple[tuple[str, int, int], ...] = (("local", 1, 1), ("local", 4, 1), ("ray", 1, 1), ("ray", 1, 2))


def _engine_images(folder: Path, count: int) -> Path:
    """``count`` different pictures (the samples, resized variants of them) as files, like a user's folder."""
    from helpers.course.samples import load_sample

    folder.mkdir(parents=True, exist_ok=True)
    samples = [load_sample(name) for name in ("grace_hopper", "pagoda", "flower", "shapes")]
    for index in range(count):
        picture = samples[index % len(samples)]
        scale = 1.0 - 0.1 * (index // len(samples))
        picture.resize((max(64, int(picture.width * scale)), max(64, int(picture.height * scale)))).save(
            folder / f"image_{index:03d}.png"
        )
    return folder


def _time_local(model_dir: str, images: Path, out: Path, batch_size: int, gen: dict) -> dict:
    """One process: load (not timed), warm up on one image, then label the folder."""
    from helpers.cli.batch import process_images
    from helpers.runtime.ov_model import OVFlorence2Model
    from transformers import AutoProcessor

    model = OVFlorence2Model(model_dir, "CPU")
    processor = AutoProcessor.from_pretrained(model_dir)
    warm = out.with_name(out.name + "-warm-up")
    process_images(model, processor, f"{images}/image_000.png*", "<OD>", warm, progress=False, **gen)
    start = time.perf_counter()
    summary = process_images(model, processor, images, "<OD>", out, batch_size=batch_size, progress=False, **gen)
    seconds = time.perf_counter() - start
    answered = summary.processed + len(summary.failed)
    return {"seconds": seconds, "images": answered, "cores": os.cpu_count() or 1, "threads": "all (OpenVINO default)"}


def _time_ray(model: str, images: Path, out: Path, batch_size: int, workers: int, gen: dict) -> dict:
    """Ray Data on the cluster this process joined: actors start and load the model inside the timed span, so the
    time to the first answered chunk is reported apart and the steady rate is taken after it."""
    from helpers.cli.ray_engine import label_on_ray

    cores = os.cpu_count() or 1
    start = time.perf_counter()
    summary = label_on_ray(model, images, "<OD>", out, workers=workers, cpus_per_worker=max(1, cores // workers),
                           batch_size=batch_size, progress=False, device="CPU", **gen)  # fmt: skip
    seconds = time.perf_counter() - start
    facts = json.loads((out / "summary.json").read_text())
    answered = summary.processed + len(summary.failed)
    return {"seconds": seconds, "images": answered, "cores": max(1, cores // workers) * workers,
            "threads": f"{max(1, cores // workers)} per worker", "first_chunk_s": facts["first_chunk_seconds"],
            "steady_images": facts["images_after_first_chunk"], "steady_s": facts["seconds_after_first_chunk"],
            "models_loaded": facts["model_dirs_loaded"]}  # fmt: skip


def run_engine_throughput(
    model: str = "base-random", *, quick: bool = False, images: int | None = None, new_tokens: int | None = None,
    output: str | Path | None = None, verbose: bool = True,
) -> dict:  # fmt: skip
    """Images/second of the batch command on this machine: one process at batch 1 and 4, Ray Data with 1 and 2
    workers (each with its share of the cores), the same ``<OD>`` request forced to ``new_tokens`` greedy tokens.
    Writes ``benchmarks/results/engines-<model>.json`` (or ``output``) and returns the report with its table."""
    import gc

    from helpers.cli.ray_engine import keep_local_cluster_on_loopback

    keep_local_cluster_on_loopback()
    import ray

    images = images or (6 if quick else 16)
    new_tokens = new_tokens or (8 if quick else 50)
    gen = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "num_beams": 1, "scores": False}
    source, folders, _ = prepare(model, ["fp16"], verbose)
    work = Path(tempfile.mkdtemp(prefix="florence2-engines-"))
    started_ray = not ray.is_initialized()
    results: dict[str, dict] = {}
    try:
        folder = _engine_images(work / "images", images)
        for engine, batch_size, workers in ENGINE_SETUPS:
            name = f"{engine} batch {batch_size}" + (
                f", {workers} worker{'s' * (workers > 1)}" if engine == "ray" else ""
            )
            if verbose:
                print(f"Measuring {name} …", flush=True)
            out = work / name.replace(" ", "-").replace(",", "")
            load_before = os.getloadavg()[0]  # the machine may be shared: say how busy it was
            if engine == "local":
                results[name] = _time_local(str(folders["fp16"]), folder, out, batch_size, gen)
            else:
                if not ray.is_initialized():
                    ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
                results[name] = _time_ray(source, folder, out, batch_size, workers, gen)
            gc.collect()
            results[name].update(engine=engine, batch_size=batch_size, workers=workers,
                                 load_average=[load_before, os.getloadavg()[0]])  # fmt: skip
    finally:
        if started_ray and ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    for result in results.values():
        result["images_per_s"] = result["images"] / result["seconds"]
        steady = result.get("steady_s")
        result["steady_images_per_s"] = result["steady_images"] / steady if steady else result["images_per_s"]
        result["images_per_s_per_core"] = result["steady_images_per_s"] / result["cores"]
    report = {
        "settings": {"model": model, "source": source, "images": images, "new_tokens": new_tokens, "task": "<OD>",
                     "weight_format": "fp16", "quick": quick},
        "machine": {"cpu": cpu_name(), "threads": os.cpu_count(), "load_average": list(os.getloadavg())},
        "results": results,
    }  # fmt: skip
    name = Path(output) if output else RESULTS_DIR / f"engines-{'quick-' if quick else ''}{Path(str(model)).name}.json"
    name.parent.mkdir(parents=True, exist_ok=True)
    name.write_text(json.dumps(report, indent=1))
    report["json_path"] = str(name)
    report["table"] = format_engine_table(report)
    if verbose:
        print(report["table"])
        print(f"\nWrote {name}")
    return report


def format_engine_table(report: dict) -> str:
    """The engines side by side: whole-run and steady images/second, per core, against one process at batch 1."""
    results = report["results"]
    reference = next(iter(results.values()))["steady_images_per_s"]
    lines = [
        "| engine | cores | images | whole run s | images/s (whole run) | first chunk s | images/s (after it) "
        "| per core | vs one process, batch 1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        first = f"{r['first_chunk_s']:.1f}" if "first_chunk_s" in r else "–"
        lines.append(
            f"| {name} | {r['cores']} | {r['images']} | {r['seconds']:.1f} | {r['images_per_s']:.3f} | {first} "
            f"| {r['steady_images_per_s']:.3f} | {r['images_per_s_per_core']:.3f} "
            f"| {r['steady_images_per_s'] / reference:.2f}× |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="base-random (default), tiny, a hub id or a local folder")
    parser.add_argument("--quick", action="store_true", help="tiny model, 8 tokens, 1 repeat, in one process")
    parser.add_argument(
        "--engines",
        action="store_true",
        help="images/second of the batch command: one process (batch 1, 4) vs Ray (1, 2 workers)",
    )
    parser.add_argument("--images", type=int, help="--engines: images to label per engine (16; quick 6)")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--backends", nargs="+", choices=BACKENDS)
    parser.add_argument("--batch-sizes", nargs="+", type=int)
    parser.add_argument("--in-process", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument(
        "--threads", nargs="+", type=int, help="also measure parts, greedy and beam 3 at these thread counts"
    )
    parser.add_argument("--no-roofline", action="store_true", help="skip the graph work count and the microbenchmarks")
    parser.add_argument(
        "--parts-only",
        action="store_true",
        help="parts, greedy, beam 3 and peak memory only (no load times, second task, batches)",
    )
    parser.add_argument(
        "--prepare-only",
        action="store_true",
        help="build the model and convert it to the backends' formats (time and peak RSS recorded), then stop",
    )
    parser.add_argument("--output", help="JSON path (default benchmarks/results/<quick|full>-<model>.json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-source", help=argparse.SUPPRESS)
    parser.add_argument("--worker-ov-dir", help=argparse.SUPPRESS)
    parser.add_argument("--worker-args", help=argparse.SUPPRESS)
    parser.add_argument("--worker-loads", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument("--worker-deployed", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-convert", help=argparse.SUPPRESS)
    parser.add_argument("--worker-rates", type=int, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    # The script's own process and its workers (not a learner's kernel that imports this module): local models only,
    # no chatter. Set here rather than at import, so importing the module changes no environment.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if options.worker_convert:
        result = measure_conversion(options.worker_source, options.worker_convert)
        Path(options.worker_out).write_text(json.dumps(result))
        return 0
    if options.worker_rates:
        result = roofline_module().microbenchmarks(options.worker_rates)
        Path(options.worker_out).write_text(json.dumps(result))
        return 0
    if options.worker:
        ov_dir = options.worker_ov_dir or None
        if options.worker_loads:
            result = time_loads(options.worker, options.worker_source, ov_dir, options.worker_loads)
        elif options.worker_deployed:
            args = json.loads(options.worker_args)
            result = measure_deployed_memory(options.worker, options.worker_source, ov_dir, args)
        else:
            result = measure_backend(options.worker, options.worker_source, ov_dir, json.loads(options.worker_args))
        Path(options.worker_out).write_text(json.dumps(result))
        return 0
    model = options.model or ("tiny" if options.quick else "base-random")
    if options.prepare_only:
        formats = sorted(
            {OV_BACKENDS[b][0] for b in options.backends or BACKENDS if b in OV_BACKENDS}, key=FORMAT_ORDER.index
        )
        record = RESULTS_DIR / f"conversion-{Path(str(model)).name}.json"
        prepare(model, formats, verbose=True, record=record)
        print(format_conversion({"conversion": conversion_record(record)}))
        return 0
    if options.engines:
        run_engine_throughput(model, quick=options.quick, images=options.images, new_tokens=options.new_tokens,
                              output=options.output)  # fmt: skip
        return 0
    run_benchmark(
        model, quick=options.quick, repeats=options.repeats, new_tokens=options.new_tokens, backends=options.backends,
        batch_sizes=options.batch_sizes, in_process=options.in_process, output=options.output,
        threads=options.threads, roofline=not options.no_roofline, parts_only=options.parts_only,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
