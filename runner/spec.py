"""The frozen recipe objects the rest of the code sees.

They mirror `schemas/recipe.schema.json` one to one (a test keeps them equal in both directions): a field per
schema key, in schema order, with no defaults of their own, because the schema's defaults are the only ones.
`runner.recipe` validates the YAML and fills those defaults, then `build_spec` turns the dict into these.
Lists become tuples so that a spec is hashable and cannot be changed by accident.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, TypeVar


@dataclass(frozen=True)
class SourceSpec:
    path: str
    subfolder: str
    filename: str | None
    revision: str | None


@dataclass(frozen=True)
class WeightsSourceSpec:
    path: str
    subfolder: str
    filename: str | None
    revision: str | None
    format: Literal["auto", "original", "diffusers"]


@dataclass(frozen=True)
class DecoderSpec:
    flavour: Literal["decoder", "decoder_lite", "tiny"]
    source: WeightsSourceSpec
    stage_a: WeightsSourceSpec


@dataclass(frozen=True)
class ModelSpec:
    family: Literal["stable_cascade"]
    flavour: Literal["stage-c", "stage-c-lite", "tiny"]
    prior: WeightsSourceSpec
    text_encoder: SourceSpec
    tokenizer: SourceSpec
    effnet: SourceSpec
    previewer: SourceSpec | None
    decoder: DecoderSpec | None


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    dropout: float
    targets: Literal["attention", "attention+ffn", "all-linear", "custom"]
    target_patterns: tuple[str, ...]
    init: Literal["peft", "official"]
    init_weights: str | None


@dataclass(frozen=True)
class PrecisionSpec:
    mixed_precision: Literal["no", "bf16", "fp16"]
    bf16_mode: Literal["autocast", "bf16_weights"]
    base_weights: Literal["no_change", "int8", "int8-torchao", "int8-bnb"]
    allow_tf32: bool
    i_know_what_i_am_doing: bool


@dataclass(frozen=True)
class OptimizerSpec:
    name: Literal["adamw", "adamw_bf16", "adamw8bit", "adafactor"]
    betas: tuple[float, ...]
    eps: float
    weight_decay: float
    adafactor_beta2_decay: float
    adafactor_clip_threshold: float


@dataclass(frozen=True)
class SchedulerSpec:
    name: Literal["constant", "linear", "cosine", "cosine_with_restarts", "polynomial"]
    warmup_steps: int
    num_cycles: int
    power: float
    lr_end: float


@dataclass(frozen=True)
class EmaSpec:
    enabled: bool
    decay: float
    update_every: int
    start_step: int
    device: Literal["same", "cpu"]


@dataclass(frozen=True)
class Diff2FlowSpec:
    enabled: bool


@dataclass(frozen=True)
class ScheduledSamplingSpec:
    enabled: bool
    max_offset: int
    offset_step: float
    offset_strategy: Literal["uniform", "biased_early", "biased_late"]
    sampler: Literal["ddim", "ddpm"]
    probability: float
    ramp: Literal["none", "linear", "cosine"]
    probability_start: float
    probability_end: float
    ramp_steps: int
    start_step: int


@dataclass(frozen=True)
class TrainingSpec:
    mode: Literal["lora", "full"]
    lora: LoraSpec
    precision: PrecisionSpec
    gradient_checkpointing: bool
    batch_size: int
    gradient_accumulation_steps: int
    max_steps: int | None
    num_epochs: int | None
    learning_rate: float
    optimizer: OptimizerSpec
    scheduler: SchedulerSpec
    max_grad_norm: float | None
    ema: EmaSpec
    seed: int
    caption_dropout: float
    loss_weighting: Literal["p2", "adaptive", "none"]
    diff2flow: Diff2FlowSpec
    scheduled_sampling: ScheduledSamplingSpec


@dataclass(frozen=True)
class DataSourceSpec:
    name: str
    type: Literal["local", "webdataset"]
    path: str
    caption_strategy: Literal["filename", "textfile", "instanceprompt", "json"]
    caption_field: str
    instance_prompt: str | None
    prepend_instance_prompt: bool
    resolution: int
    buckets: tuple[tuple[int, ...], ...] | None
    crop: bool
    crop_style: Literal["random", "center", "corner"]
    minimum_image_size: int
    maximum_image_size: int | None
    target_downsample_size: int | None
    repeats: int
    probability: float


@dataclass(frozen=True)
class CacheSpec:
    text_embeddings: bool
    text_embeddings_dir: str
    latents: bool
    latents_dir: str
    encoder_batch_size: int
    text_batch_size: int


@dataclass(frozen=True)
class DataSpec:
    sources: tuple[DataSourceSpec, ...]
    cache: CacheSpec
    workers: int


@dataclass(frozen=True)
class ValidationSpec:
    enabled: bool
    every_n_steps: int
    at_start: bool
    prompts: tuple[str, ...]
    prompt_library: str | None
    negative_prompt: str
    seeds: tuple[int, ...]
    width: int
    height: int
    prior_steps: int
    prior_guidance: float
    prior_shift: float
    prior_cfg_rescale: float
    prior_sampler: Literal["ddpm", "ddim"]
    use_decoder: bool
    decoder_steps: int
    decoder_guidance: float


@dataclass(frozen=True)
class CheckpointSpec:
    every_n_steps: int
    keep_last: int
    resume: str | None


@dataclass(frozen=True)
class ExportSpec:
    lora_formats: tuple[Literal["native", "comfyui", "peft", "official"], ...]
    full_formats: tuple[Literal["original", "diffusers"], ...]
    merge: bool
    dtype: Literal["fp32", "bf16"]
    trigger_words: tuple[str, ...]


@dataclass(frozen=True)
class LoggingSpec:
    report_to: Literal["none", "jsonl", "tensorboard", "wandb"]
    every_n_steps: int
    progress_bar: bool
    wandb_project: str | None
    run_name: str | None


@dataclass(frozen=True)
class HubSpec:
    model_id: str | None
    push: bool
    push_checkpoints: bool
    private: bool


@dataclass(frozen=True)
class DistributedSpec:
    strategy: Literal["ddp", "fsdp"]
    backend: Literal["auto", "nccl", "gloo"]
    timeout_s: int
    find_unused_parameters: bool
    bucket_cap_mb: int
    fsdp_reshard_after_forward: bool
    fsdp_param_dtype: Literal["fp32", "bf16"]
    fsdp_reduce_dtype: Literal["fp32", "bf16"]
    fsdp_cpu_offload: bool


@dataclass(frozen=True)
class PerformanceSpec:
    compile: Literal["none", "blocks"]
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"]
    attention_backend: Literal["auto", "flash", "efficient", "cudnn", "math"]
    pin_memory: bool
    cuda_graphs: bool


@dataclass(frozen=True)
class OutputSpec:
    dir: str
    overwrite: bool


@dataclass(frozen=True)
class Recipe:
    device: Literal["auto", "cpu", "cuda"]
    output: OutputSpec
    model: ModelSpec
    training: TrainingSpec
    data: DataSpec
    validation: ValidationSpec
    checkpoints: CheckpointSpec
    export: ExportSpec
    logging: LoggingSpec
    hub: HubSpec
    distributed: DistributedSpec
    performance: PerformanceSpec


T = TypeVar("T")


def _convert(hint: Any, value: Any) -> Any:
    """Convert a validated JSON value to the type `hint` describes (dataclass, tuple, optional, scalar)."""
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return _convert(inner, value)
    if dataclasses.is_dataclass(hint):
        return build_spec(hint, value)
    if origin is tuple:
        item_hint = typing.get_args(hint)[0]
        return tuple(_convert(item_hint, v) for v in value)
    if hint is float and isinstance(value, int):
        return float(value)
    return value


def build_spec(cls: type[T], data: dict[str, Any]) -> T:
    """Build the frozen dataclass `cls` from a schema-valid dict with every default filled in.

    The dict must carry exactly the dataclass's fields: a mismatch is a bug (schema and spec out of step),
    which the schema/spec test catches first.
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    if set(names) != set(data):
        raise ValueError(f"{cls.__name__}: fields {sorted(names)} do not match keys {sorted(data)}")
    return cls(**{name: _convert(hints[name], data[name]) for name in names})


def spec_to_dict(spec: Any) -> Any:
    """The plain-data form of a spec (dicts and lists, in schema order): what `runner plan` prints and what a
    checkpoint stores as the resolved recipe."""
    if dataclasses.is_dataclass(spec):
        return {f.name: spec_to_dict(getattr(spec, f.name)) for f in dataclasses.fields(spec)}
    if isinstance(spec, tuple):
        return [spec_to_dict(v) for v in spec]
    return spec
