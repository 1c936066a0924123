"""GPU memory estimate, model sizes and measured int8 cost for `runner plan`, without allocating weights.

Stage C is built on the `meta` device (shapes only), so parameter counts, LoRA sizes and the int8 split are
exact for the recipe's flavour; nothing is read from disk. The activation term is a calibrated linear model:

    activations = k[compute dtype][checkpointing] * B * h * w * S

with B the micro-batch, h x w the latent cells of the largest bucket and S = sum over levels of
c_hidden * (down + up blocks * repeats) (the "block width"; 131072 for stage-c, 49152 for stage-c-lite).
Every Stage C level runs at the full h x w grid, so memory is linear in B * h * w * S. The k constants are
bytes per unit, derived from peak memory measured on an H200 (stage-c, batch 4, 24x24 latents, LoRA rank
16 on attention; B*h*w*S = 301,989,888):

* bf16 (bf16 weights, or int8 base under autocast): peak 17.9 GiB (bf16 base, 6.73 GiB weights) and
  14.6 GiB (int8 base, 3.45 GiB) without checkpointing -> both leave 11.0 GiB -> k = 39.2 B;
  10.3 / 7.0 GiB with checkpointing -> 3.42 GiB -> k = 12.2 B.
* fp32 (mixed_precision: no): issue 12's fp32 row, 34.7 GiB peak (13.37 GiB weights) -> 21.2 GiB ->
  k = 75.3 B; it predicts the stage-c-lite row (11.9 GiB) within 0.1 GiB. With checkpointing it was not
  measured: scaled from bf16 by the same fp32/bf16 ratio (1.92) -> k = 23.4 B.
* bf16 autocast over fp32 base weights also keeps the bf16 copy of every weight a matmul saves for backward
  (frozen weights are not in autocast's cast cache): + 2 bytes per parameter without checkpointing.

Weights: parameters in their storage dtype (int8 base: int8 linear weights + fp32 scales + the rest in the
base dtype; LoRA weights fp32). Trainable state: LoRA gradient + two AdamW moments, fp32 = 12 B per
parameter; full fine-tuning: gradient in the weight dtype + optimizer moments (OPTIMIZER_STATE_BYTES).
Frozen helpers on the same device (text encoder, EfficientNet, validation decoders) are fp32.
Figures are what PyTorch allocates; the CUDA context adds about 0.5-1 GiB.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from runner.spec import Recipe

GIB = 1024**3
# bytes per B*h*w*S unit: (compute, gradient checkpointing) -> k  (derivation in the module docstring)
ACTIVATION_BYTES = {("bf16", False): 39.2, ("bf16", True): 12.2, ("fp32", False): 75.3, ("fp32", True): 23.4}
# optimizer moments per trainable parameter, as a multiple of the parameter's own bytes (or absolute)
OPTIMIZER_STATE_BYTES = {"adamw": "2x", "adamw_bf16": "2x", "adamw8bit": 2, "adafactor": 0}

# Parameter counts of the hub-layout helpers, for when their files are not local yet
# (source: the key manifests of the real checkpoints, shared/reference/manifests/summary.json).
KNOWN_PARAMS = {
    "text_encoder": 694_659_840,
    "effnet": 20_351_983,
    "previewer": 3_983_755,
    "decoder": 1_562_941_136,
    "decoder_lite": 699_471_248,
    "stage_a": 18_406_903,
}

# Measured on an H200 (2026-11-29), RANDOM weights (real stage-c config), one fixed batch: output
# difference of the int8-base model against the same weights in bf16; outputs' mean magnitude 0.90.
INT8_QUALITY = {
    "measured": "H200, 2026-11-29, random weights (stage-c config), fixed batch, vs bf16",
    "output_mean_abs": 0.90,
    "int8": {"max_abs_diff": 0.059, "mean_abs_diff": 0.0129},
    "int8-torchao": {"max_abs_diff": 0.070, "mean_abs_diff": 0.016},
    "int8-bnb": {"max_abs_diff": 0.070, "mean_abs_diff": 0.014},
}


@dataclass(frozen=True)
class PriorSizes:
    """Element counts of Stage C for one flavour, from a meta-device build."""

    params: int
    block_width: int  # S of the activation formula
    lora_params: int
    int8_elements: int  # weights stored as int8 when the base is quantized
    int8_scales: int  # fp32 per-output-channel scales
    int8_rest: int  # everything else, kept in the base dtype


def prior_sizes(recipe: Recipe) -> PriorSizes:
    """Stage C of the recipe's flavour on `meta`: exact counts, no memory, well under a few seconds."""
    from cascade_core.models.stage_c import StageC, StageCConfig

    cfg = StageCConfig.preset(recipe.model.flavour)

    def meta_model() -> torch.nn.Module:
        return StageC(cfg, device="meta", dtype=torch.bfloat16)

    model = meta_model()
    params = sum(p.numel() for p in model.parameters())
    n = len(cfg.c_hidden)
    width = sum(
        cfg.c_hidden[i]
        * (
            cfg.blocks[0][i] * cfg.block_repeat[0][i]
            + cfg.blocks[1][n - 1 - i] * cfg.block_repeat[1][n - 1 - i]
        )
        for i in range(n)
    )
    lora = 0
    if recipe.training.mode == "lora":
        from runner.build import attach_lora

        before = {id(p) for p in model.parameters()}
        attach_lora(model, _without_init_weights(recipe))
        lora = sum(p.numel() for p in model.parameters() if id(p) not in before)
    q8 = scales = rest = 0
    if recipe.training.precision.base_weights != "no_change":
        from cascade_core.quant.int8 import quantize_model_

        quantized = meta_model()
        quantize_model_(quantized, "int8")  # the pure-PyTorch split; the other backends store alike
        for t in [*quantized.parameters(), *quantized.buffers()]:
            if t.dtype == torch.int8:
                q8 += t.numel()
            elif t.dtype == torch.float32:
                scales += t.numel()
            else:
                rest += t.numel()
    return PriorSizes(params, width, lora, q8, scales, rest)


def _without_init_weights(recipe: Recipe) -> Recipe:
    """The recipe with no LoRA file to load (sizes only; a meta model cannot take values)."""
    import dataclasses

    lora = dataclasses.replace(recipe.training.lora, init_weights=None)
    return dataclasses.replace(recipe, training=dataclasses.replace(recipe.training, lora=lora))


def safetensors_params(path: Path) -> int | None:
    """Element count of a safetensors file or of a folder's weights, from the headers only."""
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        plain = [f for f in files if not any(v in f.name for v in (".fp16.", ".bf16.", ".fp32."))]
        files = plain or files
    else:
        files = [path] if path.suffix == ".safetensors" and path.is_file() else []
    if not files:
        return None
    total = 0
    try:
        for f in files:
            with open(f, "rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(size))
            for key, info in header.items():
                if key != "__metadata__":
                    count = 1
                    for d in info["shape"]:
                        count *= d
                    total += count
    except (OSError, struct.error, ValueError, KeyError, TypeError):
        return None  # not a readable safetensors file: the caller falls back to the known counts
    return total


def _bytes(dtype: str) -> int:
    return {"fp32": 4, "bf16": 2, "int8": 1}[dtype]


def estimate_memory(
    recipe: Recipe, sizes: PriorSizes, latent_hw: tuple[int, int], helper_params: dict[str, int]
) -> dict:
    """The estimate as a dict of GiB figures, each part named, plus the formula in words."""
    training, precision = recipe.training, recipe.training.precision
    bf16 = precision.mixed_precision == "bf16"
    base = "bf16" if bf16 and precision.bf16_mode == "bf16_weights" else "fp32"
    compute = "bf16" if precision.mixed_precision != "no" else "fp32"
    int8 = precision.base_weights != "no_change"
    if int8:
        weights = sizes.int8_elements + 4 * sizes.int8_scales + _bytes(base) * sizes.int8_rest
        stored = f"int8 ({precision.base_weights}) + fp32 scales, other tensors {base}"
    else:
        weights = _bytes(base) * sizes.params
        stored = base
    if training.mode == "lora":
        trainable = 12 * sizes.lora_params  # the fp32 LoRA weights themselves are counted in weights
        trainable_note = f"{sizes.lora_params:,} LoRA params: fp32 grad + 2 AdamW moments"
        weights_total = weights + 4 * sizes.lora_params
    else:
        own = _bytes(base)
        state = OPTIMIZER_STATE_BYTES[training.optimizer.name]
        per = own + (2 * own if state == "2x" else state)
        trainable = per * sizes.params
        trainable_note = f"{sizes.params:,} params x (grad {own} B + {training.optimizer.name} state)"
        weights_total = weights
    b, (h, w) = training.batch_size, latent_hw
    ckpt = training.gradient_checkpointing
    units = b * h * w * sizes.block_width
    activations = ACTIVATION_BYTES[(compute, ckpt)] * units
    autocast_copies = 0
    if compute == "bf16" and base == "fp32" and not int8 and not ckpt:
        autocast_copies = 2 * sizes.params
    helpers = {name: 4 * n for name, n in helper_params.items()}
    total = weights_total + trainable + activations + autocast_copies + sum(helpers.values())
    gib = lambda x: round(x / GIB, 2)  # noqa: E731
    return {
        "weights_gib": gib(weights_total),
        "weights_dtype": stored,
        "trainable_state_gib": gib(trainable),
        "trainable_note": trainable_note,
        "activations_gib": gib(activations + autocast_copies),
        "activations_note": (
            f"k={ACTIVATION_BYTES[(compute, ckpt)]} B x batch {b} x {h}x{w} latents x "
            f"S={sizes.block_width:,} ({compute}, gradient checkpointing "
            f"{'on' if ckpt else 'off'})"
            + (" + bf16 weight copies saved by autocast" if autocast_copies else "")
        ),
        "stage_c_step_gib": gib(total - sum(helpers.values())),
        "helpers_gib": {k: gib(v) for k, v in helpers.items()},
        "total_gib": gib(total),
        "formula": "weights + trainable state + k*B*h*w*S (+ frozen fp32 helpers); calibrated on H200 "
        "measurements, see runner/memory_estimate.py",
    }


def rollout_cost(recipe: Recipe, steps: int | None) -> dict | None:
    """Expected extra forward passes per step of scheduled sampling = probability x mean offset."""
    ss = recipe.training.scheduled_sampling
    if not ss.enabled:
        return None
    from cascade_core.diffusion.rollout import offset_distribution, rollout_probability

    dist = offset_distribution(ss.max_offset, ss.offset_strategy)
    mean_k = float((dist * torch.arange(1, ss.max_offset + 1, dtype=dist.dtype)).sum())
    shape = "constant" if ss.ramp == "none" else ss.ramp
    p_end = ss.probability if ss.ramp == "none" else ss.probability_end

    def p_at(step: int) -> float:
        return rollout_probability(
            step,
            shape=shape,
            p_start=ss.probability_start,
            p_end=p_end,
            ramp_steps=ss.ramp_steps,
            start_step=ss.start_step,
        )

    n = steps or 1
    sample = range(0, n, max(1, n // 2000))  # the run's mean p, from at most ~2000 evaluations
    p_mean = sum(p_at(s) for s in sample) / len(sample)
    b = recipe.training.batch_size * recipe.training.gradient_accumulation_steps
    return {
        "mean_offset": round(mean_k, 3),
        "p_first_step": p_at(0),
        "p_last_step": p_at(n - 1),
        "p_mean": round(p_mean, 4),
        "extra_forwards_per_step": round(p_mean * mean_k, 3),
        "extra_sample_forwards_per_step": round(p_mean * mean_k * b, 2),
        "note": "no-grad forward passes, in units of one full-batch forward (extra per-sample forwards = "
        "that x batch x accumulation); logged as rollout_forwards",
    }
