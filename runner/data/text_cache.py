"""Text-embedding cache: CLIP-G outputs keyed by (caption, encoder identity).

One bf16 safetensors file per caption: hidden [77, 1280] + pooled [1, 1280] = 199,680 bytes of
tensor data (about 0.2 MB). The encoder is a plain callable so this module does not depend on
how the text encoder is built.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from runner.data.store import entry_path, load_entry, save_entry

EncodeText = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]  # -> [B,77,C], [B,1,C]


class TextCache:
    """Get-or-encode for caption embeddings; counts hits and misses."""

    def __init__(self, cache_dir: str | Path, encoder_identity: str, dtype: torch.dtype = torch.bfloat16):
        if not encoder_identity:
            raise ValueError("encoder_identity must name the text encoder (e.g. its weights' hash)")
        self.root = Path(cache_dir)
        self.encoder_identity = encoder_identity
        self.dtype = dtype
        self.hits = 0
        self.misses = 0

    def key(self, caption: str) -> str:
        return hashlib.sha256(f"{self.encoder_identity}\0{caption}".encode()).hexdigest()

    def path(self, caption: str) -> Path:
        return entry_path(self.root, self.key(caption))

    def contains(self, caption: str) -> bool:
        return self.path(caption).is_file()

    def get(
        self, captions: Sequence[str], encode_text: EncodeText, batch_size: int = 32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden [B,77,C], pooled [B,1,C]) in the cache dtype; misses are encoded and stored."""
        found: dict[str, dict[str, torch.Tensor]] = {}
        for cap in dict.fromkeys(captions):
            entry = load_entry(self.path(cap))
            if entry is not None:
                found[cap] = entry
        missing = [c for c in dict.fromkeys(captions) if c not in found]
        self.misses += len(missing)  # each new caption is encoded once, even if repeated in the batch
        self.hits += len(captions) - len(missing)
        found.update(self._encode_and_store(missing, encode_text, batch_size))
        hidden = torch.stack([found[c]["hidden"] for c in captions])  # [B,77,C]
        pooled = torch.stack([found[c]["pooled"] for c in captions])  # [B,1,C]
        return hidden, pooled

    def precompute(self, captions: Sequence[str], encode_text: EncodeText, batch_size: int = 32) -> int:
        """Encode every caption not cached yet; returns how many were encoded."""
        missing = [c for c in dict.fromkeys(captions) if not self.contains(c)]
        self.misses += len(missing)
        self._encode_and_store(missing, encode_text, batch_size)
        return len(missing)

    def _encode_and_store(
        self, captions: list[str], encode_text: EncodeText, batch_size: int
    ) -> dict[str, dict[str, torch.Tensor]]:
        out: dict[str, dict[str, torch.Tensor]] = {}
        for i in range(0, len(captions), batch_size):
            chunk = captions[i : i + batch_size]
            with torch.no_grad():
                hidden, pooled = encode_text(chunk)
            if hidden.dim() != 3 or pooled.dim() != 3 or hidden.shape[0] != len(chunk):
                raise ValueError(
                    f"encode_text must return hidden [B,77,C] and pooled [B,1,C]; got "
                    f"{tuple(hidden.shape)} and {tuple(pooled.shape)} for B={len(chunk)}"
                )
            for j, cap in enumerate(chunk):
                entry = {"hidden": hidden[j].to(self.dtype).cpu(), "pooled": pooled[j].to(self.dtype).cpu()}
                save_entry(self.path(cap), entry, {"encoder": self.encoder_identity})
                out[cap] = entry
        return out
