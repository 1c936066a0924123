"""Write a folder of TINY RANDOM models laid out like the Stable Cascade hub repositories.

    python tools/make_tiny_checkpoints.py tiny_ckpts/ [--seed 0] [--force]

Every loader and the whole sampling pipeline then run offline, on CPU, in seconds, exactly as they do on
`stabilityai/stable-cascade` (+ `-prior`). The weights are random: images made with them are noise.

Layout (root single files in Stability's key layout, subfolders in diffusers' layout):
  stage_c.safetensors, prior/        Stage C preset 'tiny' (c_cond 32, widths 32/48)
  stage_c_lite.safetensors, prior_lite/  a second prior, detected as flavour 'custom': c_cond 64, widths
                                     64/64, fewer blocks. As with the real pair (2048 vs 1536),
                                     `clip_txt_mapper.weight.shape[0]` tells the two apart (32 vs 64).
  stage_b.safetensors, decoder/      Stage B preset 'tiny' (widths 16/24/32/32)
  stage_b_lite.safetensors, decoder_lite/  narrower Stage B (widths 16/20/28/28; detected 'custom')
  stage_a.safetensors, vqgan/        Stage A, 2 levels, width 16, codebook 16; the same weights in both,
                                     scale factor 0.43 in the single file and 0.3764 in vqgan/config.json,
                                     as on the hub
  effnet_encoder.safetensors         the real EfficientNetV2-S architecture (our module has no reduced
                                     variant), random, stored in fp16 (~40 MB) to keep the folder small
  previewer.safetensors              Previewer with c_hidden 16
  text_encoder/, tokenizer/          a 2-layer CLIPTextModelWithProjection and a character-level CLIP BPE
                                     tokenizer (77 tokens), both via save_pretrained
  manifest.json, README.txt          what this is, the dimensions, and a sha256 of every file

Consistent widths (what the real models have in brackets): text hidden = Stage C c_clip_text = 24 (1280),
text projection = Stage C c_clip_text_pooled = Stage B c_clip = 24 (1280), Stage C c_clip_img = 20 (768,
pass it to encode_text as clip_img_dim), Stage C latent 16 channels (16), Stage A latent 4 channels (4).

A complete folder made with the same seed is left as it is; one made by this tool with another seed, or
left incomplete, is rewritten; a folder holding anything else is refused unless --force is given (which
writes our files into it and leaves other files alone).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cascade_core.decoder_io import save_effnet, save_previewer, save_stage_a, save_stage_b
from cascade_core.models.effnet import EfficientNetEncoder
from cascade_core.models.previewer import Previewer
from cascade_core.models.stage_a import StageA
from cascade_core.models.stage_b import StageB, StageBConfig
from cascade_core.models.stage_c import StageC, StageCConfig
from cascade_core.stage_c_io import save_stage_c

FORMAT = "cascade-runner-tiny-checkpoints/1"
TEXT_HIDDEN = 24
TEXT_PROJECTION = 24
CLIP_IMG = 20
MAX_LENGTH = 77

STAGE_C = StageCConfig.preset("tiny")
STAGE_C_LITE = StageCConfig(
    c_cond=64,
    c_hidden=(64, 64),
    nhead=(1, 1),  # = width / 64, what the single-file loader infers for non-preset widths
    blocks=((1, 1), (1, 1)),
    c_clip_text=TEXT_HIDDEN,
    c_clip_text_pooled=TEXT_PROJECTION,
    c_clip_img=CLIP_IMG,
)
STAGE_B = StageBConfig.preset("tiny")
STAGE_B_LITE = StageBConfig.preset(
    "tiny",
    c_hidden=(16, 20, 28, 28),
    blocks=((1, 1, 1, 1), (1, 1, 1, 1)),
    block_repeat=((1, 1, 1, 1), (2, 2, 2, 2)),
)
STAGE_A = {"levels": 2, "bottleneck_blocks": 1, "c_hidden": 16, "c_latent": 4, "codebook_size": 16}
STAGE_A_SCALE = 0.43  # stage_a.safetensors (official code)
VQGAN_SCALE = 0.3764  # the hub's vqgan/config.json (diffusers' PaellaVQModel)
PREVIEWER_HIDDEN = 16

# Character-level CLIP BPE: every letter and digit alone and word-final, plus a few merges.
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"
_PUNCT = ".,!?'-:;()"
_MERGES = ["c a", "ca t</w>", "d o", "do g</w>", "r e", "re d</w>", "t h", "th e</w>"]

README = """TINY RANDOM TEST CHECKPOINTS - NOT Stable Cascade weights.

Written by cascade-runner's tools/make_tiny_checkpoints.py (seed {seed}). The folder is laid out like the
stabilityai/stable-cascade and stable-cascade-prior hub repositories so loaders and pipelines can be
tested offline. Every model is a few thousand parameters (EfficientNet: the real architecture, random,
fp16). Images sampled with these weights are noise. See manifest.json for dimensions and checksums.
"""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@torch.no_grad()
def randomize(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Deterministic non-zero weights everywhere (official inits zero some outputs, which would make the
    tiny models ignore their inputs): matrices and kernels N(0, 1/fan_in), norm scales 1 + N(0, 0.1^2),
    other vectors N(0, 0.1^2). BatchNorm running statistics keep their defaults (mean 0, var 1)."""
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=generator)
        if p.dim() >= 2:
            p.copy_(noise / (p[0].numel() ** 0.5))  # [out, fan_in...] -> std 1/sqrt(fan_in)
        elif name.endswith("weight"):
            p.copy_(1 + 0.1 * noise)
        else:
            p.copy_(0.1 * noise)
    return module


def write_tokenizer(folder: Path) -> Any:
    """A small CLIPTokenizer saved with save_pretrained (+ vocab.json, merges.txt); returns it."""
    from transformers import CLIPTokenizer

    tokens = [*_CHARS, *_PUNCT, *(c + "</w>" for c in _CHARS + _PUNCT)]
    tokens += ["".join(m.split()) for m in _MERGES] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp)
        (raw / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}))
        (raw / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n")
        tokenizer = CLIPTokenizer(
            str(raw / "vocab.json"), str(raw / "merges.txt"), model_max_length=MAX_LENGTH
        )
        tokenizer.save_pretrained(str(folder))
        for name in ("vocab.json", "merges.txt"):  # the hub folder has them; older transformers need them
            shutil.copyfile(raw / name, folder / name)
    return tokenizer


def write_text_encoder(folder: Path, tokenizer: Any, seed: int) -> None:
    """A 2-layer CLIPTextModelWithProjection (hidden 24, projection 24) via save_pretrained."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=TEXT_PROJECTION,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # transformers initialises from the global generator
        model = CLIPTextModelWithProjection(config).eval()
    model.save_pretrained(str(folder), safe_serialization=True)


def _writers(seed: int) -> list[tuple[str, Callable[[Path], None]]]:
    """(path relative to the folder, function writing it); each model gets its own generator."""

    def gen(offset: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed * 1000 + offset)

    def build(cls: type, *args: Any, offset: int, **kwargs: Any) -> nn.Module:
        with torch.device("meta"):
            model = cls(*args, **kwargs)
        model = model.to_empty(device="cpu")
        for name, b in model.named_buffers():  # BatchNorm statistics: mean 0, var 1, count 0
            b.copy_(torch.ones_like(b) if name.endswith("running_var") else torch.zeros_like(b))
        return randomize(model, gen(offset)).eval()

    stage_c = build(StageC, STAGE_C, offset=1)
    stage_c_lite = build(StageC, STAGE_C_LITE, offset=2)
    stage_b = build(StageB, STAGE_B, offset=3)
    stage_b_lite = build(StageB, STAGE_B_LITE, offset=4)
    stage_a = build(StageA, **STAGE_A, scale_factor=STAGE_A_SCALE, offset=5)
    vqgan = StageA(**STAGE_A, scale_factor=VQGAN_SCALE)
    vqgan.load_state_dict(stage_a.state_dict())
    tokenizer_holder: list[Any] = []

    def tokenizer(p: Path) -> None:
        tokenizer_holder.append(write_tokenizer(p))

    return [
        ("stage_c.safetensors", lambda p: save_stage_c(stage_c, p)),
        ("stage_c_lite.safetensors", lambda p: save_stage_c(stage_c_lite, p)),
        ("prior", lambda p: save_stage_c(stage_c, p, layout="diffusers")),
        ("prior_lite", lambda p: save_stage_c(stage_c_lite, p, layout="diffusers")),
        ("stage_b.safetensors", lambda p: save_stage_b(stage_b, p)),
        ("stage_b_lite.safetensors", lambda p: save_stage_b(stage_b_lite, p)),
        ("decoder", lambda p: save_stage_b(stage_b, p, layout="diffusers")),
        ("decoder_lite", lambda p: save_stage_b(stage_b_lite, p, layout="diffusers")),
        ("stage_a.safetensors", lambda p: save_stage_a(stage_a, p)),
        ("vqgan", lambda p: save_stage_a(vqgan, p, layout="diffusers")),
        (
            "previewer.safetensors",
            lambda p: save_previewer(build(Previewer, c_hidden=PREVIEWER_HIDDEN, offset=6), p),
        ),
        (
            "effnet_encoder.safetensors",
            lambda p: save_effnet(build(EfficientNetEncoder, offset=7), p, dtype=torch.float16),
        ),
        ("tokenizer", tokenizer),
        ("text_encoder", lambda p: write_text_encoder(p, tokenizer_holder[0], seed)),
    ]


def dimensions() -> dict[str, Any]:
    """The widths that tie the tiny models together (also written to manifest.json)."""
    return {
        "text_hidden": TEXT_HIDDEN,
        "text_projection": TEXT_PROJECTION,
        "clip_img": CLIP_IMG,
        "max_length": MAX_LENGTH,
        "stage_c": STAGE_C.to_dict(),
        "stage_c_lite": STAGE_C_LITE.to_dict(),
        "stage_b": STAGE_B.to_dict(),
        "stage_b_lite": STAGE_B_LITE.to_dict(),
        "stage_a": {**STAGE_A, "scale_factor": STAGE_A_SCALE, "vqgan_scale_factor": VQGAN_SCALE},
        "previewer_hidden": PREVIEWER_HIDDEN,
        "effnet": "EfficientNetV2-S features + mapper to 16 channels, fp16",
    }


def _checksums(folder: Path, written: list[str]) -> dict[str, str]:
    """sha256 of every file under the written entries (files, or folders of files)."""
    files = []
    for rel in written:
        path = folder / rel
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {p.relative_to(folder).as_posix(): _sha256(p) for p in files}


def is_complete(folder: Path, seed: int) -> bool:
    """True when `folder` holds a tiny-checkpoint set of this format and seed with every file intact."""
    manifest = folder / "manifest.json"
    try:
        data = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("seed") != seed:
        return False
    files = data.get("files")
    if not isinstance(files, dict) or not files:
        return False
    return all((folder / rel).is_file() and _sha256(folder / rel) == sha for rel, sha in files.items())


def is_ours(folder: Path) -> bool:
    """True when the folder was (at least partly) written by this tool, with any seed."""
    try:
        return (folder / "README.txt").read_text().startswith(README[:40])
    except OSError:
        return False


class FolderInUse(Exception):
    """The output folder holds something else; the message says how to proceed."""


def make_tiny_checkpoints(out_dir: str | Path, *, seed: int = 0, force: bool = False) -> Path:
    """Write (or keep, when already complete) the tiny checkpoint folder; returns its path."""
    folder = Path(out_dir)
    if is_complete(folder, seed):
        return folder
    if folder.exists() and not folder.is_dir():
        raise FolderInUse(f"{folder} is a file; give a folder path")
    if folder.is_dir() and any(folder.iterdir()) and not force and not is_ours(folder):
        raise FolderInUse(
            f"{folder} is not empty and is not a tiny-checkpoint folder; pass --force to write into it "
            "anyway, or choose an empty folder"
        )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").unlink(missing_ok=True)  # incomplete until the end
    (folder / "README.txt").write_text(README.format(seed=seed))  # first: marks the folder as ours
    written = ["README.txt"]
    for rel, write in _writers(seed):
        write(folder / rel)
        written.append(rel)
    manifest = {
        "format": FORMAT,
        "warning": "tiny random weights for tests; NOT Stable Cascade",
        "seed": seed,
        "dimensions": dimensions(),
        "files": _checksums(folder, written),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=Path, help="folder to write (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    p.add_argument("--force", action="store_true", help="overwrite a folder that holds something else")
    args = p.parse_args(argv)
    try:
        folder = make_tiny_checkpoints(args.out_dir, seed=args.seed, force=args.force)
    except FolderInUse as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"tiny random checkpoints (seed {args.seed}) in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
