"""What you do with an answer: draw it, export it (COCO, supervision), score it (04–09, README).

May import :mod:`helpers.tasks` and the layers below it (see docs/CONTRIBUTING.md).
"""
