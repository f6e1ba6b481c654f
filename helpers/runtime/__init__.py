"""Inference (torch-free on import): ``OVFlorence2Model`` over a converted folder, devices, generation strategies.

* :mod:`helpers.runtime.ov_model` — ``OVFlorence2Model`` with a transformers-style ``generate`` (02_convert)
* :mod:`helpers.runtime.devices` — the devices this machine has, and the check that names them (03_select_device)
* :mod:`helpers.runtime.generation` — the generation strategies behind one protocol (02_convert, 11_speed)
* :mod:`helpers.runtime.numpy_generation` — greedy and beam search in numpy (README: torch-free install)
* :mod:`helpers.runtime.hf_generation` — transformers' own ``generate`` driving the OpenVINO parts (needs torch)

May import :mod:`helpers.ir` only; this folder plus ``helpers/ir.py`` can be copied into another project.
"""
