"""ComfyUI prompt syntax, stripped before a prompt reaches CLIP's tokenizer.

ComfyUI's CLIPTextEncode reads emphasis ``(word:1.2)`` and ``(word)``, escaped brackets ``\\(``,
``embedding:name`` (a textual inversion, optionally with a weight), and many workflows carry
A1111-style LoRA tags ``<lora:name:0.8>``. None of it is words CLIP was trained on, so the scorer
sees the plain text: ``"a (red:1.3) ((circle)), embedding:easyneg <lora:x:0.7>"`` becomes
``"a red circle"``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["PromptInfo", "clean_prompt", "describe_prompt"]

_ESCAPED_OPEN = "\x00"
_ESCAPED_CLOSE = "\x01"
# <lora:name:0.8>, <lyco:...>, <hypernet:...>: any angle-bracket tag with a colon inside.
_ANGLE_TAG = re.compile(r"<[^<>:]+:[^<>]*>")
# embedding:name, embedding:folder/name.safetensors, optionally followed by :1.2 (inside a group).
_EMBEDDING = re.compile(r"\bembedding:[^\s,()\[\]]+(?::-?\d+(?:\.\d+)?)?", re.IGNORECASE)
# The weight of an emphasis group: "(word:1.2)" -> "(word)".
_WEIGHT = re.compile(r":\s*-?\d+(?:\.\d*)?\s*(?=\))")
_BRACKETS = re.compile(r"[()\[\]{}]")
_BREAK = re.compile(r"\bBREAK\b")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.])")
_REPEATED_COMMAS = re.compile(r"(?:\s*,\s*){2,}")
_SPACES = re.compile(r"\s+")


def clean_prompt(text: str) -> str:
    """``text`` with ComfyUI's weights, groups, embeddings and LoRA tags removed, whitespace tidied."""
    out = text.replace("\\(", _ESCAPED_OPEN).replace("\\)", _ESCAPED_CLOSE)
    out = _ANGLE_TAG.sub(" ", out)
    out = _EMBEDDING.sub(" ", out)
    out = _WEIGHT.sub("", out)
    out = _BRACKETS.sub(" ", out)
    out = _BREAK.sub(",", out)
    out = out.replace(_ESCAPED_OPEN, "(").replace(_ESCAPED_CLOSE, ")")
    out = _REPEATED_COMMAS.sub(", ", out)
    out = _SPACES.sub(" ", out)
    out = _SPACE_BEFORE_PUNCT.sub(r"\1", out)
    return out.strip(" ,")


@dataclass(frozen=True, slots=True)
class PromptInfo:
    """What the text encoder actually saw of a prompt."""

    original: str
    cleaned: str
    #: Tokens of the cleaned prompt, start and end markers included.
    n_tokens: int
    context_length: int

    @property
    def truncated(self) -> bool:
        """True when the prompt was cut at the model's context length (77 for CLIP)."""
        return self.n_tokens > self.context_length

    def to_dict(self) -> dict[str, object]:
        return {"original": self.original, "cleaned": self.cleaned, "n_tokens": self.n_tokens,
                "context_length": self.context_length, "truncated": self.truncated}


Tokenizer = Callable[..., torch.Tensor]


def count_tokens(tokenizer: Tokenizer, text: str, context_length: int) -> int:
    """Tokens ``text`` takes, start/end markers included, however long (not cut at the context)."""
    encode = getattr(tokenizer, "encode", None)
    if callable(encode) and hasattr(tokenizer, "sot_token_id"):  # open_clip's SimpleTokenizer
        return len(encode(text)) + 2
    # Any other open_clip tokenizer: tokenise with a roomy context and count what is not padding.
    ids = tokenizer([text], context_length=max(4 * context_length, 512))
    return int((ids[0] != 0).sum())


def describe_prompt(tokenizer: Tokenizer, text: str, context_length: int) -> PromptInfo:
    cleaned = clean_prompt(text)
    return PromptInfo(text, cleaned, count_tokens(tokenizer, cleaned, context_length), context_length)


