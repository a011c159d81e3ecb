"""Prompt text → token ids with the ``tokenizers`` library alone (no transformers, no diffusers).

``clean_prompt`` does what diffusers' Wan ``prompt_clean`` does (``ftfy.fix_text`` when ftfy is
installed, HTML-unescape twice, strip, every run of Unicode white space → one space, strip).
diffusers matches white space with the ``regex`` module, whose ``\\s`` is Unicode's White_Space
property; Python's ``re`` would also match the ASCII separators U+001C–U+001F, so the class is
spelled out here.

``BundleTokenizer`` reads ``tokenizer.json`` and pads / truncates the way the transformers fast
tokenizer does when the torch path calls it (``padding="max_length"``, ``truncation=True``,
end-of-sequence appended by the file's post-processor, padding and truncation sides from
``tokenizer_config.json``). Called like a transformers tokenizer on one string
(``tokenizer(text, add_special_tokens=False).input_ids``) and with ``unk_token_id``, it also
serves ``vist3a_rt.generator.text.unknown_words``.
"""

from __future__ import annotations

import html
import json
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

from ..errors import CheckpointError

# Unicode White_Space (what the `regex` module's \s matches)
_WHITE_SPACE = re.compile("[\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")


def clean_prompt(text: str) -> str:
    try:
        import ftfy
    except ImportError:
        ftfy = None
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITE_SPACE.sub(" ", text).strip()


class BundleTokenizer:
    """``tokenizer.json`` through the ``tokenizers`` library, configured like the torch path's tokenizer."""

    def __init__(self, folder: str | Path) -> None:
        from tokenizers import Tokenizer

        folder = Path(folder)
        try:
            self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as err:  # noqa: BLE001 - tokenizers raises its own exception type for unreadable files
            raise CheckpointError(f"cannot read {folder / 'tokenizer.json'}: {err}") from None
        config = _read_config(folder / "tokenizer_config.json")
        self.pad_token = _token_text(config.get("pad_token", "<pad>"))
        self.pad_token_id = self._id_of(self.pad_token)
        unk = config.get("unk_token")
        self.unk_token_id = self._id_of(_token_text(unk)) if unk is not None else None
        self.padding_side = config.get("padding_side", "right")
        self.truncation_side = config.get("truncation_side", "right")
        self._tokenizer.no_truncation()  # a tokenizer.json may be saved with either switched on
        self._tokenizer.no_padding()

    def _id_of(self, token: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise CheckpointError(f"the tokenizer has no token {token!r}, which tokenizer_config.json names")
        return token_id

    def encode(self, prompts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, int64 [B, max_length]: end-of-sequence appended, padded,
        truncated (with a warning naming the token count, as the torch path warns)."""
        for prompt in prompts:
            count = len(self.ids(prompt, add_special_tokens=True))
            if count > max_length:
                warnings.warn(f"prompt has {count} tokens (with end-of-sequence), more than max_sequence_length "
                              f"{max_length}; it is truncated: {prompt[:60]!r}...", stacklevel=3)
        tokenizer = self._tokenizer
        tokenizer.enable_truncation(max_length, stride=0, strategy="longest_first", direction=self.truncation_side)
        tokenizer.enable_padding(direction=self.padding_side, pad_id=self.pad_token_id, pad_token=self.pad_token,
                                 length=max_length)
        try:
            encodings = tokenizer.encode_batch(prompts, add_special_tokens=True)
        finally:
            tokenizer.no_truncation()
            tokenizer.no_padding()
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64)
        return ids, mask

    def ids(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str, *, add_special_tokens: bool = True) -> SimpleNamespace:
        """``.input_ids`` of one string, the way ``unknown_words`` calls a transformers tokenizer."""
        return SimpleNamespace(input_ids=self.ids(text, add_special_tokens=add_special_tokens))


def _read_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None


def _token_text(token) -> str:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...} objects."""
    return token["content"] if isinstance(token, dict) else str(token)
