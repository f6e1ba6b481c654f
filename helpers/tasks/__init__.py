"""The 15 Florence-2 tasks: the task table, prompts, the ``<loc_N>`` codec, answer parsing and runners (04–09).

* :mod:`helpers.tasks.run` — ``TASKS``, ``build_prompt``, ``load_image``, ``run_task`` (any model with ``generate``)
* :mod:`helpers.tasks.numpy_postprocessing` — the processor's answer parsing without torch

May import :mod:`helpers.runtime` and :mod:`helpers.ir` (see docs/CONTRIBUTING.md).
"""
