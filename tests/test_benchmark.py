"""The benchmark's quick mode runs on the tiny model and reports every measured field with sane values.

No timing thresholds here: speed is the benchmark's business, these tests check that it measures what it says.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "benchmark.py"

TIMES = [
    "vision_s", "encoder_s", "generate_greedy_s", "generate_beam3_s", "load_first_s", "load_second_s",
    "first_task_s", "second_task_s", "first_task_ttft_s", "second_task_ttft_s",
]  # fmt: skip
STEP_TIMES = ["decode_step_greedy_ms", "decode_step_beam3_ms", "first_step_greedy_ms", "first_step_beam3_ms"]
RATIOS = [
    "generate_greedy", "generate_beam3", "vision", "encoder", "decode_step", "peak_rss", "second_task_vs_first",
    "second_task_ttft_vs_first", "load_first_vs_second", "token_agreement_greedy", "token_agreement_beam3",
]  # fmt: skip


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("florence2_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def benchmark():
    return _load_benchmark()


@pytest.fixture(scope="module")
def report(benchmark, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    return benchmark.run_benchmark(
        str(tiny_model_dir), quick=True, backends=["pytorch", "ov-fp32", "ov-int8"], output=out, verbose=False
    )


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_json_is_written_and_matches_the_report(report):
    stored = json.loads(Path(report["json_path"]).read_text())
    assert stored["results"].keys() == report["results"].keys() == {"pytorch", "ov-fp32", "ov-int8"}
    assert stored["settings"]["new_tokens"] == report["settings"]["new_tokens"] > 0
    assert Path(report["chart_path"]).stat().st_size > 10_000  # a real PNG, not an empty figure


def test_every_backend_has_every_measured_field(report):
    n = report["settings"]["new_tokens"]
    for backend, result in report["results"].items():
        for field in [*TIMES, *STEP_TIMES, "ms_per_token_greedy", "peak_rss_mb", "peak_rss_one_image_mb", "weights_mb"]:
            assert _finite_positive(result[field]), f"{backend}.{field} = {result.get(field)!r}"
        # (no comparisons between separately timed runs here: on a busy machine any one of them can be slow)
        # generation was forced to exactly n new tokens: decoder start + n
        assert len(result["tokens_greedy"]) == len(result["tokens_beam3"]) == n + 1
        assert result["steps_greedy"] == n
        assert result["peak_rss_mb"] > 50  # python + torch alone are more than that
        assert result["peak_rss_one_image_mb"] <= result["peak_rss_mb"]  # a peak cannot shrink later
        for size in report["settings"]["batch_sizes"]:
            batch = result["batch"][str(size)]
            assert _finite_positive(batch["seconds"]) and batch["images_per_s"] == pytest.approx(
                size / batch["seconds"]
            )


def test_ratios_are_consistent_with_the_raw_numbers(report):
    ratios, results = report["ratios"], report["results"]
    assert ratios["pytorch"]["generate_greedy"] == pytest.approx(1.0)
    assert ratios["pytorch"]["token_agreement_greedy"] == 1.0
    for backend, q in ratios.items():
        for field in RATIOS:
            assert _finite_positive(q[field]) or (field.startswith("token_agreement") and q[field] == 0.0), field
        assert 0.0 <= q["token_agreement_greedy"] <= 1.0
        expected = results["pytorch"]["generate_greedy_s"] / results[backend]["generate_greedy_s"]
        assert q["generate_greedy"] == pytest.approx(expected)
    # at f32 OpenVINO reproduces PyTorch token for token (the parity tests' promise, seen through the benchmark)
    assert ratios["ov-fp32"]["token_agreement_greedy"] == 1.0
    assert ratios["ov-fp32"]["token_agreement_beam3"] == 1.0


def test_table_names_every_backend(report):
    for backend in report["results"]:
        assert backend in report["table"]
    assert "Ratios against PyTorch" in report["table"]


def test_token_agreement(benchmark):
    assert benchmark.token_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 0.75
    assert benchmark.token_agreement([1, 2], [1, 2, 3, 4]) == 0.5
    assert benchmark.token_agreement([], []) == 1.0


@pytest.fixture(scope="module")
def separate_process_report(benchmark, tiny_model_dir, tmp_path_factory):
    """The full benchmark's process layout (a subprocess per measurement), on the tiny model with few tokens."""
    out = tmp_path_factory.mktemp("bench") / "not-made-yet" / "separate.json"  # the benchmark makes the folder
    return benchmark.run_benchmark(
        str(tiny_model_dir), repeats=1, new_tokens=4, backends=["pytorch", "ov-int8"], batch_sizes=[1],
        in_process=False, output=out, verbose=False,
    )  # fmt: skip


@pytest.mark.slow
def test_deployed_memory_is_measured_without_torch_for_openvino(separate_process_report):
    results = separate_process_report["results"]
    assert results["pytorch"]["deployed_torch_imported"] is True
    ov = results["ov-int8"]
    assert ov["deployed_torch_imported"] is False, "OpenVINO's deployed process imported torch"
    assert "torch-free-venv" in ov["deployed_python"]
    for backend, result in results.items():
        assert _finite_positive(result["deployed_peak_rss_mb"]), backend
    expected = ov["deployed_peak_rss_mb"] / results["pytorch"]["deployed_peak_rss_mb"]
    assert separate_process_report["ratios"]["ov-int8"]["peak_rss_deployed"] == pytest.approx(expected)
    assert "(torch)" not in separate_process_report["table"]


def test_a_worker_reports_its_own_peak_memory_not_its_parents(benchmark):
    """Workers are started from this (large) process; their peak must be their own (ru_maxrss is inherited)."""
    ballast = bytearray(300 * 2**20)
    ballast[::4096] = b"x" * len(range(0, len(ballast), 4096))  # touch every page: 300 MB resident
    parent_mb = benchmark.current_rss_mb()
    script = f"import importlib.util as u; s = u.spec_from_file_location('b', {str(BENCHMARK)!r}); m = u.module_from_spec(s); s.loader.exec_module(m); print(m.peak_rss_mb())"
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert float(child.stdout) < parent_mb / 2, f"child peak {child.stdout.strip()} MB, parent {parent_mb:.0f} MB"


def test_importing_the_benchmark_changes_no_environment():
    """Lesson 11 imports the benchmark into a learner's kernel: that must not switch the kernel offline."""
    script = (
        "import importlib.util as u, os; before = dict(os.environ)\n"
        f"s = u.spec_from_file_location('b', {str(BENCHMARK)!r}); m = u.module_from_spec(s); s.loader.exec_module(m)\n"
        "print(sorted(set(os.environ.items()) ^ set(before.items())))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_VERBOSITY")}
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    assert child.stdout.strip() == "[]", f"importing benchmark.py changed the environment: {child.stdout}"


@pytest.mark.slow
def test_engine_throughput_puts_one_process_and_ray_side_by_side(benchmark, tiny_model_dir, tmp_path):
    report = benchmark.run_engine_throughput(str(tiny_model_dir), quick=True, output=tmp_path / "engines.json",
                                             verbose=False)  # fmt: skip
    results = report["results"]
    assert [(r["engine"], r["batch_size"], r["workers"]) for r in results.values()] == list(benchmark.ENGINE_SETUPS)
    images = report["settings"]["images"]
    for name, result in results.items():
        assert result["images"] == images, name  # every engine labelled every image
        for field in ("seconds", "images_per_s", "steady_images_per_s", "images_per_s_per_core"):
            assert _finite_positive(result[field]), f"{name}.{field} = {result.get(field)!r}"
        assert result["images_per_s"] == pytest.approx(images / result["seconds"])
    ray_results = [r for r in results.values() if r["engine"] == "ray"]
    for result in ray_results:  # each worker gets its share of the cores, none more
        assert result["cores"] == max(1, os.cpu_count() // result["workers"]) * result["workers"]
        assert 0 < result["first_chunk_s"] <= result["seconds"] and result["steady_images"] < images
        assert len(result["models_loaded"]) == 1 and Path(result["models_loaded"][0]).is_dir()
    assert json.loads(Path(report["json_path"]).read_text())["results"].keys() == results.keys()
    assert all(name in report["table"] for name in results)


def test_the_report_has_a_roofline_row_per_backend_and_part(report):
    roofline = report["roofline"]
    for backend, r in report["results"].items():
        rows = {row["part"]: row for row in roofline["rows"][backend]}
        assert set(rows) == {"vision encoder", "text encoder", "decoder step"}
        work = next(iter(roofline["work"].values()))
        # achieved = work counted in the graph / the time measured for that part
        assert rows["vision encoder"]["achieved"] == pytest.approx(work["vision"]["total"] / r["vision_s"])
        assert rows["text encoder"]["time_s"] == r["encoder_s"]
        assert rows["decoder step"]["time_s"] == pytest.approx(r["decode_step_greedy_ms"] / 1000)
        assert all(
            _finite_positive(row["reachable"]) and _finite_positive(row["of_reachable"]) for row in rows.values()
        )
    # PyTorch reads the same weights as the FP32 IR, in f32
    fp32_step = roofline["work"]["fp32"]["decoder_step"]
    assert rows_for(roofline, "pytorch")["decoder step"]["work"].startswith(f"{fp32_step['weight_mb']:.3g} MB")
    assert "Roofline" in report["table"]


def rows_for(roofline: dict, backend: str) -> dict:
    return {row["part"]: row for row in roofline["rows"][backend]}


@pytest.fixture(scope="module")
def w8a8_threads_report(benchmark, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "threads.json"
    return benchmark.run_benchmark(
        str(tiny_model_dir), quick=True, new_tokens=4, backends=["pytorch", "ov-w8a8"], batch_sizes=[1],
        threads=[1, os.cpu_count()], roofline=False, output=out, verbose=False,
    )  # fmt: skip


def test_w8a8_backend_and_thread_scaling_are_measured(w8a8_threads_report):
    report = w8a8_threads_report
    assert report["results"]["ov-w8a8"]["description"].startswith("OpenVINO INT8 weights + INT8 vision activations")
    scaling = report["threads"]
    assert set(scaling) == {"1", str(os.cpu_count())}
    for count, results in scaling.items():
        assert set(results) == {"pytorch", "ov-w8a8"}
        for backend, result in results.items():
            for field in ("vision_s", "encoder_s", "generate_greedy_s", "generate_beam3_s", "decode_step_greedy_ms"):
                assert _finite_positive(result[field]), f"{count} threads: {backend}.{field}"
            assert result["threads"] == int(count)
    assert "Scaling from 1 to" in report["table"] or os.cpu_count() == 1
