"""Write REAL-SIZE random checkpoints laid out like the Stable Cascade hub repositories (for GPU runs).

    python tools/synthesize_checkpoints.py OUT_DIR [--device cuda] [--priors stage-c,stage-c-lite]

Real architectures (Stage C 3.6B and/or lite 1B in `prior/` and `prior_lite/`, Stage B lite in
`decoder_lite/`, Stage A in `vqgan/`, EfficientNet, Previewer, a CLIP ViT-bigG-sized text tower) with random
weights, stored in bf16 like the hub's files (fp32 for the small ones). Loading, memory and speed then
behave as with the real weights; the images are noise. The tokenizer is the tiny character-level one of
tools/make_tiny_checkpoints.py (the real vocabulary cannot be downloaded here); the text tower's vocabulary
is sized to it. Weights are drawn on `--device` so 3.6B parameters take seconds.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))

from make_tiny_checkpoints import write_tokenizer  # noqa: E402

from cascade_core.decoder_io import save_effnet, save_previewer, save_stage_a, save_stage_b  # noqa: E402
from cascade_core.models.effnet import EfficientNetEncoder  # noqa: E402
from cascade_core.models.previewer import Previewer  # noqa: E402
from cascade_core.models.stage_a import StageA  # noqa: E402
from cascade_core.models.stage_b import StageB, StageBConfig  # noqa: E402
from cascade_core.models.stage_c import StageC, StageCConfig  # noqa: E402
from cascade_core.stage_c_io import save_stage_c  # noqa: E402

PRIOR_FOLDERS = {"stage-c": "prior", "stage-c-lite": "prior_lite"}
STAGE_A_REAL = {"levels": 2, "bottleneck_blocks": 12, "c_hidden": 384, "c_latent": 4, "codebook_size": 8192}
BIGG = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
        "projection_dim": 1280, "max_position_embeddings": 77, "hidden_act": "gelu"}


@torch.no_grad()
def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Matrices N(0, 1/fan_in), norm scales 1 + N(0, 0.01), other vectors N(0, 0.01); BN stats 0/1."""
    gen = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=gen)
        elif name.endswith("weight"):
            p.normal_(1.0, 0.1, generator=gen)
        else:
            p.normal_(0.0, 0.1, generator=gen)
    for name, b in module.named_buffers():
        if b.is_floating_point():
            b.fill_(1.0 if name.endswith("running_var") else 0.0)
    return module


def build(cls, *args, device: str, seed: int, **kwargs) -> nn.Module:
    with torch.device("meta"):
        model = cls(*args, **kwargs)
    return randomize_(model.to_empty(device=device), seed).eval()


def write_text_encoder(folder: Path, tokenizer, device: str) -> None:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **BIGG)
    with torch.device(device):
        model = CLIPTextModelWithProjection(config).eval()
    model.to(torch.bfloat16).save_pretrained(str(folder), safe_serialization=True)


def synthesize(out: Path, *, device: str, priors: list[str]) -> dict[str, float]:
    """Write every model; returns seconds per part."""
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def timed(name: str, fn) -> None:
        start = time.perf_counter()
        fn()
        timings[name] = round(time.perf_counter() - start, 2)

    for i, flavour in enumerate(priors):
        def prior(flavour: str = flavour, i: int = i) -> None:
            model = build(StageC, StageCConfig.preset(flavour), device=device, seed=10 + i)
            save_stage_c(model, out / PRIOR_FOLDERS[flavour], layout="diffusers", dtype=torch.bfloat16)
            del model
        timed(PRIOR_FOLDERS[flavour], prior)
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    timed("decoder_lite", lambda: save_stage_b(
        build(StageB, StageBConfig.preset("decoder_lite"), device=device, seed=20), out / "decoder_lite",
        layout="diffusers", dtype=torch.bfloat16))
    timed("vqgan", lambda: save_stage_a(
        build(StageA, **STAGE_A_REAL, scale_factor=0.3764, device=device, seed=21), out / "vqgan",
        layout="diffusers"))
    timed("effnet", lambda: save_effnet(build(EfficientNetEncoder, device=device, seed=22),
                                        out / "effnet_encoder.safetensors", dtype=torch.bfloat16))
    timed("previewer", lambda: save_previewer(build(Previewer, device=device, seed=23),
                                              out / "previewer.safetensors"))
    tokenizer = write_tokenizer(out / "tokenizer")
    timed("text_encoder", lambda: write_text_encoder(out / "text_encoder", tokenizer, device))
    (out / "README.txt").write_text("REAL-SIZE RANDOM WEIGHTS written by tools/synthesize_checkpoints.py; "
                                    "not Stable Cascade weights.\n", encoding="utf-8")
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--priors", default="stage-c,stage-c-lite",
                        help="comma-separated prior flavours to write (stage-c, stage-c-lite)")
    args = parser.parse_args(argv)
    priors = [p for p in args.priors.split(",") if p]
    unknown = sorted(set(priors) - set(PRIOR_FOLDERS))
    if unknown:
        parser.error(f"unknown prior flavours {unknown}; use {sorted(PRIOR_FOLDERS)}")
    print(json.dumps(synthesize(args.out, device=args.device, priors=priors)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
