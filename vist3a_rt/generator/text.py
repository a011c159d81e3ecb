"""Prompt text → UMT5 embeddings, exactly as diffusers' ``WanPipeline`` encodes a prompt.

Steps (per prompt): clean it with diffusers' own ``prompt_clean`` (``ftfy.fix_text`` only if ftfy
is installed, HTML-unescape twice, strip, collapse whitespace), tokenize padded to
``max_sequence_length`` (512) with truncation and the end-of-sequence token, run the text encoder
with the attention mask, keep the last hidden state, and set every position at or after the real
token count to exactly zero. The zero rows are still attended to by the transformer's
cross-attention (Wan has no cross-attention mask), so they must be zeros, not garbage.

The native generator (``impl="native"``) runs the same steps without diffusers or transformers:
``bundle.text.clean_prompt`` (the same cleaning, written out) and ``bundle.text.BundleTokenizer``
(``tokenizer.json`` through the ``tokenizers`` library, padded and truncated the same way);
``tokenize`` and ``TextEncoder`` take either tokenizer.

A prompt longer than ``max_sequence_length`` tokens is truncated (diffusers does this silently);
we do the same but warn, naming the token count, because the end of the prompt is lost.

The official recipe wraps the user prompt in an orbit-camera sentence (``wrap_prompt``) and uses
one long negative prompt (``OFFICIAL_NEGATIVE_PROMPT``); both strings are copied from the
e2e fixture's settings.json.
"""

from __future__ import annotations

import re
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from ..bundle.text import BundleTokenizer
from ..errors import Vist3AInputError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, UMT5EncoderModel

MAX_SEQUENCE_LENGTH = 512

PROMPT_TEMPLATE = ("The camera rotates around the scene, maintaining constant distance: `{prompt}`. "
                   "The orbiting trajectory captures 3D structure and consistency.")

OFFICIAL_NEGATIVE_PROMPT = (
    "Background blur, Blurred background, Blurred scene, Artifacts, not aesthetic, not realistic, "
    "rendered noise, low quality movement, low quality video, low quality image, deformed, disfigured, "
    "distorted, extra limbs, cloned face, skinny, glitchy, double torso, extra arms, extra hands, "
    "mangled fingers, missing lips, ugly face, distorted legs, fused fingers, too many fingers, long neck"
)


def wrap_prompt(prompt: str) -> str:
    """The user prompt inside the official orbit-camera sentence (backticks included)."""
    return PROMPT_TEMPLATE.format(prompt=prompt)


def clean_prompt(text: str) -> str:
    """diffusers' Wan ``prompt_clean`` (called, not re-implemented, so the two cannot drift)."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    return prompt_clean(text)


def tokenize(tokenizer: "PreTrainedTokenizerBase", prompts: list[str],
             max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, both int64 [B, max_sequence_length], eos appended, padded right."""
    if isinstance(tokenizer, BundleTokenizer):  # tokenizers-only: same ids, same truncation warning
        return tokenizer.encode(prompts, max_sequence_length)
    _warn_if_truncated(tokenizer, prompts, max_sequence_length)
    tokens = tokenizer(prompts, padding="max_length", max_length=max_sequence_length, truncation=True,
                       add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    return tokens.input_ids, tokens.attention_mask


def _warn_if_truncated(tokenizer, prompts: list[str], max_sequence_length: int) -> None:
    for prompt in prompts:
        count = len(tokenizer(prompt, add_special_tokens=True).input_ids)
        if count > max_sequence_length:
            warnings.warn(f"prompt has {count} tokens (with end-of-sequence), more than max_sequence_length "
                          f"{max_sequence_length}; it is truncated: {prompt[:60]!r}...", stacklevel=3)


@torch.no_grad()
def encode_tokens(text_encoder: "UMT5EncoderModel", input_ids: torch.Tensor,  # [B, L] int64
                  attention_mask: torch.Tensor) -> torch.Tensor:  # [B, L] 0/1
    """Last hidden state [B, L, D] with every position at/after the real length set to exactly 0."""
    device = text_encoder.device
    hidden = text_encoder(input_ids.to(device), attention_mask.to(device)).last_hidden_state
    seq_lens = attention_mask.to(device).gt(0).sum(dim=1)  # [B]
    beyond = torch.arange(hidden.shape[1], device=device)[None, :] >= seq_lens[:, None]  # [B, L]
    return hidden.masked_fill(beyond[..., None], 0.0)


class TextEncoder:
    """Tokenizer + UMT5 encoder with an LRU cache of embeddings keyed by the exact prompt string.

    The cache makes the (long, constant) negative prompt cost one encoder pass per process. Each
    missing prompt is encoded on its own (batch 1), so a string's embedding never depends on which
    other prompts it was requested with.
    """

    def __init__(self, tokenizer: "PreTrainedTokenizerBase", text_encoder: "UMT5EncoderModel", *,
                 max_sequence_length: int = MAX_SEQUENCE_LENGTH, cache_size: int = 16,
                 clean: Callable[[str], str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.clean = clean or clean_prompt  # diffusers' prompt_clean unless given (the native path's own)
        self.max_sequence_length = max_sequence_length
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __call__(self, prompts: str | Sequence[str], *, allow_empty: bool = False) -> torch.Tensor:
        """Embeddings [B, max_sequence_length, D] for ``prompts`` (a string counts as a batch of one).

        An empty or whitespace-only prompt is a ``Vist3AInputError`` unless ``allow_empty`` (an
        empty *negative* prompt is legitimate: it is diffusers' default).
        """
        prompts = check_prompts(prompts, allow_empty=allow_empty)
        return torch.stack([self._embedding(p) for p in prompts])

    def _embedding(self, prompt: str) -> torch.Tensor:  # [L, D]
        if prompt in self._cache:
            self._cache.move_to_end(prompt)
            return self._cache[prompt]
        ids, mask = tokenize(self.tokenizer, [self.clean(prompt)], self.max_sequence_length)
        embedding = encode_tokens(self.text_encoder, ids, mask)[0]
        if self.cache_size > 0:
            self._cache[prompt] = embedding
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return embedding

    def clear_cache(self) -> None:
        self._cache.clear()


def check_prompts(prompts: str | Sequence[str], *, allow_empty: bool = False) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or not prompts:
        raise Vist3AInputError("prompts must be a non-empty list of strings")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise Vist3AInputError(f"prompt {i} is a {type(prompt).__name__}, not a string")
        if not allow_empty and not prompt.strip():
            raise Vist3AInputError(f"prompt {i} is empty" if len(prompts) > 1 else "the prompt is empty")
    return list(prompts)


# --- closed vocabularies (the nano model) ----------------------------------------------------------

WORD = re.compile(r"[^\W_]+")  # a run of letters / digits: what "a word" means to unknown_words


def unknown_words(tokenizer: "PreTrainedTokenizerBase", text: str) -> list[str]:
    """The words of ``text`` (runs of letters / digits, first occurrence order, as written) that
    the tokenizer does not hold as a single piece: the text encoder never learned them as words."""
    unknown: dict[str, None] = {}
    for word in WORD.findall(text):
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            unknown.setdefault(word)
    return list(unknown)


def warn_unknown_words(tokenizer: "PreTrainedTokenizerBase", text: str) -> list[str]:
    """``unknown_words``, with a ``UserWarning`` naming them when there are any."""
    unknown = unknown_words(tokenizer, text)
    if unknown:
        warnings.warn(f"the model's vocabulary does not know {len(unknown)} word(s) of the prompt: "
                      f"{', '.join(unknown)}; they reach the text encoder only as sub-word pieces and "
                      "will most likely be ignored", UserWarning, stacklevel=2)
    return unknown
