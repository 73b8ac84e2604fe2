"""Qwen-Image-Edit-2509 (``QwenImageEditPlusPipeline``): Qwen-Image-Edit with the condition image sized twice.

As :mod:`cachebuild.families.qwenimage_edit`, with the differences of its ``__call__`` and ``encode_prompt``
for one condition image: the processor gets the image resized (LANCZOS) to about 384 * 384 pixels
(``CONDITION_IMAGE_SIZE``), the VAE gets the original image preprocessed to about 1024 * 1024
(``VAE_IMAGE_SIZE``), both at its aspect ratio in multiples of 32; the template has no image slot of its own,
``encode_prompt`` puts ``"Picture 1: <|vision_start|><|image_pad|><|vision_end|>"`` before the caption; the
template's first 64 rows are dropped. Several condition images per item (``Picture 2: ...``) are not built.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cachebuild.config import DType
from cachebuild.families import qwenimage_edit as edit
from cachebuild.families.qwenimage_edit import pipeline_inputs  # noqa: F401 (the same tensors)

if TYPE_CHECKING:
    from cachebuild.families.text import EncoderSpec, SpecContext

PIPELINES = {"QwenImageEditPlusPipeline": "qwen-image-edit-plus"}
STORED_DTYPE = DType.BF16  # Qwen2.5-VL's hidden states pass fp16's range (families.text.stored_dtype)
# the edit template's user turn filled with _get_qwen_prompt_embeds's image prompt for one image ("Picture {}: ..."
# at 1) before the caption's {}
IMAGE_PROMPT = "Picture 1: " + edit.VISION_TOKENS
TEMPLATE = edit.BASE_TEMPLATE.format(IMAGE_PROMPT + "{}")
DROP = 64  # prompt_template_encode_start_idx
CONDITION_AREA = 384 * 384  # CONDITION_IMAGE_SIZE: the picture the processor gets
VAE_AREA = 1024 * 1024  # VAE_IMAGE_SIZE: the pixels the VAE encodes


def pictures(path: Path) -> tuple:
    """(the picture the processor gets, the (1, 3, 1, H, W) pixels in [-1, 1] the VAE encodes): both from the
    original image, ``VaeImageProcessor.resize`` at :data:`CONDITION_AREA` and ``preprocess`` at
    :data:`VAE_AREA`."""
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
    processor = VaeImageProcessor(vae_scale_factor=16)
    cw, ch = edit.condition_size(*img.size, CONDITION_AREA)
    vw, vh = edit.condition_size(*img.size, VAE_AREA)
    return processor.resize(img, ch, cw), processor.preprocess(img, vh, vw).unsqueeze(2)


def encoder_specs(ctx: SpecContext) -> list[EncoderSpec]:
    """As Qwen-Image-Edit's, with this template (the image prompt in it)."""
    return [
        ctx.llm("qwen25vl", "Qwen2_5_VLForConditionalGeneration", -1, 0, False, prompt_template=TEMPLATE,
                drop_rows=DROP, masked=True, tokenizer=ctx.root / "processor")
    ]  # fmt: skip
