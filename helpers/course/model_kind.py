"""What a lesson runs: a real checkpoint, the teaching model (trained on shape scenes) or random weights.

* :func:`model_kind` — read from the mark in a model's config (``florence2_collection_kind``);
* :func:`model_kind_notice` — the banner a lesson prints under its model;
* :func:`trained_tasks` / :func:`untrained_notice` — which tasks give meaningful answers on it, and the line that
  says so next to a lesson's answers (computed, never stated from memory).

Taught in ``notebooks/04_captioning.ipynb``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

#: What a lesson runs: a trained checkpoint, the teaching model (trained on shape scenes) or random weights.
ModelKind = Literal["real", "teaching", "random"]
#: Key in a model's ``config.json`` that marks the collection's own models: ``"teaching"`` (written by
#: :func:`helpers.course.teaching.train.save_model`) or ``"random"`` (written by :mod:`helpers.course.tiny`). transformers keeps
#: unknown config keys, so the mark survives ``save_pretrained`` and the conversion to OpenVINO.
MODEL_KIND_KEY = "florence2_collection_kind"
#: Key in a teaching model's ``config.json`` listing the tasks it was trained on (see :func:`teaching_tasks`).
TRAINED_TASKS_KEY = "florence2_trained_tasks"


def model_kind(model: Any) -> ModelKind:
    """``"teaching"``, ``"random"`` or ``"real"`` for a loaded model (``OVFlorence2Model`` or PyTorch), its config,
    or a model folder. Taught in ``notebooks/04_captioning.ipynb``.

    Lessons use it to warn about random answers and to show the teaching model the scenes it knows. The mark in the
    config decides; an unmarked model with a vocabulary under 10,000 tokens is a random tiny model built before the
    mark existed (real checkpoints have about 51,000 tokens).
    """
    if isinstance(model, (str, Path)):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model, trust_remote_code=False)
    else:
        config = getattr(model, "config", model)
    marked = getattr(config, MODEL_KIND_KEY, None)
    if marked in ("teaching", "random"):
        return marked
    vocab_size = getattr(getattr(config, "text_config", None), "vocab_size", None)
    return "random" if vocab_size is not None and vocab_size < 10_000 else "real"


def teaching_tasks(folder: str | Path | None = None) -> tuple[str, ...]:
    """The tasks the teaching model in ``folder`` (default: the shipped one) was trained on, as recorded with it:
    ``florence2_trained_tasks`` in its ``config.json``, else ``tasks`` in its ``training.json`` (of ``folder``, then
    of the shipped model), else the six tasks of the first teaching model (:data:`helpers.course.teaching.scenes.TEACHING_TASKS`, which recorded neither). Lessons
    print their caveats from this list, so they disappear for tasks a retrained model learned.
    Taught in ``notebooks/04_captioning.ipynb``."""
    import json

    from helpers.course.teaching import TEACHING_MODEL_DIR
    from helpers.course.teaching.scenes import TEACHING_TASKS

    folders = [Path(folder)] if folder is not None else []
    for place in [*folders, TEACHING_MODEL_DIR]:  # a converted copy may lack training.json: the shipped one has it
        for name, key in (("config.json", TRAINED_TASKS_KEY), ("training.json", "tasks")):
            try:
                recorded = json.loads((place / name).read_text()).get(key)
            except (OSError, ValueError, AttributeError):
                continue
            if isinstance(recorded, list) and recorded:
                return tuple(str(task) for task in recorded)
    return TEACHING_TASKS


def teaching_shortfalls() -> dict[str, str]:
    """Task → what the shipped teaching model measured on it, for the tasks where it misses its quality aim on
    held-out scenes (``shortfalls`` of ``quality.json``, OpenVINO fp16; measured in ``notebooks/12_fine_tune.ipynb``).
    Lessons print these next to the answers, so a weak answer is never passed off as a right one."""
    import json

    from helpers.course.teaching import TEACHING_MODEL_DIR

    try:
        results = json.loads((TEACHING_MODEL_DIR / "quality.json").read_text())["results"]
        shortfalls = results["fp16"]["shortfalls"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    described = {}
    for task, numbers in shortfalls.items():
        aim = numbers.get("aim")
        measured = ", ".join(f"{k} {v:.2f}" for k, v in numbers.items() if k != "aim" and isinstance(v, (int, float)))
        described[task] = f"{measured} (aim {aim})"
    return described


def trained_tasks(model: Any) -> tuple[str, ...]:
    """The Florence-2 tasks ``model`` (a loaded model, its config or a folder, as for :func:`model_kind`) gives
    meaningful answers to: all 15 for a real checkpoint, none for random weights, the recorded list for the
    teaching model (see :func:`teaching_tasks`; a converted teaching model carries its config's list)."""
    from helpers.tasks.run import TASKS

    kind = model_kind(model)
    if kind == "real":
        return tuple(TASKS)
    if kind == "random":
        return ()
    if isinstance(model, (str, Path)):
        return teaching_tasks(model)  # a folder: its own config.json / training.json
    recorded = getattr(getattr(model, "config", model), TRAINED_TASKS_KEY, None)  # survives the conversion
    return tuple(recorded) if recorded else teaching_tasks()


def untrained_notice(model: Any, tasks: Sequence[str]) -> str:
    """One line on what the answers to ``tasks`` (those a lesson section runs) are worth on ``model``, computed from
    what the model was trained on (:func:`trained_tasks`), so a lesson never states it from memory.
    Taught in ``notebooks/04_captioning.ipynb``."""
    kind = model_kind(model)
    if kind == "real":
        return "✅ A Florence-2 checkpoint, trained on every task: judge the answers against the picture."
    if kind == "random":
        return "⚠️  Random weights: every answer above is noise (only its structure is checked)."
    known = set(trained_tasks(model))
    missing = [task for task in tasks if task not in known]
    trained = [task for task in tasks if task in known]
    weak = {task: measured for task, measured in teaching_shortfalls().items() if task in trained}
    short = "".join(
        f"\n⚠️  It falls short of its aim on {task}: {measured} on held-out scenes, so an empty or wrong "
        "answer there is the model's limit, not your code's."
        for task, measured in weak.items()
    )
    if not missing:
        which = "every task" if len(tasks) > 1 else "the task"
        return (
            f"✅ The teaching model was trained on {which} above, so its answers on its scene are real attempts: "
            "check them against the picture (lesson 12's quality table says how often it is right)." + short
        )
    meaningless = "that answer is" if len(missing) == 1 else "those answers are"
    line = f"ℹ️  The teaching model was not trained on {', '.join(missing)}: {meaningless} meaningless"
    return line + (f"; it was trained on {', '.join(trained)}." if trained else ".") + short


def model_kind_notice(kind: ModelKind) -> str:
    """The banner a lesson prints under its model (empty for a real checkpoint). Taught in
    ``notebooks/04_captioning.ipynb``."""
    if kind == "random":
        return (
            "⚠️  Offline random-weight model: every answer in this lesson is noise (answers capped at 64 tokens).\n"
            "    For real answers, set FLORENCE2_MODEL to a Florence-2 checkpoint (hub online, or a downloaded folder)."
        )
    if kind == "teaching":
        from helpers.tasks.run import TASKS

        tasks = teaching_tasks()
        scope = (
            "It was trained on every Florence-2 task; how well it does each one is measured in lesson 12."
            if set(TASKS) <= set(tasks)
            else f"It was trained on these tasks only; other tasks give meaningless answers:\n    {' '.join(tasks)}"
        )
        return (
            "ℹ️  Offline TEACHING model: a small Florence-2 trained in this repository on generated shape scenes.\n"
            "    Its answers are meaningful on such scenes only, so this lesson shows it a held-out scene instead of\n"
            f"    photos and documents. {scope}\n"
            "    For a real model, set FLORENCE2_MODEL to a Florence-2 checkpoint (hub online, or a downloaded folder)."
        )
    return ""
