"""What a native transformers ``Florence2Processor`` holds beyond BART's tokenizer: Florence-2's added tokens and the
post-processing rules of every answer type. An original-layout checkpoint is rewritten to carry them
(:mod:`helpers.convert.original_layout`); the tiny models are built with them (:mod:`helpers.course.tiny`, 00_setup).
"""

from __future__ import annotations

#: Tokens the Florence-2 tokenizer adds to BART's vocabulary (task markers, 1000 location bins, polygon markers).
FLORENCE2_EXTRA_TOKENS: tuple[str, ...] = (
    ("<od>", "</od>", "<ocr>", "</ocr>")
    + tuple(f"<loc_{i}>" for i in range(1000))
    + (
        "<cap>", "</cap>", "<ncap>", "</ncap>", "<dcap>", "</dcap>", "<grounding>", "</grounding>",
        "<seg>", "</seg>", "<sep>", "<region_cap>", "</region_cap>", "<region_to_desciption>",
        "</region_to_desciption>", "<proposal>", "</proposal>", "<poly>", "</poly>", "<and>",
    )
)  # fmt: skip

IMAGE_TOKEN = "<image>"

#: Words "pronouns" that phrase grounding must never box (the real checkpoints ship a longer list of the same kind).
BANNED_GROUNDING_TOKENS: tuple[str, ...] = (
    "it", "I", "me", "mine", "you", "your", "yours", "he", "him", "his", "she", "her", "hers", "they", "them",
    "their", "theirs", "one", "oneself", "we", "us", "our", "ours", "its", "myself", "yourself", "himself",
    "herself", "itself", "ourselves", "yourselves", "themselves", "this", "that", "these", "those", "the image",
)  # fmt: skip

#: The post-processing rules `Florence2Processor.post_process_generation` needs: one entry per parse type.
POST_PROCESSOR_CONFIG: dict = {
    "ocr": {
        "pattern": r"(.+?)<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>",
        "area_threshold": 0.0,
    },
    "phrase_grounding": {"banned_grounding_tokens": list(BANNED_GROUNDING_TOKENS)},
    "pure_text": {},
    "description_with_bboxes": {},
    "description_with_polygons": {},
    "polygons": {},
    "bboxes": {},
    "description_with_bboxes_or_polygons": {},
}
