"""The "copy this folder" promise: ``helpers/runtime/`` plus ``helpers/ir.py`` — nothing else of ours — answer a task.

Both are copied into an empty folder, as the package ``helpers`` there (an empty ``__init__.py`` marks it). A fresh
interpreter (``python -I``: no PYTHONPATH, no user site, no current folder; the editable install's finder removed)
whose ``sys.path`` is that folder plus the standard library and site-packages loads a tiny model converted here and
answers ``<OD>``. "Answers" means what a project that copied the folder does without our task layer: the
processor saved in the converted folder builds the inputs, ``OVFlorence2Model.generate`` makes the tokens, and
transformers' own ``processor.post_process_generation`` parses them (the ``<loc_N>`` codec lives in
:mod:`helpers.tasks`, which the copy does not have). The answer must equal :func:`helpers.tasks.run.run_task`'s here,
on the same model and image, for both generation strategies.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import helpers
from helpers.convert.conversion import convert_florence2
from helpers.runtime.ov_model import EXACT_CONFIG, OVFlorence2Model
from helpers.tasks.run import run_task

HELPERS = Path(helpers.__file__).resolve().parent
TASK = "<OD>"
MAX_NEW_TOKENS = 20

#: Runs in the fresh interpreter: argv = the copy's folder, model folder, image, output JSON.
SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    copy_root, model_dir, image_path, out = sys.argv[1:5]
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__ + repr(f)]
    sys.path.insert(0, copy_root)

    from PIL import Image
    from transformers import AutoProcessor
    from helpers.runtime.ov_model import EXACT_CONFIG, OVFlorence2Model

    image = Image.open(image_path).convert("RGB")
    processor = AutoProcessor.from_pretrained(model_dir)
    model = OVFlorence2Model(model_dir, "CPU", EXACT_CONFIG, cache_dir=None)
    inputs = processor(text="<OD>", images=image, return_tensors="np")
    answers = {}
    for generation in ("numpy", "transformers"):
        ids = model.generate(**inputs, max_new_tokens=int(sys.argv[5]), num_beams=1, generation=generation)
        text = processor.batch_decode(ids, skip_special_tokens=False)[0]
        answers[generation] = processor.post_process_generation(text, task="<OD>", image_size=image.size)["<OD>"]
    loaded = {name: getattr(module, "__file__", None) or str(list(getattr(module, "__path__", [])))
              for name, module in sys.modules.items() if name == "helpers" or name.startswith("helpers.")}
    Path(out).write_text(json.dumps({"answers": answers, "loaded": loaded}))
    """
)


@pytest.fixture(scope="module")
def converted(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_florence2(tiny_model_dir, tmp_path_factory.mktemp("ov") / "tiny-fp32", "fp32", verbose=False)


def copy_runtime(target: Path) -> Path:
    """``helpers/runtime/`` and ``helpers/ir.py`` into ``target/helpers`` (with an empty package marker)."""
    package = target / "helpers"
    shutil.copytree(HELPERS / "runtime", package / "runtime", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(HELPERS / "ir.py", package / "ir.py")
    (package / "__init__.py").write_text("")
    return target


def test_copied_runtime_answers_a_task(converted: Path, tmp_path: Path) -> None:
    image_path = tmp_path / "image.png"
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (96, 128, 3), dtype=np.uint8))
    image.save(image_path)
    copy_root = copy_runtime(tmp_path / "project")
    out = tmp_path / "answer.json"
    subprocess.run(
        [sys.executable, "-I", "-c", SCRIPT, str(copy_root), str(converted), str(image_path), str(out),
         str(MAX_NEW_TOKENS)],
        check=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    result = json.loads(out.read_text())

    outside = {name: where for name, where in result["loaded"].items() if str(copy_root) not in where}
    assert not outside, f"the copy imported modules of ours from elsewhere: {outside}"
    assert set(result["loaded"]) >= {"helpers.ir", "helpers.runtime.ov_model"}

    from transformers import AutoProcessor

    model = OVFlorence2Model(converted, "CPU", EXACT_CONFIG, cache_dir=None)
    expected = run_task(model, AutoProcessor.from_pretrained(converted), image, TASK,
                        max_new_tokens=MAX_NEW_TOKENS, num_beams=1)[TASK]  # fmt: skip
    assert expected["bboxes"], "the tiny model answered no box: the comparison would be blind"
    for generation, answer in result["answers"].items():
        assert answer["labels"] == expected["labels"], generation
        np.testing.assert_allclose(answer["bboxes"], expected["bboxes"], err_msg=generation)


def test_importing_the_runtime_imports_no_torch() -> None:
    """torch (and transformers, which would import it) load only when a model or the transformers strategy needs them."""
    code = (
        "import sys, helpers.runtime.ov_model, helpers.runtime.generation, helpers.runtime.numpy_generation; "
        "print(sorted(m for m in ('torch', 'transformers', 'nncf') if m in sys.modules))"
    )
    env_path = str(HELPERS.parent)
    found = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {env_path!r}); {code}"],
        check=True, capture_output=True, text=True, timeout=120,
    ).stdout.strip()  # fmt: skip
    assert found == "[]", f"importing helpers.runtime imported {found}"
