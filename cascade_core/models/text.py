"""CLIP-G text conditioning exactly as Stage C was trained with it (FACTS_official §9).

Prompts are padded (and truncated) to tokenizer.model_max_length (77); input ids and the attention
mask go to CLIPTextModelWithProjection with output_hidden_states=True. clip_text is
hidden_states[-1], the last layer's output *before* the final LayerNorm (not last_hidden_state);
clip_text_pooled is text_embeds [B, 1, 1280]; clip_img is zeros [B, 1, 768]. The unconditional and
caption-dropout input is the encoding of "" (not zeros). Takes model objects, never hub ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

CLIP_IMG_DIM = 768  # CLIP ViT-L/14 image_embeds width Stage C expects


@dataclass(frozen=True)
class TextConditioning:
    """The three conditioning tensors Stage C takes, named as its forward arguments."""

    clip_text: Tensor  # [B, 77, 1280]
    clip_text_pooled: Tensor  # [B, 1, 1280]
    clip_img: Tensor  # [B, 1, 768]

    def as_dict(self) -> dict[str, Tensor]:
        """{'clip_text', 'clip_text_pooled', 'clip_img'}: keyword arguments for Stage C."""
        return {
            "clip_text": self.clip_text,
            "clip_text_pooled": self.clip_text_pooled,
            "clip_img": self.clip_img,
        }

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> TextConditioning:
        """All three tensors moved/cast together."""
        return TextConditioning(*(v.to(device=device, dtype=dtype) for v in self.as_dict().values()))


def tokenize(tokenizer: CLIPTokenizer, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask), both [B, model_max_length], padded to max length and truncated."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a list of strings; wrap a single prompt as [prompt]")
    if len(prompts) == 0:
        raise ValueError("prompts is empty; pass at least one prompt (use '' for the unconditional one)")
    max_length = tokenizer.model_max_length
    if not isinstance(max_length, int) or max_length > 4096:
        raise ValueError(
            f"tokenizer.model_max_length is {max_length!r}; load the tokenizer with its "
            "tokenizer_config.json (CLIP-G uses 77)"
        )
    enc = tokenizer(
        list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    )
    return enc["input_ids"], enc["attention_mask"]


@torch.no_grad()
def encode_text(
    text_model: CLIPTextModelWithProjection,
    tokenizer: CLIPTokenizer,
    prompts: Sequence[str],
    *,
    dtype: torch.dtype | None = None,
    clip_img_dim: int = CLIP_IMG_DIM,
) -> TextConditioning:
    """Encode prompts with the frozen text tower; outputs on its device, in `dtype` (default: its own)."""
    input_ids, attention_mask = tokenize(tokenizer, prompts)
    max_positions = text_model.config.max_position_embeddings
    if input_ids.shape[1] > max_positions:
        raise ValueError(
            f"tokenizer pads to {input_ids.shape[1]} tokens but the text model has only {max_positions} "
            "positions; use the tokenizer that belongs to this text encoder"
        )
    device = next(text_model.parameters()).device
    out = text_model(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), output_hidden_states=True
    )
    clip_text = out.hidden_states[-1]  # [B, 77, C] before final_layer_norm
    pooled = out.text_embeds.unsqueeze(1)  # [B, C_proj] -> [B, 1, C_proj]
    dtype = clip_text.dtype if dtype is None else dtype
    clip_img = torch.zeros(clip_text.shape[0], 1, clip_img_dim, device=device, dtype=dtype)
    return TextConditioning(clip_text.to(dtype), pooled.to(dtype), clip_img)


def empty_text_conditioning(
    text_model: CLIPTextModelWithProjection,
    tokenizer: CLIPTokenizer,
    batch_size: int,
    *,
    dtype: torch.dtype | None = None,
    clip_img_dim: int = CLIP_IMG_DIM,
) -> TextConditioning:
    """The encoding of "" repeated batch_size times: unconditional input and caption-dropout replacement."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    one = encode_text(text_model, tokenizer, [""], dtype=dtype, clip_img_dim=clip_img_dim)
    return TextConditioning(*(v.repeat(batch_size, 1, 1) for v in one.as_dict().values()))


def drop_captions(cond: TextConditioning, empty: TextConditioning, drop: Tensor) -> TextConditioning:
    """Replace the text of samples where drop [B] is True by the empty-caption encoding ([1] or [B]).

    clip_img is left as is: image-embedding dropout is a separate decision.
    """
    batch = cond.clip_text.shape[0]
    if drop.shape != (batch,) or drop.dtype != torch.bool:
        raise ValueError(
            f"drop must be a bool tensor of shape [{batch}], got {drop.dtype} {tuple(drop.shape)}"
        )
    mask = drop.to(cond.clip_text.device).view(-1, 1, 1)
    return TextConditioning(
        torch.where(mask, empty.clip_text.to(cond.clip_text), cond.clip_text),
        torch.where(mask, empty.clip_text_pooled.to(cond.clip_text_pooled), cond.clip_text_pooled),
        cond.clip_img,
    )
