from __future__ import annotations

import open_clip
import pytest

from quality.prompts import clean_prompt, describe_prompt


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("a (red:1.3) ((circle)), embedding:easyneg <lora:shapes_v2:0.7>", "a red circle"),
        ("(a photo of a red circle:1.1)", "a photo of a red circle"),
        ("masterpiece, (best quality:1.2), [blurry]", "masterpiece, best quality, blurry"),
        ("(embedding:bad-hands:1.2), ugly", "ugly"),
        ("embedding:folder/neg.safetensors, lowres", "lowres"),
        ("a sign saying \\(hello\\)", "a sign saying (hello)"),
        ("<lora:a:1> <lyco:b:0.5:0.5> a cat", "a cat"),
        ("a cat BREAK a dog", "a cat, a dog"),
        ("(red:-0.5) square", "red square"),
        ("time 12:30, cat :3", "time 12:30, cat :3"),
        ("  a ,  , b  ", "a, b"),
        ("", ""),
    ],
)
def test_comfyui_syntax_is_stripped(raw: str, clean: str) -> None:
    assert clean_prompt(raw) == clean


def test_long_prompt_is_reported_cut_at_77_tokens() -> None:
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    short = describe_prompt(tokenizer, "a photo of a (red:1.2) circle", 77)
    assert short.cleaned == "a photo of a red circle"
    assert short.n_tokens == 8
    assert not short.truncated
    long = describe_prompt(tokenizer, ", ".join(["a red circle"] * 30), 77)
    assert long.truncated
    assert long.n_tokens > 77
    assert long.to_dict()["truncated"] is True
