"""OpenVINO devices: which this machine has, and a check that names them when a wrong one is asked for.

Taught in ``notebooks/03_select_device.ipynb``.
"""

from __future__ import annotations

import openvino as ov


def available_devices(core: ov.Core | None = None) -> list[str]:
    """OpenVINO devices on this machine, plus the virtual ``AUTO``."""
    return [*(core or ov.Core()).available_devices, "AUTO"]


def check_device(core: ov.Core, device: str) -> None:
    """``ValueError`` naming the available devices unless ``device`` (``CPU``, ``GPU.1``, ``AUTO:GPU,CPU`` …) can run here."""
    choices = ", ".join(available_devices(core))
    if not isinstance(device, str) or not device.strip():
        raise ValueError(f"device must be a device name such as 'CPU' or 'AUTO', got {device!r}. Available: {choices}.")
    if device in ("MULTI", "HETERO"):
        raise ValueError(f"{device} needs a list of devices, e.g. '{device}:CPU'. Available: {choices}.")
    physical = device.split(":", 1)[-1] if device.startswith(("AUTO", "MULTI", "HETERO")) else device
    wanted = [d for d in physical.split(",") if d and d not in ("AUTO", "MULTI", "HETERO")]
    known = core.available_devices
    # "GPU" is valid when OpenVINO lists "GPU.0", "GPU.1"; "CPU.0" is not when it lists only "CPU".
    missing = [d for d in wanted if d not in known and not any(k.split(".")[0] == d for k in known)]
    if missing:
        case = [d.upper() for d in missing if d.upper() in known]
        hint = f" Device names are upper-case: use '{case[0]}'." if case else ""
        raise ValueError(
            f"Device {', '.join(missing)} is not available here.{hint} Pass one of the available devices: {choices}."
        )
