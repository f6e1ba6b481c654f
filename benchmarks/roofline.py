"""How far from this CPU's limit each part of Florence-2 runs: work counted from the IR graph, rates measured here.

    python benchmarks/roofline.py --model-dir models/<slug>/fp16 [--threads 2]   # graph work + microbenchmarks
    python benchmarks/roofline.py --model-dir models/<slug>/w8a8 --profile --no-microbenchmarks  # time per kernel

Two halves, used by ``benchmarks/benchmark.py`` (the ``roofline`` section of its report) and shown in
``notebooks/11_speed.ipynb``:

* **Work from the graph** (:func:`graph_work`): the vision encoder and the text encoder are reshaped to one request's
  static shapes and every ``MatMul``/``Convolution``/``GroupConvolution`` is counted from its shapes
  (2 FLOP per multiply-add); for the decoder, the bytes of weights one step reads (:func:`decoder_step_weights`:
  the weights of every matrix product the step's outputs depend on, not those of the cross-attention projections,
  which run once per request in the state initialiser) and the FLOP of its weight products.
* **This CPU's reachable rates** (:func:`microbenchmarks`), measured in the same run: an OpenVINO ``MatMul`` at f32,
  bf16 and INT8 (``FakeQuantize`` on both inputs, which the CPU plugin runs as an INT8 product), a one-row
  ``MatMul`` streaming INT8 weights as a decoder step does, and a memory copy (numpy, one thread) both of a buffer
  the size of a decoder's weights and of one larger than the last-level cache.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

#: Operations whose multiply-adds are counted.
COUNTED = ("MatMul", "Convolution", "GroupConvolution")
#: Square size of the MatMul microbenchmark (2·n³ FLOP each call: 17 GFLOP at 2048).
MATMUL_SIZE = 2048


# ----------------------------------------------------------------------------------------------------------------
# Work from the graph


def _static(shape) -> list[int]:
    if not shape.is_static:
        raise ValueError(f"shape {shape} is not static; reshape the model to one request's shapes first")
    return [int(d) for d in shape.to_shape()]


def op_flops(op) -> float:
    """FLOP (2 per multiply-add) of one ``MatMul``, ``Convolution`` or ``GroupConvolution`` with static shapes."""
    kind = op.get_type_name()
    output = _static(op.get_output_partial_shape(0))
    if kind == "MatMul":
        a = _static(op.get_input_partial_shape(0))
        reduction = a[-2] if op.get_attributes().get("transpose_a") else a[-1]
        if len(a) == 1:
            reduction = a[0]
        return 2.0 * float(np.prod(output)) * reduction
    if kind == "Convolution":  # weights [out, in, kh, kw]
        weights = _static(op.get_input_partial_shape(1))
        return 2.0 * float(np.prod(output)) * float(np.prod(weights[1:]))
    if kind == "GroupConvolution":  # weights [groups, out/groups, in/groups, kh, kw]
        weights = _static(op.get_input_partial_shape(1))
        return 2.0 * float(np.prod(output)) * float(np.prod(weights[2:]))
    return 0.0


def graph_gflop(ov_model, shapes: dict[str, list[int]]) -> dict[str, float]:
    """GFLOP of one call of ``ov_model`` at ``shapes`` (input name → static shape), per counted operation type."""
    model = ov_model.clone()
    model.reshape(shapes)
    totals = dict.fromkeys(COUNTED, 0.0)
    for op in model.get_ordered_ops():
        if op.get_type_name() in COUNTED:
            totals[op.get_type_name()] += op_flops(op) / 1e9
    totals["total"] = sum(totals[k] for k in COUNTED)
    return totals


def _constant_bytes(op) -> int:
    return int(op.get_byte_size()) if hasattr(op, "get_byte_size") else int(op.get_output_tensor(0).size)


def _ancestors(starts: Iterable, stop: Callable[[Any], bool]) -> list:
    """Every node the ``starts`` depend on, without walking into the inputs of nodes where ``stop`` is true."""
    seen: dict[int, Any] = {}
    stack = list(starts)
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen[id(node)] = node
        if stop(node):
            continue
        stack.extend(value.get_node() for value in node.input_values())
    return list(seen.values())


def _is_weight(value) -> bool:
    """Whether an input is computed from constants only (a weight, maybe decompressed), not from activations."""
    return all(
        n.get_type_name() not in ("Parameter", "ReadValue") for n in _ancestors([value.get_node()], lambda n: False)
    )


def decoder_step_weights(ov_model) -> dict[str, float]:
    """The weights of the matrix products one decoder step runs: their bytes as stored (with INT8 scales and zero
    points), their elements, and the FLOP of one token through them (2 per weight element).

    A ``ReadValue`` with an initialiser is where the walk stops: the cross-attention K/V projections behind it run
    once per request (on a state reset), not per step. The token embedding is tied to the output projection, so it
    counts once, in full (the output projection reads all of it at every step). Biases and norms (vectors) and the
    position-embedding rows are left out: together well under 1 % of the bytes on Florence-2-base."""
    sinks = [*ov_model.get_results(), *ov_model.get_sinks()]
    nodes = _ancestors(sinks, lambda node: node.get_type_name() == "ReadValue")
    constants: dict[int, Any] = {}
    elements = 0.0
    for node in nodes:
        if node.get_type_name() == "MatMul" and _is_weight(node.input_value(1)):
            shape = node.get_input_partial_shape(1)
            if shape.is_static:
                elements += float(np.prod(_static(shape)))
            for ancestor in _ancestors([node.input_value(1).get_node()], lambda n: False):
                if ancestor.get_type_name() == "Constant":
                    constants[id(ancestor)] = ancestor
    weight_bytes = sum(_constant_bytes(c) for c in constants.values())
    return {
        "weight_bytes": float(weight_bytes),
        "weight_mb": weight_bytes / 2**20,
        "weight_elements": elements,
        "gflop": 2.0 * elements / 1e9,
    }


def graph_work(model_dir: str | Path, *, image_size: tuple[int, int], encoder_tokens: int) -> dict[str, dict]:
    """Work of each part of a converted folder for one image and one prompt of ``encoder_tokens`` tokens."""
    import openvino as ov

    core = ov.Core()
    folder = Path(model_dir)
    height, width = image_size
    vision = core.read_model(folder / "vision_encoder.xml")
    encoder = core.read_model(folder / "encoder.xml")
    width_text = encoder.input("inputs_embeds").get_partial_shape()[2].get_length()
    decoder = core.read_model(folder / "decoder.xml")
    return {
        "vision": graph_gflop(vision, {"pixel_values": [1, 3, height, width]}),
        "encoder": graph_gflop(
            encoder, {"inputs_embeds": [1, encoder_tokens, width_text], "attention_mask": [1, encoder_tokens]}
        ),  # fmt: skip
        "decoder_step": decoder_step_weights(decoder),
        "weight_mb": {
            part: (folder / f"{part}.bin").stat().st_size / 2**20 for part in ("vision_encoder", "encoder", "decoder")
        },
    }


# ----------------------------------------------------------------------------------------------------------------
# This CPU's reachable rates


def _median_seconds(run: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _fake_quantize(value, low: float, high: float, levels: int = 256):
    import openvino as ov
    from openvino import opset13 as ops

    lo, hi = ops.constant(np.float32(low)), ops.constant(np.float32(high))
    del ov
    return ops.fake_quantize(value, lo, hi, lo, hi, levels)


def _compiled_matmul(precision: str, m: int, k: int, n: int, threads: int):
    """A compiled ``[m, k] @ [k, n]`` at ``precision`` (``f32``, ``bf16``, ``int8``) and its input."""
    import openvino as ov
    from openvino import opset13 as ops

    rng = np.random.default_rng(0)
    data = ops.parameter([m, k], ov.Type.f32, name="x")
    weight = ops.constant(rng.uniform(-1, 1, (k, n)).astype(np.float32))
    left, right = data, weight
    if precision == "int8":  # activations u8-like range, weights i8 symmetric: what nncf writes for the vision encoder
        left, right = _fake_quantize(data, 0.0, 4.0), _fake_quantize(weight, -1.0, 1.0, 255)
    model = ov.Model([ops.matmul(left, right, False, False)], [data])
    hint = {"f32": "f32", "bf16": "bf16", "int8": "bf16"}[precision]
    compiled = ov.Core().compile_model(
        model, "CPU", {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads}
    )
    return compiled, rng.uniform(0, 4, (m, k)).astype(np.float32)


def _runtime_precisions(compiled) -> set[str]:
    """The precisions the CPU plugin chose for the compiled graph's matrix products (proof the INT8 run is INT8)."""
    found = set()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) in ("MatMul", "FullyConnected"):
            found.add(f"{info['runtimePrecision'].astype(str)} ({info['primitiveType'].astype(str)})")
    return found


def matmul_rate(precision: str, threads: int, size: int = MATMUL_SIZE, repeats: int = 10) -> dict[str, Any]:
    """GFLOP/s of an OpenVINO ``size``³ matrix product at ``precision`` on ``threads`` threads."""
    compiled, x = _compiled_matmul(precision, size, size, size, threads)
    request = compiled.create_infer_request()
    seconds = _median_seconds(lambda: request.infer([x]), repeats)
    return {"gflops": 2.0 * size**3 / seconds / 1e9, "seconds": seconds, "size": size,
            "runtime_precision": sorted(_runtime_precisions(compiled))}  # fmt: skip


def int8_weight_stream_rate(threads: int, weight_mb: float = 96.0, repeats: int = 20) -> dict[str, Any]:
    """GB/s of weights a one-row product reads when its weights are INT8 with per-channel scales (a decoder step's
    access pattern: each weight used once per token), on a matrix of about ``weight_mb`` MB."""
    import openvino as ov
    from openvino import opset13 as ops

    k = 4096
    n = int(weight_mb * 2**20 / k) // 64 * 64
    rng = np.random.default_rng(0)
    data = ops.parameter([1, k], ov.Type.f32, name="x")
    quantized = ops.constant(rng.integers(0, 255, (n, k), dtype=np.uint8))
    weight = ops.multiply(
        ops.subtract(ops.convert(quantized, "f32"), ops.constant(np.full((n, 1), 128, np.float32))),
        ops.constant(rng.uniform(0.001, 0.01, (n, 1)).astype(np.float32)),
    )
    model = ov.Model([ops.matmul(data, weight, False, True)], [data])
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads})
    request = compiled.create_infer_request()
    x = rng.standard_normal((1, k)).astype(np.float32)
    seconds = _median_seconds(lambda: request.infer([x]), repeats)
    return {"gb_per_s": n * k / seconds / 1e9, "weight_mb": n * k / 2**20, "seconds": seconds}


def copy_bandwidth(megabytes: float, repeats: int = 5) -> dict[str, float]:
    """GB/s moved by ``numpy.copyto`` of a ``megabytes`` buffer (one thread; read + write both counted)."""
    source = np.ones(int(megabytes * 2**20) // 8, dtype=np.float64)
    target = np.empty_like(source)
    seconds = _median_seconds(lambda: np.copyto(target, source), repeats, warmup=1)
    return {"gb_per_s": 2 * source.nbytes / seconds / 1e9, "megabytes": megabytes, "seconds": seconds}


def last_level_cache_mb() -> float | None:
    """The largest cache this Linux reports (``/sys/devices/system/cpu/cpu0/cache``), in MB."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        scale = {"K": 1 / 1024, "M": 1.0, "G": 1024.0}.get(text[-1], 1 / 2**20)
        sizes.append(float(text.rstrip("KMG")) * scale)
    return max(sizes) if sizes else None


def microbenchmarks(threads: int, *, quick: bool = False) -> dict[str, Any]:
    """This CPU's reachable rates on ``threads`` threads: matmul GFLOP/s (f32, bf16, int8), INT8 weight streaming
    GB/s, copy GB/s within and beyond the last-level cache. ``quick``: small sizes (seconds; tests)."""
    size = 512 if quick else MATMUL_SIZE
    cache = last_level_cache_mb()
    beyond = 64.0 if quick else max(1024.0, 4 * (cache or 256.0))
    return {
        "threads": threads,
        "matmul": {
            precision: matmul_rate(precision, threads, size, 3 if quick else 10)
            for precision in ("f32", "bf16", "int8")
        },
        "int8_weight_stream": int8_weight_stream_rate(threads, 8.0 if quick else 96.0, 5 if quick else 20),
        "copy_in_cache": copy_bandwidth(16.0 if quick else 96.0),
        "copy_beyond_cache": copy_bandwidth(beyond, 2 if quick else 5),
        "last_level_cache_mb": cache,
    }


# ----------------------------------------------------------------------------------------------------------------
# The table


def roofline_rows(work: dict, times: dict[str, float], rates: dict, activation_precision: str,
                  step_bytes: float | None = None) -> list[dict]:  # fmt: skip
    """One row per part: work, measured time, achieved rate and the reachable rate it is compared with.
    ``times``: ``vision_s``, ``encoder_s``, ``decode_step_ms``; ``activation_precision``: the vision encoder's
    matmul precision (``f32``, ``bf16`` or ``int8``; the text encoder runs in bf16 unless ``f32``); ``step_bytes``
    overrides the bytes a decoder step reads (PyTorch reads the same weights in f32)."""
    matmul = rates["matmul"]
    text_precision = "f32" if activation_precision == "f32" else "bf16"
    step = dict(work["decoder_step"])
    if step_bytes is not None:
        step.update(weight_bytes=step_bytes, weight_mb=step_bytes / 2**20)
    step_s = times["decode_step_ms"] / 1000
    rows = [
        {"part": "vision encoder", "work": f"{work['vision']['total']:.3g} GFLOP", "time_s": times["vision_s"],
         "achieved": work["vision"]["total"] / times["vision_s"], "unit": "GFLOP/s",
         "reachable": matmul[activation_precision]["gflops"], "reachable_what": f"{activation_precision} matmul"},
        {"part": "text encoder", "work": f"{work['encoder']['total']:.3g} GFLOP", "time_s": times["encoder_s"],
         "achieved": work["encoder"]["total"] / times["encoder_s"], "unit": "GFLOP/s",
         "reachable": matmul[text_precision]["gflops"], "reachable_what": f"{text_precision} matmul"},
        {"part": "decoder step", "work": f"{step['weight_mb']:.3g} MB weights, {step['gflop']:.3g} GFLOP",
         "time_s": step_s, "achieved": step["weight_bytes"] / step_s / 1e9, "unit": "GB/s",
         "reachable": rates["int8_weight_stream"]["gb_per_s"], "reachable_what": "1-row INT8 weight stream"},
    ]  # fmt: skip
    for row in rows:
        row["of_reachable"] = row["achieved"] / row["reachable"]
    return rows


def format_roofline(rows_by_backend: dict[str, list[dict]], rates: dict) -> str:
    """Markdown: one line per backend and part, then the microbenchmarks."""
    lines = ["| backend | part | work (from the graph) | time | achieved | reachable here | share |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for backend, rows in rows_by_backend.items():
        for row in rows:
            time_text = f"{row['time_s'] * 1000:.1f} ms" if row["time_s"] < 0.1 else f"{row['time_s']:.3f} s"
            lines.append(f"| {backend} | {row['part']} | {row['work']} | {time_text} | {row['achieved']:.3g} {row['unit']} "
                         f"| {row['reachable']:.3g} {row['unit']} ({row['reachable_what']}) | {row['of_reachable']:.0%} |")  # fmt: skip
    m = rates["matmul"]
    lines += ["", f"Microbenchmarks, {rates['threads']} threads: OpenVINO MatMul {m['f32']['size']}³ — "
              f"f32 {m['f32']['gflops']:.0f}, bf16 {m['bf16']['gflops']:.0f}, int8 {m['int8']['gflops']:.0f} GFLOP/s "
              f"(runtime precisions {', '.join(m['int8']['runtime_precision']) or '?'} for int8); one-row INT8 weight "
              f"stream ({rates['int8_weight_stream']['weight_mb']:.0f} MB) {rates['int8_weight_stream']['gb_per_s']:.1f} GB/s; "
              f"memory copy (1 thread) {rates['copy_in_cache']['gb_per_s']:.1f} GB/s at "
              f"{rates['copy_in_cache']['megabytes']:.0f} MB, {rates['copy_beyond_cache']['gb_per_s']:.1f} GB/s at "
              f"{rates['copy_beyond_cache']['megabytes']:.0f} MB (last-level cache {rates['last_level_cache_mb']} MB)."]  # fmt: skip
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Where the vision encoder's time goes


def vision_profile(model_dir: str | Path, threads: int, *, image_size: tuple[int, int] = (768, 768),
                   repeats: int = 5, top: int = 12) -> dict[str, Any]:  # fmt: skip
    """The vision encoder of a converted folder run with OpenVINO's per-node counters (``PERF_COUNT``): the time of
    each (operation, kernel) pair, summed over the graph, median over ``repeats`` runs — e.g. whether a w8a8 graph's
    matrix products really run INT8 kernels, and what the rest (softmax, layer norm, reorders) costs beside them."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(Path(model_dir) / "vision_encoder.xml")
    height, width = image_size
    model.reshape({"pixel_values": [1, 3, height, width]})
    compiled = core.compile_model(model, "CPU", {"PERF_COUNT": True, "INFERENCE_NUM_THREADS": threads})
    request = compiled.create_infer_request()
    pixels = np.random.default_rng(0).standard_normal((1, 3, height, width)).astype(np.float32)
    runs: list[dict[tuple[str, str], float]] = []
    for run in range(repeats + 1):
        started = time.perf_counter()
        request.infer({0: pixels})
        wall = time.perf_counter() - started
        if run == 0:
            continue  # the first run allocates and primes caches
        summed: dict[tuple[str, str], float] = {("(wall)", ""): wall * 1e3}
        for node in request.profiling_info:
            key = (node.node_type, node.exec_type)
            summed[key] = summed.get(key, 0.0) + node.real_time.total_seconds() * 1e3
        runs.append(summed)
    medians = {key: statistics.median(r.get(key, 0.0) for r in runs) for key in runs[0]}
    wall_ms = medians.pop(("(wall)", ""))
    counted = sum(medians.values())
    ranked = sorted(medians.items(), key=lambda item: -item[1])
    return {
        "wall_ms": wall_ms,
        "counted_ms": counted,
        "top": [
            {"operation": op, "kernel": kernel, "ms": ms, "share": ms / counted} for (op, kernel), ms in ranked[:top]
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, help="a converted folder: print its graph work")
    parser.add_argument("--image-size", type=int, nargs=2, default=(768, 768))
    parser.add_argument("--encoder-tokens", type=int, default=590)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-microbenchmarks", action="store_true")
    parser.add_argument("--profile", action="store_true", help="with --model-dir: the vision encoder's time per kernel")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {}
    if args.profile:
        if not args.model_dir:
            parser.error("--profile needs --model-dir (a converted folder)")
        report["vision_profile"] = vision_profile(args.model_dir, args.threads, image_size=tuple(args.image_size))
    if args.model_dir:
        report["work"] = graph_work(
            args.model_dir, image_size=tuple(args.image_size), encoder_tokens=args.encoder_tokens
        )
    if not args.no_microbenchmarks:
        report["rates"] = microbenchmarks(args.threads, quick=args.quick)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
