"""Classroom kit: download and convert once, then copy to every laptop (USB stick or a LAN share).

Thirty students downloading a 0.5–1.5 GB checkpoint over one Wi-Fi at the same time is how workshops fail. A kit is
a folder holding converted models (OpenVINO IR + processor files, no PyTorch weights needed), the sample images
and a manifest; the notebooks use it when ``FLORENCE2_KIT`` points at it:

    hf download florence-community/Florence-2-base-ft     # once, where the hub is reachable (or any local folder)
    python -m helpers.course.kit build classroom-kit --model florence-community/Florence-2-base-ft
    # copy classroom-kit/ to each laptop, then:
    FLORENCE2_KIT=/media/usb/classroom-kit FLORENCE2_MODEL=florence-community/Florence-2-base-ft make run

Building needs the checkpoint: a local folder, the Hugging Face cache (works offline) or the hub. Using a kit needs
no network and no Hugging Face cache: :func:`helpers.course.checkpoints.ensure_converted` takes a model from the kit before
converting anything, in the weight format a lesson asks for when the kit holds it, else in the one it holds.
Taught in ``notebooks/00_setup.ipynb``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tarfile
from pathlib import Path

KIT_MANIFEST = "kit.json"


def build_kit(
    output_dir: str | Path,
    models: list[str],
    weight_formats: list[str],
    *,
    include_samples: bool = True,
    archive: bool = False,
) -> Path:
    """Convert every model in every format into ``output_dir/models`` and write ``kit.json``.

    ``models`` are hub ids, local folders or ``tiny``. Returns the kit folder (or the ``.tar`` archive next to it
    when ``archive``).
    """
    from helpers.course import checkpoints as model_registry

    kit = Path(output_dir).expanduser().resolve()
    (kit / "models").mkdir(parents=True, exist_ok=True)
    entries = []
    for model in models:
        for weight_format in weight_formats:
            # Into the kit's own folder, and never another model in place of the one asked for.
            folder = model_registry.ensure_converted(model, weight_format, cache_dir=kit / "models", fallback=False)
            entries.append({"model": model, "weight_format": weight_format, "path": str(folder.relative_to(kit))})
    if include_samples:
        from helpers.course.samples import sample_path

        images = sample_path("shapes").parent
        shutil.copytree(images, kit / "images", dirs_exist_ok=True)
    (kit / "README.txt").write_text(
        "Florence-2 on OpenVINO classroom kit.\n"
        f"Use it with:  FLORENCE2_KIT={kit.name} FLORENCE2_MODEL=<model> make run   (or make lab)\n"
        "Models inside: " + ", ".join(f"{e['model']} ({e['weight_format']})" for e in entries) + "\n"
    )
    # Written last and atomically: a kit.json means the kit is complete (a killed build never looks finished).
    partial = kit / f"{KIT_MANIFEST}.partial"
    partial.write_text(json.dumps({"models": entries}, indent=2))
    partial.replace(kit / KIT_MANIFEST)
    if not archive:
        return kit
    tar_path = kit.with_suffix(".tar")
    with tarfile.open(tar_path, "w") as tar:
        tar.add(kit, arcname=kit.name)
    return tar_path


def read_kit(kit_dir: str | Path) -> dict:
    """The kit's manifest; a clear error when the folder is not a kit."""
    manifest = Path(kit_dir).expanduser() / KIT_MANIFEST
    if not manifest.exists():
        raise FileNotFoundError(
            f"{kit_dir} is not a classroom kit (no {KIT_MANIFEST}). Build one with "
            "`python -m helpers.course.kit build <folder> --model <hub id>` on a machine with internet."
        )
    return json.loads(manifest.read_text())


def find_in_kit(kit_dir: str | Path, model: str, weight_format: str | None = None) -> Path | None:
    """The kit's conversion of ``model`` (as typed when the kit was built, or the same local folder's content), or
    ``None`` when the kit does not hold it. ``weight_format`` is preferred; when the kit holds the model in other
    formats only, the first of them is returned and a note on stderr says which one is used instead."""
    from helpers.ir import is_converted
    from helpers.course.checkpoints import converted_dir

    kit = Path(kit_dir).expanduser().resolve()
    held = {}
    for entry in read_kit(kit)["models"]:
        folder = kit / entry["path"]
        same_model = entry["model"] == model or folder == converted_dir(model, entry["weight_format"], kit / "models")
        if same_model and is_converted(folder, weight_format=entry["weight_format"]):
            held.setdefault(entry["weight_format"], folder)
    if not held:
        return None
    if weight_format is None or weight_format in held:
        return held.get(weight_format) or next(iter(held.values()))
    used, folder = next(iter(held.items()))
    print(
        f"ℹ️  The classroom kit {kit} holds {model} as {', '.join(held)}, not {weight_format}: using its {used} "
        "conversion.",
        file=sys.stderr,
    )
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers.course.kit", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="convert models into a kit folder")
    build.add_argument("output_dir")
    build.add_argument("--model", action="append", required=True, help="hub id, folder or 'tiny' (repeatable)")
    build.add_argument("--weight-format", action="append", default=None, help="fp16 (default), int8, int4, fp32, w8a8")
    build.add_argument("--no-samples", action="store_true")
    build.add_argument("--archive", action="store_true", help="also pack the kit into one .tar file")
    show = sub.add_parser("show", help="list what a kit holds")
    show.add_argument("kit_dir")
    args = parser.parse_args(argv)
    if args.command == "show":
        for entry in read_kit(args.kit_dir)["models"]:
            print(f"{entry['model']:45s} {entry['weight_format']:5s} {entry['path']}")
        return 0
    result = build_kit(
        args.output_dir,
        args.model,
        args.weight_format or ["fp16"],
        include_samples=not args.no_samples,
        archive=args.archive,
    )
    print(f"Kit ready: {result}\nUse it with FLORENCE2_KIT={Path(args.output_dir).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
