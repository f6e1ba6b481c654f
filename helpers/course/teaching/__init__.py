"""The teaching model: a small Florence-2 trained here, on the CPU, on generated scenes with exact ground truth.

* :mod:`helpers.course.teaching.scenes` — the scene generator and every task's target in Florence-2's own format;
* :mod:`helpers.course.teaching.train` — ``python -m helpers.course.teaching.train``: fine-tune a small Florence-2 on them;
* :mod:`helpers.course.teaching.quality` — ``python -m helpers.course.teaching.quality``: a score for every task and cascade
  (box recall and precision at IoU 0.5, mask IoU, captions naming every shape, exact region answers, OCR exact
  words) for PyTorch, OpenVINO fp16 and OpenVINO int8 side by side.

The trained weights ship in ``helpers/data/teaching-model/`` (:data:`TEACHING_MODEL_DIR`); offline, the notebooks
use them instead of the random-weight tiny model. Taught in ``notebooks/12_fine_tune.ipynb``.
"""

from __future__ import annotations

from pathlib import Path

#: Where the trained teaching model ships (transformers' native ``save_pretrained`` layout).
TEACHING_MODEL_DIR: Path = Path(__file__).resolve().parents[2] / "data" / "teaching-model"


def teaching_model_available(folder: Path = TEACHING_MODEL_DIR) -> bool:
    """True when the shipped teaching model is complete (config and weights present)."""
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
