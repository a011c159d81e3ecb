"""The video half of VIST3A: Wan 2.1 text-to-video sampling on diffusers / transformers / PEFT classes.

``WanGenerator.from_folder(wan_dir, lora_dir)`` loads a diffusers-layout Wan folder offline
(LoRA merged into the weights); ``encode_prompt`` → ``sample`` → ``denormalize`` → ``decode`` →
``resize_frames`` reproduce the official inference procedure step by step. diffusers,
transformers and peft are imported only when a model is loaded or a scheduler is built.
"""

from .latents import decode, denormalize, latent_shape, resize_frames
from .loading import WanComponents, load_wan_components, merge_lora
from .sampling import SAMPLERS, denoise, initial_noise, make_scheduler
from .text import MAX_SEQUENCE_LENGTH, OFFICIAL_NEGATIVE_PROMPT, PROMPT_TEMPLATE, TextEncoder, wrap_prompt
from .wan import WanGenerator

__all__ = [
    "WanGenerator", "WanComponents", "TextEncoder", "load_wan_components", "merge_lora", "make_scheduler",
    "denoise", "initial_noise", "latent_shape", "denormalize", "decode", "resize_frames", "wrap_prompt",
    "PROMPT_TEMPLATE", "OFFICIAL_NEGATIVE_PROMPT", "MAX_SEQUENCE_LENGTH", "SAMPLERS",
]
