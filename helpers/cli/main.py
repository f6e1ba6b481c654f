"""Command line: run one Florence-2 task on an image with OpenVINO, or tasks on a folder of images.

    python -m helpers IMAGE --task "<OD>" [--text ...] [--model ID_OR_DIR|tiny] [--device CPU]
                      [--weight-format fp16] [--out annotated.png]
    python -m helpers FOLDER_OR_GLOB --task "<OD>" [--task "<CAPTION>"] --output-dir out/ [--coco] [--draw]
                      [--batch-size 4]      (batch mode: see helpers/cli/batch.py, or python -m helpers FOLDER -h)

The model is converted on first use and cached under ``FLORENCE2_MODELS_DIR`` (default ``models/``).
Standard output carries only the answer, as JSON (``python -m helpers photo.jpg --task od > answer.json`` works on a
first run too); conversion progress, fallbacks and timings go to standard error. ``--out`` saves the drawing.
Region tasks take ``--text "55,42,146,133"`` (a pixel box) or ``<loc_N>`` tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

from helpers.ir import WEIGHT_FORMATS
from helpers.course.checkpoints import DEFAULT_DEVICE, load_model, model_from_env


def build_parser() -> argparse.ArgumentParser:
    from helpers.cli.batch import build_parser as build_batch_parser

    batch_options = build_batch_parser().format_help().split("\n\n", 2)[-1]  # its options, without usage line
    parser = argparse.ArgumentParser(
        prog="python -m helpers",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="single image:\n"
        '  python -m helpers photo.jpg --task "object detection" > answer.json\n'
        '  python -m helpers photo.jpg --task "<REGION_TO_CATEGORY>" --text "55,42,146,133"\n\n'
        "folder or glob (batch mode, resumable; writes results.jsonl):\n"
        '  python -m helpers photos/ --task "<OD>" --output-dir out/ --coco --draw\n\n'
        f"batch mode (python -m helpers FOLDER_OR_GLOB ...):\n{batch_options}",
    )
    parser.add_argument(
        "image", help="path to an image file (any format Pillow reads); a folder or glob runs batch mode"
    )
    parser.add_argument("--task", default="<CAPTION>",
                        help='task token or name, e.g. "<OD>" or "object detection" (default: <CAPTION>)')  # fmt: skip
    parser.add_argument("--text", default=None,
                        help='text input for tasks that take one: a phrase, or a region as a pixel box "x1,y1,x2,y2"')  # fmt: skip
    parser.add_argument(
        "--model",
        default=model_from_env(),
        help="hub id, local folder, or 'tiny' (default: $FLORENCE2_MODEL or base-ft)",
    )
    parser.add_argument("--device", default=DEFAULT_DEVICE, help="OpenVINO device: CPU, GPU, AUTO … (default: AUTO)")
    parser.add_argument("--weight-format", default="fp16", choices=WEIGHT_FORMATS)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--num-beams", type=int, default=None, help="default: the model's generation config (3)")
    parser.add_argument("--out", type=Path, default=None, help="save the drawn answer to this PNG/JPEG")
    parser.add_argument("--reconvert", action="store_true",
                        help="convert the model again over its cached conversion (repairs a damaged one)")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    """Answer as JSON on standard output; everything else (conversion progress, warnings) on standard error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    answer_stream = sys.stdout
    if {"-h", "--help"} & set(argv):  # help is the answer then
        return _run(argv, answer_stream)
    with contextlib.redirect_stdout(sys.stderr):  # prints of a first conversion or a fallback must not mix in
        return _run(argv, answer_stream)


def _run(argv: list[str], answer_stream) -> int:
    from helpers.cli.batch import wants_batch

    if wants_batch(argv):  # a folder or glob: JSONL over every image (helpers/cli/batch.py)
        from helpers.cli.batch import main as batch_main

        return batch_main(argv)
    args = build_parser().parse_args(argv)
    from helpers.outputs.plotting import draw_answer
    from helpers.tasks.run import load_image, run_task

    try:
        image = load_image(args.image)
        model, processor = load_model(args.model, args.weight_format, args.device, reconvert=args.reconvert)
        generate_kwargs = {"max_new_tokens": args.max_new_tokens}
        if args.num_beams is not None:
            generate_kwargs["num_beams"] = args.num_beams
        start = time.perf_counter()
        result = run_task(model, processor, image, args.task, args.text, **generate_kwargs)
        seconds = time.perf_counter() - start
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, ensure_ascii=False), file=answer_stream, flush=True)
    print(f"({seconds:.2f} s)", file=sys.stderr)
    if args.out is not None:
        task = next(iter(result))
        draw_answer(image, task, result[task]).save(args.out)
        print(f"drawing saved to {args.out}", file=sys.stderr)
    return 0
