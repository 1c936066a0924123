"""The one place that maps names in a recipe to objects: sources -> files, flavours -> models, precision ->
dtypes, LoRA / int8 settings -> wrapped modules, data settings -> loader objects.

Every model is built on the meta device and filled straight from its file (cascade_core's loaders); the
frozen parts are put in eval mode with requires_grad off.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from runner.errors import UserError
from runner.spec import Recipe, SourceSpec, WeightsSourceSpec

# precision names in the recipe -> torch dtypes
AUTOCAST_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LORA_INIT = {"peft": "standard", "official": "official"}
LORA_TARGETS = {"attention": "attention", "attention+ffn": "attention+ffn", "all-linear": "all-linear"}


def pick_device(name: str) -> torch.device:
    """`auto` is the GPU when there is one; `cuda` without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device: cuda, but PyTorch sees no CUDA GPU here; use device: cpu (or auto)")
    return torch.device(name)


def resolve_source(spec: SourceSpec | WeightsSourceSpec, what: str) -> Path:
    """A local path for a recipe model source (a hub repo id is fetched through the standard cache)."""
    from runner.hub import HubError, resolve_model_source

    try:
        return resolve_model_source(spec.path, subfolder=spec.subfolder or None, filename=spec.filename,
                                    revision=spec.revision)
    except HubError as err:
        raise UserError(f"{what}: {err}") from None


def _loader_source(spec: SourceSpec | WeightsSourceSpec, what: str) -> tuple[Path, str | None]:
    """(path, subfolder) for cascade_core's loaders: a file when `filename` is set, else root + subfolder."""
    path = resolve_source(spec, what)
    if spec.filename:
        return path, None
    return path, spec.subfolder or None


def weights_identity(path: Path) -> str:
    """A short identity of a weights file or folder (names, sizes, mtimes) for cache keys."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}\n".encode())
    return h.hexdigest()[:16]


def freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


# ---------------------------------------------------------------- the prior
def base_weight_dtype(recipe: Recipe) -> torch.dtype:
    """The dtype the frozen (or fully trained) Stage C weights are held in."""
    precision = recipe.training.precision
    if precision.mixed_precision == "bf16" and precision.bf16_mode == "bf16_weights":
        return torch.bfloat16
    return torch.float32


def build_prior(recipe: Recipe, device: torch.device) -> nn.Module:
    """Stage C loaded from its checkpoint, int8-quantized and LoRA-wrapped as the recipe says."""
    from cascade_core.checkpoint_io import CheckpointError
    from cascade_core.stage_c_io import load_stage_c

    spec = recipe.model.prior
    path, subfolder = _loader_source(spec, "model.prior")
    flavour = None if recipe.model.flavour == "tiny" else recipe.model.flavour
    training = recipe.training
    quantized = training.precision.base_weights != "no_change"
    # int8: load and quantize on the host, so no full-precision copy ever lands on the GPU
    load_device = torch.device("cpu") if quantized else device
    try:
        prior = load_stage_c(path, flavour=flavour, subfolder=subfolder, device=load_device,
                             dtype=base_weight_dtype(recipe))
    except CheckpointError as err:
        raise UserError(f"model.prior ({spec.path}): {err}") from None
    if quantized:
        from cascade_core.quant.int8 import quantize_model_

        # layer by layer: at most one full-precision layer is on the GPU at any time
        quantize_model_(prior, training.precision.base_weights, device=device)
        prior = prior.to(device)
    if training.gradient_checkpointing:
        prior.set_gradient_checkpointing(True)
    if training.mode == "lora":
        freeze(prior)
        attach_lora(prior, recipe)
    else:
        prior.requires_grad_(True)
    from runner.performance import apply_performance

    apply_performance(prior, recipe.performance, device)  # after LoRA / int8, before DDP / FSDP wrapping
    return prior


def attach_lora(prior: nn.Module, recipe: Recipe) -> list[str]:
    """Inject the recipe's LoRA (fp32 adapter weights) and, when given, start from an existing LoRA file."""
    from cascade_core.peft.lora import inject_lora

    lora = recipe.training.lora
    targets: Any = LORA_TARGETS.get(lora.targets)
    if lora.targets == "custom":
        targets = custom_lora_targets(prior, lora.target_patterns)
    try:
        chosen = inject_lora(prior, rank=lora.rank, alpha=lora.alpha, targets=targets, dropout=lora.dropout,
                             init=LORA_INIT[lora.init], dtype=torch.float32)
    except ValueError as err:
        raise UserError(f"training.lora: {err}") from None
    if lora.init_weights:
        from runner.lora_files import load_lora_into

        load_lora_into(prior, lora.init_weights, name="default")
    return chosen


def custom_lora_targets(prior: nn.Module, patterns: tuple[str, ...]) -> list[str]:
    """Target names (module paths; `<attn>.in_proj` for the fused q/k/v) fully matching the recipe's
    regexes."""
    import re

    from cascade_core.peft.lora import lora_target_shapes

    names = list(lora_target_shapes(prior))
    unmatched = [p for p in patterns if not any(re.fullmatch(p, n) for n in names)]
    if unmatched:
        raise UserError(f"training.lora.target_patterns {unmatched} match no LoRA-capable module (regular "
                        f"expressions matched against the whole name); examples: {names[:3]}")
    return [n for n in names if any(re.fullmatch(p, n) for p in patterns)]


# ---------------------------------------------------------------- frozen helpers
@dataclass
class TextEncoder:
    model: nn.Module
    tokenizer: Any
    identity: str
    clip_img_dim: int = 768  # Stage C's c_clip_img; set from the prior once it is loaded

    def encode(self, captions: list[str]):
        from cascade_core.models.text import encode_text

        return encode_text(self.model, self.tokenizer, captions, dtype=torch.float32,
                           clip_img_dim=self.clip_img_dim)

    def empty(self):
        from cascade_core.models.text import empty_text_conditioning

        return empty_text_conditioning(self.model, self.tokenizer, 1, dtype=torch.float32,
                                       clip_img_dim=self.clip_img_dim)


def build_text_encoder(recipe: Recipe, device: torch.device) -> TextEncoder:
    """CLIP-G text tower + tokenizer (transformers) from local folders or the hub."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    model_dir = resolve_source(recipe.model.text_encoder, "model.text_encoder")
    tok_dir = resolve_source(recipe.model.tokenizer, "model.tokenizer")
    model_dir = model_dir / recipe.model.text_encoder.subfolder
    tok_dir = tok_dir / recipe.model.tokenizer.subfolder
    try:
        model = CLIPTextModelWithProjection.from_pretrained(str(model_dir), torch_dtype=torch.float32)
        tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    except (OSError, ValueError) as err:
        raise UserError(f"model.text_encoder / model.tokenizer: could not load from {model_dir} / {tok_dir}: "
                        f"{err}") from None
    model = freeze(model.to(device))
    return TextEncoder(model, tokenizer, identity="clip:" + weights_identity(model_dir))


def build_effnet(recipe: Recipe, device: torch.device) -> tuple[nn.Module, str]:
    from cascade_core.checkpoint_io import CheckpointError
    from cascade_core.decoder_io import load_effnet

    path, subfolder = _loader_source(recipe.model.effnet, "model.effnet")
    try:
        effnet = load_effnet(path, subfolder=subfolder, device=device, dtype=torch.float32)
    except CheckpointError as err:
        raise UserError(f"model.effnet ({recipe.model.effnet.path}): {err}") from None
    return freeze(effnet), "effnet:" + weights_identity(path)


@dataclass
class Decoders:
    """What turns Stage C latents into pictures: the Previewer and/or Stage B + Stage A."""

    previewer: nn.Module | None
    stage_b: nn.Module | None
    stage_a: nn.Module | None


def build_decoders(recipe: Recipe, device: torch.device, *, need_full: bool) -> Decoders:
    from cascade_core.checkpoint_io import CheckpointError
    from cascade_core.decoder_io import load_previewer, load_stage_a, load_stage_b

    model = recipe.model
    previewer = stage_b = stage_a = None
    try:
        if model.previewer is not None:
            path, sub = _loader_source(model.previewer, "model.previewer")
            previewer = freeze(load_previewer(path, subfolder=sub, device=device, dtype=torch.float32))
        if need_full and model.decoder is not None:
            path, sub = _loader_source(model.decoder.source, "model.decoder.source")
            flavour = None if model.decoder.flavour == "tiny" else model.decoder.flavour
            stage_b = freeze(load_stage_b(path, flavour=flavour, subfolder=sub, device=device,
                                          dtype=torch.float32))
            path, sub = _loader_source(model.decoder.stage_a, "model.decoder.stage_a")
            stage_a = freeze(load_stage_a(path, subfolder=sub, device=device, dtype=torch.float32))
    except CheckpointError as err:
        raise UserError(f"validation decoder: {err}") from None
    return Decoders(previewer, stage_b, stage_a)


# ---------------------------------------------------------------- data
def loader_settings(recipe: Recipe) -> dict[str, Any]:
    """The bucket/crop settings the loader shares across sources (they must agree between sources)."""
    keys = ("resolution", "buckets", "crop", "crop_style", "minimum_image_size", "maximum_image_size",
            "target_downsample_size")
    first = recipe.data.sources[0]
    for i, source in enumerate(recipe.data.sources[1:], start=1):
        for key in keys:
            if getattr(source, key) != getattr(first, key):
                raise UserError(f"data.sources.{i}.{key} differs from data.sources.0.{key}; this version "
                                "buckets all sources together, so give every source the same value")
    settings = {key: getattr(first, key) for key in keys}
    settings["buckets"] = tuple(tuple(b) for b in first.buckets) if first.buckets else ()
    settings["minimum_image_size"] = first.minimum_image_size or None
    return settings


def data_sources(recipe: Recipe) -> list:
    from runner.data.sources import SourceSpec as DataSource

    sources = []
    for i, s in enumerate(recipe.data.sources):
        try:
            where = {"path": s.path} if s.type == "local" else {"urls": (s.path,)}
            sources.append(DataSource(type=s.type, **where, caption_strategy=s.caption_strategy,
                                      caption_field=s.caption_field, instance_prompt=s.instance_prompt,
                                      prepend_instance_prompt=s.prepend_instance_prompt,
                                      repeats=s.repeats, probability=s.probability))
        except ValueError as err:
            raise UserError(f"data.sources.{i}: {err}") from None
    return sources


def build_loader(recipe: Recipe, *, rank: int = 0, world_size: int = 1, latent_cache=None,
                 device: torch.device | None = None):
    """The Stage C loader over every source: (loader, index) with buckets, crops and per-rank split.
    Batches bound for a CUDA `device` are pinned when `performance.pin_memory` is on."""
    from runner.data.loader import LoaderConfig, StageCLoader, build_index

    settings = loader_settings(recipe)
    pin = recipe.performance.pin_memory and device is not None and device.type == "cuda"
    cfg = LoaderConfig(batch_size=recipe.training.batch_size, seed=recipe.training.seed,
                       workers=recipe.data.workers, rank=rank, world_size=world_size, pin_memory=pin,
                       **settings)
    shard_cache = str(Path(recipe.data.cache.latents_dir).parent / "shards")
    try:
        index = build_index(data_sources(recipe), cfg, shard_cache)
    except (ValueError, OSError) as err:
        raise UserError(f"data: {err}") from None
    if not index.entries:
        raise UserError("data: no usable samples in any source (see the skipped/filtered lists of "
                        "`runner plan`); check the paths, caption strategy and minimum_image_size")
    return StageCLoader(index, cfg, latent_cache=latent_cache), index
