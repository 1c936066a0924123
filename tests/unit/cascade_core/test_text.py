"""CLIP-G text conditioning wrapper on a tiny random CLIP text model and an offline tokenizer."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from cascade_core.models.text import drop_captions, empty_text_conditioning, encode_text, tokenize

MERGES = ["c a", "ca t</w>", "d o", "do g</w>", "r e", "re d</w>"]


def _write_tokenizer(folder: Path) -> None:
    """A character-level CLIP BPE vocabulary plus a few merges, laid out like the hub's tokenizer/."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = list(letters) + [c + "</w>" for c in letters] + ["".join(m.split()) for m in MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> CLIPTokenizer:
    folder = tmp_path_factory.mktemp("tokenizer")
    _write_tokenizer(folder)
    return CLIPTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def text_model(tokenizer) -> CLIPTextModelWithProjection:
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=24,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config).eval()


PROMPTS = ["a red cat", "dog", ""]


def _reference(text_model, tokenizer, prompts, mask: bool = True):
    enc = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = text_model(
            input_ids=enc.input_ids,
            attention_mask=enc.attention_mask if mask else None,
            output_hidden_states=True,
        )
    return enc, out


def test_shapes_and_zero_image_embedding(text_model, tokenizer):
    cond = encode_text(text_model, tokenizer, PROMPTS)
    assert cond.clip_text.shape == (3, 77, 32)
    assert cond.clip_text_pooled.shape == (3, 1, 24)
    assert cond.clip_img.shape == (3, 1, 768) and not cond.clip_img.any()
    assert set(cond.as_dict()) == {"clip_text", "clip_text_pooled", "clip_img"}


def test_uses_last_layer_before_final_norm_with_mask(text_model, tokenizer):
    cond = encode_text(text_model, tokenizer, PROMPTS)
    _, ref = _reference(text_model, tokenizer, PROMPTS)
    assert torch.equal(cond.clip_text, ref.hidden_states[-1])
    assert not torch.allclose(cond.clip_text, ref.last_hidden_state, atol=1e-3)  # not the final-LN output
    torch.testing.assert_close(text_model.text_model.final_layer_norm(cond.clip_text), ref.last_hidden_state)
    # the attention mask is passed: without it the pad positions' states differ
    _, unmasked = _reference(text_model, tokenizer, PROMPTS, mask=False)
    assert not torch.allclose(cond.clip_text, unmasked.hidden_states[-1], atol=1e-3)


def test_pooled_is_projected_final_norm_eos_token(text_model, tokenizer):
    cond = encode_text(text_model, tokenizer, PROMPTS)
    enc, ref = _reference(text_model, tokenizer, PROMPTS)
    eos = (enc.input_ids == tokenizer.eos_token_id).int().argmax(dim=1)  # first EOS per prompt
    normed = text_model.text_model.final_layer_norm(cond.clip_text)
    expected = text_model.text_projection(normed[torch.arange(3), eos]).unsqueeze(1)
    torch.testing.assert_close(cond.clip_text_pooled, expected)
    assert torch.equal(cond.clip_text_pooled, ref.text_embeds.unsqueeze(1))


def test_padding_truncation_and_mask(tokenizer):
    ids, mask = tokenize(tokenizer, ["a cat", "dog " * 200])
    assert ids.shape == mask.shape == (2, 77)
    # <bos> a cat <eos>, then padding with the tokenizer's pad token and mask 0
    assert mask[0].tolist() == [1] * 4 + [0] * 73
    assert (ids[0, 4:] == tokenizer.pad_token_id).all()
    assert mask[1].all() and ids[1, 0] == tokenizer.bos_token_id and ids[1, -1] == tokenizer.eos_token_id


def test_batched_equals_one_by_one(text_model, tokenizer):
    batched = encode_text(text_model, tokenizer, PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        single = encode_text(text_model, tokenizer, [prompt])
        torch.testing.assert_close(batched.clip_text[i : i + 1], single.clip_text, rtol=0, atol=1e-6)
        torch.testing.assert_close(
            batched.clip_text_pooled[i : i + 1], single.clip_text_pooled, rtol=0, atol=1e-6
        )


def test_dtype_is_respected(text_model, tokenizer):
    cond = encode_text(text_model, tokenizer, PROMPTS, dtype=torch.bfloat16)
    assert {v.dtype for v in cond.as_dict().values()} == {torch.bfloat16}
    ref = encode_text(text_model, tokenizer, PROMPTS)
    torch.testing.assert_close(cond.clip_text.float(), ref.clip_text, rtol=1e-2, atol=2e-2)
    bf16 = encode_text(copy.deepcopy(text_model).to(torch.bfloat16), tokenizer, PROMPTS)  # a bf16 tower
    assert bf16.clip_text.dtype == bf16.clip_img.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.clip_text.float(), ref.clip_text, rtol=0.05, atol=0.1)


def test_empty_conditioning_and_caption_dropout(text_model, tokenizer):
    empty = empty_text_conditioning(text_model, tokenizer, 2)
    one = encode_text(text_model, tokenizer, [""])
    assert empty.clip_text.shape == (2, 77, 32)
    assert torch.equal(empty.clip_text[1:], one.clip_text) and torch.equal(
        empty.clip_text_pooled[:1], one.clip_text_pooled
    )
    assert one.clip_text.abs().sum() > 0  # the empty caption is a real encoding, not zeros
    cond = encode_text(text_model, tokenizer, ["a red cat", "dog"])
    dropped = drop_captions(cond, one, torch.tensor([False, True]))
    assert torch.equal(dropped.clip_text[0], cond.clip_text[0])
    assert torch.equal(dropped.clip_text[1], one.clip_text[0])
    assert torch.equal(dropped.clip_text_pooled[1], one.clip_text_pooled[0])
    with pytest.raises(ValueError, match="bool tensor"):
        drop_captions(cond, one, torch.tensor([0, 1]))


def test_bad_input_is_rejected(text_model, tokenizer):
    with pytest.raises(TypeError, match="list of strings"):
        encode_text(text_model, tokenizer, "a cat")
    with pytest.raises(ValueError, match="empty"):
        encode_text(text_model, tokenizer, [])
