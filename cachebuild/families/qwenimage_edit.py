"""Qwen-Image-Edit: the caption is encoded together with a condition image (the picture to edit).

What ``QwenImageEditPipeline.encode_prompt`` computes for one caption and its condition image: the image is
resized (PIL, ``VaeImageProcessor.resize``) to :func:`condition_size`, about 1024 * 1024 pixels at its aspect
ratio in multiples of 32; the caption goes into the pipeline's template, whose user turn starts with the image's
vision tokens; the processor (``Qwen2VLProcessor``: the Qwen2.5-VL image processor, which resizes again to its
own patch grid, and the tokenizer, which expands ``<|image_pad|>`` to one token per merged patch) builds
``input_ids``, ``attention_mask``, ``pixel_values`` and ``image_grid_thw``; Qwen2.5-VL runs over them, vision
tower included, and the last hidden state is kept at the real tokens less the template's first 64 rows. There
is no truncation (``encode_prompt`` ignores ``max_sequence_length``; ``__call__`` only checks it).

Each caption is encoded alone, as one prompt of the pipeline is: no padding enters the rows.

The processor needs torchvision for its video half (``Qwen2VLProcessor.from_pretrained`` loads a video
processor); :func:`load_processor` uses it where it loads, and otherwise the same class without the video half,
whose image processor is then the one ``AutoImageProcessor`` picks (the PIL backend where torchvision is
missing). Both run the same ``__call__`` on text and images.
"""

from __future__ import annotations

import functools
import hashlib
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cachebuild.config import DType
from cachebuild.errors import ModelLoadError

if TYPE_CHECKING:
    from cachebuild.families.text import EncoderSpec, SpecContext

PIPELINES = {"QwenImageEditPipeline": "qwen-image-edit"}
STORED_DTYPE = DType.BF16  # Qwen2.5-VL's hidden states pass fp16's range (families.text.stored_dtype)
# The edit pipelines' prompt_template_encode: a system message, then the user's turn at {} (both edit pipelines
# share it; QwenImageEditPipeline fills the turn with the image's vision tokens and the caption)
BASE_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
VISION_TOKENS = "<|vision_start|><|image_pad|><|vision_end|>"
TEMPLATE = BASE_TEMPLATE.format(VISION_TOKENS + "{}")
DROP = 64  # prompt_template_encode_start_idx: the template's rows before the image, not kept
CONDITION_AREA = 1024 * 1024  # __call__'s calculate_dimensions(1024 * 1024, width / height)


def condition_size(width: int, height: int, area: int | None = None) -> tuple[int, int]:
    """(width, height) the pipeline resizes a condition image of ``width`` x ``height`` to: ``area`` (default
    :data:`CONDITION_AREA`) at the image's aspect ratio, each side rounded to a multiple of 32.

    Example:
        >>> condition_size(1920, 1080)
        (1376, 768)
    """
    ratio = width / height
    w = math.sqrt((area or CONDITION_AREA) * ratio)
    h = w / ratio
    return round(w / 32) * 32, round(h / 32) * 32


def condition_image(path: Path):
    """The RGB PIL image the pipeline hands its processor for the picture at ``path`` (``VaeImageProcessor
    .resize``: PIL's LANCZOS, the pipeline's default resample)."""
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
    w, h = condition_size(*img.size)
    return VaeImageProcessor(vae_scale_factor=16).resize(img, h, w)


def pictures(path: Path) -> tuple:
    """(the picture the processor gets, the (1, 3, 1, H, W) pixels in [-1, 1] the VAE encodes) for the condition
    image at ``path``: ``__call__`` resizes once and preprocesses that picture at the same size, one frame."""
    from diffusers.image_processor import VaeImageProcessor

    picture = condition_image(path)
    w, h = picture.size
    return picture, VaeImageProcessor(vae_scale_factor=16).preprocess(picture, h, w).unsqueeze(2)


def image_sha256(path: Path) -> str:
    """The condition image's content hash: part of the text id, so a changed image is encoded again."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_processor(folder: Path):
    """The pipeline's ``Qwen2VLProcessor`` from ``folder``; without torchvision (which its video processor needs),
    the same class with the image processor and tokenizer only."""
    from transformers import Qwen2VLProcessor

    try:
        return Qwen2VLProcessor.from_pretrained(folder)
    except ImportError:
        pass  # torchvision missing: the video half cannot load
    except Exception as exc:
        raise ModelLoadError(f"could not load the Qwen2.5-VL processor from {folder}: {exc}") from exc
    try:
        return _image_text_processor().from_pretrained(folder)
    except Exception as exc:
        raise ModelLoadError(f"could not load the Qwen2.5-VL processor from {folder}: {exc}") from exc


@functools.cache
def _image_text_processor():
    """``Qwen2VLProcessor`` without its video processor: the same token attributes and ``__call__``."""
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageTextProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(
                self.image_token
            )
            self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(
                self.video_token
            )
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    return ImageTextProcessor


def encode(model, processor, caption: str, image, device: torch.device, template: str = TEMPLATE) -> torch.Tensor:
    """(T, D) float32 on the CPU: the rows ``encode_prompt`` returns for one caption and its condition image
    (the picture :func:`pictures` gives), the caption put in ``template``."""
    inputs = processor(text=[template.format(caption)], images=image, padding=True, return_tensors="pt").to(device)
    with torch.inference_mode():
        out = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs.get("pixel_values"),
            image_grid_thw=inputs.get("image_grid_thw"),
            output_hidden_states=True,
            use_cache=False,
        )
    h = out.hidden_states[-1][0][inputs["attention_mask"][0].bool()]
    return h[DROP:].float().cpu()


def pipeline_inputs(rec: dict, vae: dict) -> dict[str, torch.Tensor]:
    """``prompt_embeds`` (T, 3584) and ``prompt_embeds_mask`` (T,) int64 ones: one caption's ``encode_prompt``
    output with its condition image (for a batch the pipeline pads rows with zeros to the longest and the mask
    with zeros to match); ``image_latents`` (16, 1, h, w): ``_encode_vae_image``'s output for the condition
    image, normalised, before ``prepare_latents`` packs it (``qwenimage.pack_latents(image_latents.transpose(0,
    1)[None])`` gives its (h/2 * w/2, 64) tokens); h, w are the condition size over 8."""
    embeds = rec["qwen25vl"][rec["qwen25vl_mask"].bool()] if "qwen25vl_mask" in rec else rec["qwen25vl"]
    out = {"prompt_embeds": embeds, "prompt_embeds_mask": torch.ones(embeds.shape[0], dtype=torch.long)}
    if CONTROL_LATENTS in rec:
        out["image_latents"] = rec[CONTROL_LATENTS][:, None]
    return out


CONTROL_LATENTS = "control_latents"  # the record's (C, h, w) normalised VAE latents of the condition image


def condition_latents(vae, pixels: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(C, h, w) float32 on the CPU: ``_encode_vae_image`` of the condition image's pixels (from
    :func:`pictures`): the posterior's mode, ``(z - latents_mean) / latents_std`` per channel."""
    x = pixels.to(device, dtype)
    with torch.inference_mode():
        z = vae.encode(x).latent_dist.mode()  # (1, C, 1, h, w)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(z.device, z.dtype)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(z.device, z.dtype)
    return ((z - mean) / std)[0, :, 0].float().cpu()


def load_condition_vae(folder: Path, dtype: torch.dtype, device: torch.device):
    """The pipeline's ``AutoencoderKLQwenImage`` from ``folder`` (its ``vae/``), in eval mode on ``device``."""
    import diffusers

    try:
        vae = diffusers.AutoencoderKLQwenImage.from_pretrained(folder, torch_dtype=dtype)
    except Exception as exc:
        raise ModelLoadError(f"could not load the condition image's VAE from {folder}: {exc}") from exc
    return vae.to(device).eval().requires_grad_(False)


def encoder_specs(ctx: SpecContext) -> list[EncoderSpec]:
    """Qwen2.5-VL's last hidden state with the image's tokens, masked, the template's first 64 rows dropped, no
    length limit (``max_length`` 0); the tokenizer folder is the processor's. Encoded by jobs.textenc_edit."""
    return [
        ctx.llm("qwen25vl", "Qwen2_5_VLForConditionalGeneration", -1, 0, False, prompt_template=TEMPLATE,
                drop_rows=DROP, masked=True, tokenizer=ctx.root / "processor")
    ]  # fmt: skip


def text_id(caption: str, image_sha256: str) -> str:
    """The dedup identity of one (caption, condition image) pair within a store."""
    return hashlib.sha256(f"{caption}\0{image_sha256}".encode()).hexdigest()[:32]
