"""A deployment without torch gives the same answers as the full environment.

Builds a virtual environment from ``requirements-inference.txt`` alone (cached under ``build/torch-free-venv/``,
keyed by a hash of that file and the Python version; the first build took 20 s here with pip's wheel cache warm),
checks that torch is not importable there, then runs all 15 tasks (beam search from the model's config, and
greedy), one batch and one cascade in it on a tiny model converted here, and compares every answer with the one
this environment (torch, transformers' generate and post-processing) gives for the same model and images.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import AutoProcessor

from helpers.convert.conversion import convert_florence2
from helpers.runtime.ov_model import EXACT_CONFIG, OVFlorence2Model
from helpers.tasks.run import TASKS, run_cascaded_task, run_task, run_tasks_batch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent

#: A text input for each kind of task (none, free text, region).
EXAMPLE_TEXT = {
    "none": None, "text": "a red car next to a green tree", "region": "<loc_100><loc_150><loc_600><loc_700>",
}  # fmt: skip
MAX_NEW_TOKENS = 24
BATCH_TASK = "<CAPTION_TO_PHRASE_GROUNDING>"
CASCADE = "<CAPTION> + <CAPTION_TO_PHRASE_GROUNDING>"

#: Runs inside the torch-free venv: argv = model folder, image folder, output JSON.
SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor
    from helpers.runtime.generation import choose_strategy
    from helpers.runtime.ov_model import EXACT_CONFIG, OVFlorence2Model
    from helpers.tasks.run import TASKS, run_cascaded_task, run_task, run_tasks_batch

    model_dir, image_dir, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    spec = json.loads((image_dir / "spec.json").read_text())
    model = OVFlorence2Model(model_dir, "CPU", EXACT_CONFIG, cache_dir=None)
    processor = AutoProcessor.from_pretrained(model_dir)
    images = {name: Image.open(image_dir / name) for name in spec["images"]}
    answers = {}
    for task, text, image in spec["tasks"]:
        for beams in (None, 1):
            extra = {} if beams is None else {"num_beams": beams}
            answers[f"{task} beams={beams}"] = run_task(
                model, processor, images[image], task, text, max_new_tokens=spec["max_new_tokens"], **extra)
    answers["batch"] = run_tasks_batch(model, processor, [images[n] for n in spec["batch_images"]], spec["batch_task"],
                                       spec["batch_texts"], max_new_tokens=spec["max_new_tokens"])
    answers["cascade"] = run_cascaded_task(model, processor, images[spec["images"][1]], spec["cascade"],
                                           max_new_tokens=spec["max_new_tokens"])
    pixels = processor(text="<OD>", images=images[spec["images"][0]], return_tensors="np")["pixel_values"]
    np.save(out.with_suffix(".npy"), pixels)
    result = {
        "answers": answers,
        "torch_imported": "torch" in sys.modules,
        "generator": choose_strategy(model.generation, model, {}).name,
        "image_processor": type(processor.image_processor).__name__,
    }
    out.write_text(json.dumps(result))
    """
)


@pytest.fixture(scope="module")
def torch_free_python() -> str:
    """The deployment environment's interpreter, as the README's users get it: the script builds it (once) and
    prints its path last."""
    built = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "torch_free_venv.py")], check=True, capture_output=True, text=True
    )
    return built.stdout.strip().splitlines()[-1]


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))


def normalised(value):
    """JSON round trip: tuples become lists, exactly as the venv's answers arrive."""
    return json.loads(json.dumps(value))


def test_torch_is_not_importable_there(torch_free_python: str):
    result = subprocess.run([torch_free_python, "-c", "import torch"], capture_output=True, text=True)
    assert result.returncode != 0 and "No module named 'torch'" in result.stderr


def test_all_tasks_give_the_same_answers_without_torch(torch_free_python: str, tiny_model_dir: Path, tmp_path: Path):
    model_dir = convert_florence2(tiny_model_dir, tmp_path / "ov", "fp32", verbose=False)
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    sizes = [(160, 120), (64, 64), (90, 300)]
    names = []
    for seed, size in enumerate(sizes):
        names.append(f"noise{seed}.png")
        noise_image(*size, seed=seed).save(image_dir / names[-1])
    tasks = [(task, EXAMPLE_TEXT[s.text_kind], names[i % len(names)]) for i, (task, s) in enumerate(TASKS.items())]
    spec = {
        "images": names, "tasks": tasks, "max_new_tokens": MAX_NEW_TOKENS, "batch_task": BATCH_TASK,
        "batch_images": names, "batch_texts": ["a car", "a red car next to a green tree", "trees"], "cascade": CASCADE,
    }  # fmt: skip
    (image_dir / "spec.json").write_text(json.dumps(spec))

    out = tmp_path / "answers.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    run = subprocess.run(
        [torch_free_python, "-c", SCRIPT, str(model_dir), str(image_dir), str(out)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["torch_imported"] is False and result["generator"] == "numpy"

    model = OVFlorence2Model(model_dir, "CPU", EXACT_CONFIG, cache_dir=None)  # transformers' generate here
    processor = AutoProcessor.from_pretrained(model_dir)
    images = {name: Image.open(image_dir / name) for name in names}
    expected = {}
    for task, text, image in tasks:
        for beams in (None, 1):
            extra = {} if beams is None else {"num_beams": beams}
            expected[f"{task} beams={beams}"] = run_task(
                model, processor, images[image], task, text, max_new_tokens=MAX_NEW_TOKENS, **extra
            )
    expected["batch"] = run_tasks_batch(
        model, processor, [images[n] for n in names], BATCH_TASK, spec["batch_texts"], max_new_tokens=MAX_NEW_TOKENS
    )
    expected["cascade"] = run_cascaded_task(model, processor, images[names[1]], CASCADE, max_new_tokens=MAX_NEW_TOKENS)
    assert len(result["answers"]) == 2 * len(TASKS) + 2
    for key, answer in normalised(expected).items():
        assert result["answers"][key] == answer, f"{key}: without torch {result['answers'][key]!r}, with {answer!r}"
    located = [a for k, a in expected.items() if isinstance(a, dict) and any(isinstance(v, dict) for v in a.values())]
    assert any(v for answer in located for part in answer.values() for v in part.values()), "no boxes were compared"

    pixels = processor(text="<OD>", images=images[names[0]], return_tensors="np")["pixel_values"]
    assert np.array_equal(np.load(out.with_suffix(".npy")), pixels), "the torch-free processor prepares other pixels"


def test_batch_command_line_runs_without_torch(torch_free_python: str, tiny_model_dir: Path, tmp_path: Path):
    """`python -m helpers FOLDER` on a converted folder works in the torch-free venv (answers without scores, and
    says so) and gives the answers the full environment's batch mode gives."""
    from helpers.cli.batch import process_images
    from helpers.course.checkpoints import load_model

    model_dir = convert_florence2(tiny_model_dir, tmp_path / "ov", "fp32", verbose=False)
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    for seed, size in enumerate([(160, 120), (64, 64), (90, 300)]):
        noise_image(*size, seed=seed).save(image_dir / f"noise{seed}.png")
    tasks = ["<OD>", "<CAPTION>"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    command = [torch_free_python, "-m", "helpers", str(image_dir), "--task", tasks[0], "--task",
               tasks[1], "--model", str(model_dir), "--weight-format", "fp32", "--device", "CPU",
               "--max-new-tokens", "12", "--output-dir", str(tmp_path / "out"), "--quiet"]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "scores need torch" in run.stderr

    model, processor = load_model(str(model_dir), "fp32", "CPU")
    process_images(model, processor, image_dir, tasks, tmp_path / "here", scores=False, progress=False,
                   max_new_tokens=12)  # fmt: skip

    def answers(folder: Path) -> dict:
        lines = (folder / "results.jsonl").read_text(encoding="utf-8").splitlines()
        return {record["file"]: record["results"] for record in map(json.loads, lines) if record.get("results")}

    without_torch, with_torch = answers(tmp_path / "out"), answers(tmp_path / "here")
    assert sorted(without_torch) == sorted(with_torch) == [f"noise{i}.png" for i in range(3)]
    assert without_torch == with_torch
