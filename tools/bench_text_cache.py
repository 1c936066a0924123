"""Text-embedding cache throughput with the real-size CLIP-G text tower: prompts/s end to end, JSON out.

    python tools/bench_text_cache.py --out bench_text_cache.json [--prompts 2048]

The tower is `CLIPTextModelWithProjection` with CLIP-G's shape (hidden 1280, 32 layers, 20 heads,
MLP 5120, projection 1280, 77 positions) and random weights, built on meta and materialized on the
GPU. The tokenizer is a word-level `PreTrainedTokenizerFast` over a synthetic 49,408-word vocabulary
(the real BPE files cannot be downloaded here; both are Rust tokenizers padding to 77). Each case
runs what `runner cache` runs: `TextCache.precompute` with `cascade_core.models.text.encode_text`,
writing one safetensors file per prompt; encode-only time is measured separately so the table shows
whether the encoder or the writes bound it. Precision `fp32` is TF32-off float32, `tf32` float32
with TF32 matmuls, `bf16` the tower held in bfloat16 (entries are stored in bf16 in every case).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cascade_core.models.text import encode_text  # noqa: E402
from runner.data.text_cache import TextCache  # noqa: E402

VOCAB = 49408
DEFAULT_CASES = ["fp32:64", "tf32:4", "tf32:64", "bf16:64", "bf16:256"]


def clip_g(device: torch.device, layers: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=VOCAB,
        hidden_size=1280,
        intermediate_size=5120,
        projection_dim=1280,
        num_hidden_layers=layers,
        num_attention_heads=20,
        max_position_embeddings=77,
        hidden_act="gelu",
    )
    with torch.device("meta"):
        model = CLIPTextModelWithProjection(config)
    model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
        model.text_model.embeddings.position_ids.copy_(torch.arange(77, device=device)[None])
    return model.eval().requires_grad_(False)


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"<pad>": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", model_max_length=77)


def prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(VOCAB - 1)}" for _ in range(rng.randint(8, 60))) for _ in range(n)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(case: str, model, tok, n: int, device: torch.device, root: Path, seed: int) -> dict:
    precision, batch = case.split(":")
    batch = int(batch)
    torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model.to(dtype)

    def encode(chunk: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        cond = encode_text(model, tok, chunk, dtype=dtype)
        return cond.clip_text, cond.clip_text_pooled

    encode(prompts(batch, seed=99))  # warm-up: kernels, autotuning
    todo = prompts(n, seed=seed)  # new prompts per case: every one is a cache miss
    sync(device)
    start = time.perf_counter()
    for i in range(0, n, batch):
        encode(todo[i : i + batch])
    sync(device)
    encode_s = time.perf_counter() - start
    cache = TextCache(root / case.replace(":", "_"), encoder_identity=f"bench-{case}")
    start = time.perf_counter()
    written = cache.precompute(todo, encode, batch_size=batch)
    sync(device)
    total_s = time.perf_counter() - start
    return {
        "case": case,
        "precision": precision,
        "batch": batch,
        "prompts": written,
        "prompts_per_s": round(written / total_s, 1),
        "encode_only_prompts_per_s": round(n / encode_s, 1),
        "write_share_pct": round(100 * max(0.0, total_s - encode_s) / total_s, 1),
        "seconds": round(total_s, 2),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="*", default=DEFAULT_CASES, help="precision:batch")
    parser.add_argument("--prompts", type=int, default=2048)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=32, help="fewer only for a quick CPU smoke run")
    parser.add_argument("--out", default="bench_text_cache.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    start = time.perf_counter()
    model, tok = clip_g(device, args.layers), tokenizer()
    report: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "build_s": round(time.perf_counter() - start, 1),
        "target_prompts_per_s": 500,
        "results": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for i, case in enumerate(args.cases):
            report["results"].append(run_case(case, model, tok, args.prompts, device, Path(tmp), seed=i))
            print(json.dumps(report["results"][-1]), flush=True)
            Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
