"""Cross-field rules of a recipe: combinations the schema cannot express, each with the fix in its message.

Rules see the resolved spec (defaults filled) and, for "this key has no effect here" checks, the raw
recipe as written. Path checks are separate because `runner validate` reports them as warnings (recipes
validate before their data or tiny checkpoints are made) while training refuses to start.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from runner.spec import Recipe, SourceSpec, WeightsSourceSpec

Found = tuple[tuple[str | int, ...], str]

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]*[A-Za-z0-9_]$")
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://|^pipe:")
_CUDA_ONLY = {"int8-torchao": "torchao's int8 kernels", "int8-bnb": "bitsandbytes' int8 kernels"}
# The hub layouts' subfolders for each flavour, to catch a flavour that names other weights.
_PRIOR_SUBFOLDERS = {"prior": "stage-c", "prior_lite": "stage-c-lite"}
_DECODER_SUBFOLDERS = {"decoder": "decoder", "decoder_lite": "decoder_lite"}


def is_local_path(path: str) -> bool:
    """True when a model `path` names a local file or folder rather than a hub repo id (`owner/name`)."""
    if path.startswith(("/", ".", "~")) or Path(path).expanduser().exists():
        return True
    return not _HUB_ID.match(path)


def _sub(raw: dict[str, Any], *keys: str) -> Any:
    """The raw (as written) value at `keys`, or None when not written."""
    node: Any = raw
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _model_sources(spec: Recipe) -> Iterator[tuple[tuple[str, ...], SourceSpec | WeightsSourceSpec]]:
    m = spec.model
    yield ("model", "prior"), m.prior
    yield ("model", "text_encoder"), m.text_encoder
    yield ("model", "tokenizer"), m.tokenizer
    yield ("model", "effnet"), m.effnet
    if m.previewer is not None:
        yield ("model", "previewer"), m.previewer
    if m.decoder is not None:
        yield ("model", "decoder", "source"), m.decoder.source
        yield ("model", "decoder", "stage_a"), m.decoder.stage_a


def cross_field_problems(spec: Recipe, raw: dict[str, Any]) -> list[Found]:
    """Every broken combination in the recipe, as (YAML path, message)."""
    out: list[Found] = []
    t, v, prec = spec.training, spec.validation, spec.training.precision
    if prec.mixed_precision == "fp16" and not prec.i_know_what_i_am_doing:
        out.append(
            (
                ("training", "precision", "mixed_precision"),
                "fp16 is refused: Stage C overflows in fp16 (NaN/inf activations; fp16 is not supported by "
                "the official models). Use `no` (fp32) or `bf16`; to try anyway set "
                "training.precision.i_know_what_i_am_doing: true",
            )
        )
    if prec.base_weights != "no_change" and t.mode == "full":
        out.append(
            (
                ("training", "precision", "base_weights"),
                f"{prec.base_weights} base weights are frozen, but full fine-tuning trains every weight; use "
                "training.mode: lora, or base_weights: no_change",
            )
        )
    if t.scheduler.name != "constant" and t.max_steps is not None and t.scheduler.warmup_steps > t.max_steps:
        out.append(
            (
                ("training", "scheduler", "warmup_steps"),
                f"warmup ({t.scheduler.warmup_steps} steps) is longer than the run (training.max_steps "
                f"{t.max_steps}); lower warmup_steps or raise max_steps",
            )
        )
    if (t.mode == "full" and prec.mixed_precision == "bf16" and prec.bf16_mode == "bf16_weights"
            and t.optimizer.name != "adamw_bf16"):
        out.append(
            (
                ("training", "optimizer", "name"),
                f"full fine-tuning with bf16 weights needs optimizer adamw_bf16 (stochastic rounding); "
                f"{t.optimizer.name} would round most updates away in bf16. Use adamw_bf16, or "
                "bf16_mode: autocast to keep fp32 weights",
            )
        )
    if _sub(raw, "training", "precision", "bf16_mode") is not None and prec.mixed_precision != "bf16":
        out.append(
            (
                ("training", "precision", "bf16_mode"),
                f"bf16_mode has no effect with mixed_precision: {prec.mixed_precision}; remove it or set "
                "mixed_precision: bf16",
            )
        )
    if t.mode == "full" and _sub(raw, "training", "lora") is not None:
        out.append(
            (
                ("training", "lora"),
                "the lora section has no effect with training.mode: full; remove it, or set mode: lora",
            )
        )
    if (t.max_steps is None) == (t.num_epochs is None):
        both = "both are set" if t.max_steps is not None else "neither is set"
        out.append(
            (
                ("training", "max_steps"),
                f"set exactly one of training.max_steps and training.num_epochs ({both})",
            )
        )
    if t.lora.targets == "custom" and not t.lora.target_patterns:
        out.append(
            (
                ("training", "lora", "target_patterns"),
                "targets: custom needs at least one pattern in "
                "target_patterns (e.g. 'attention\\.attn'), or pick a preset such as targets: attention",
            )
        )
    if t.lora.targets != "custom" and t.lora.target_patterns:
        out.append(
            (
                ("training", "lora", "target_patterns"),
                f"target_patterns are only used with targets: "
                f"custom (targets is {t.lora.targets}); remove them or set targets: custom",
            )
        )
    for i, pattern in enumerate(t.lora.target_patterns):
        try:
            re.compile(pattern)
        except re.error as e:
            out.append((("training", "lora", "target_patterns", i), f"not a valid regular expression: {e}"))
    out += _device_problems(spec)
    out += _model_problems(spec)
    out += _data_problems(spec)
    if v.enabled and v.use_decoder and spec.model.decoder is None:
        out.append(
            (
                ("validation", "use_decoder"),
                "decoder validation needs a decoder source: add model.decoder "
                "(Stage B + Stage A), or set validation.use_decoder: false to decode with the Previewer",
            )
        )
    if v.enabled and not v.use_decoder and spec.model.previewer is None:
        out.append(
            (
                ("validation", "use_decoder"),
                "Previewer-only validation needs model.previewer "
                "(previewer.safetensors); add it, or set validation.use_decoder: true with model.decoder",
            )
        )
    if v.enabled and not v.prompts and v.prompt_library is None:
        out.append(
            (
                ("validation", "prompts"),
                "validation is enabled but has no prompts; add validation.prompts "
                "or validation.prompt_library, or set validation.enabled: false",
            )
        )
    if spec.performance.cuda_graphs and t.scheduled_sampling.enabled:
        out.append((("performance", "cuda_graphs"), "CUDA graphs cannot capture scheduled sampling (its "
                    "number of model calls changes per step); disable one of the two"))
    if spec.performance.cuda_graphs and prec.mixed_precision == "fp16":
        out.append((("performance", "cuda_graphs"), "CUDA graphs do not support fp16 loss scaling; use "
                    "mixed_precision bf16 or no"))
    if spec.checkpoints.resume is not None and spec.output.overwrite:
        out.append(
            (
                ("output", "overwrite"),
                "overwrite deletes the checkpoints that checkpoints.resume continues "
                "from; keep only one of them",
            )
        )
    if (spec.hub.push or spec.hub.push_checkpoints) and spec.hub.model_id is None:
        out.append((("hub", "model_id"), "hub.push needs hub.model_id (owner/name of the target repo)"))
    return out


def _device_problems(spec: Recipe) -> list[Found]:
    if spec.device != "cpu":
        return []
    out: list[Found] = []
    base = spec.training.precision.base_weights
    if base in _CUDA_ONLY:
        out.append(
            (
                ("training", "precision", "base_weights"),
                f"{base} uses {_CUDA_ONLY[base]}, which need a CUDA "
                "GPU, but device is cpu; use base_weights: int8 (pure PyTorch) on the CPU",
            )
        )
    if spec.training.optimizer.name == "adamw8bit":
        out.append(
            (
                ("training", "optimizer", "name"),
                "adamw8bit (bitsandbytes) needs a CUDA GPU, but device is "
                "cpu; use adamw, adamw_bf16 or adafactor",
            )
        )
    if spec.performance.cuda_graphs:
        out.append((("performance", "cuda_graphs"), "CUDA graphs need a CUDA GPU, but device is cpu; set "
                    "performance.cuda_graphs: false"))
    if spec.distributed.backend == "nccl":
        out.append((("distributed", "backend"), "nccl needs CUDA GPUs, but device is cpu; use gloo or auto"))
    return out


def _model_problems(spec: Recipe) -> list[Found]:
    out: list[Found] = []
    for path, src in _model_sources(spec):
        if src.revision is not None and is_local_path(src.path):
            out.append(
                (
                    path + ("revision",),
                    f"revision applies to hub repos, but {src.path!r} is a local path; set revision: null",
                )
            )
    prior_flavour = _PRIOR_SUBFOLDERS.get(spec.model.prior.subfolder)
    if prior_flavour is not None and spec.model.flavour != "tiny" and prior_flavour != spec.model.flavour:
        out.append(
            (
                ("model", "prior", "subfolder"),
                f"subfolder {spec.model.prior.subfolder!r} holds the "
                f"{prior_flavour} weights but model.flavour is {spec.model.flavour}; make them agree",
            )
        )
    dec = spec.model.decoder
    if dec is not None:
        dec_flavour = _DECODER_SUBFOLDERS.get(dec.source.subfolder)
        if dec_flavour is not None and dec.flavour != "tiny" and dec_flavour != dec.flavour:
            out.append(
                (
                    ("model", "decoder", "source", "subfolder"),
                    f"subfolder {dec.source.subfolder!r} holds the "
                    f"{dec_flavour} weights but model.decoder.flavour is {dec.flavour}; make them agree",
                )
            )
    return out


def _data_problems(spec: Recipe) -> list[Found]:
    out: list[Found] = []
    seen: set[str] = set()
    for i, s in enumerate(spec.data.sources):
        here = ("data", "sources", i)
        if s.name in seen:
            out.append(
                (
                    here + ("name",),
                    f"source name {s.name!r} is used twice; names key caches and must be unique",
                )
            )
        seen.add(s.name)
        if (s.caption_strategy == "instanceprompt" or s.prepend_instance_prompt) and not s.instance_prompt:
            why = (
                "caption_strategy: instanceprompt"
                if s.caption_strategy == "instanceprompt"
                else "prepend_instance_prompt: true"
            )
            out.append((here + ("instance_prompt",), f"{why} needs instance_prompt (the text to use)"))
        if (s.maximum_image_size is None) != (s.target_downsample_size is None):
            out.append(
                (
                    here + ("target_downsample_size",),
                    "maximum_image_size and target_downsample_size work together: set both or neither",
                )
            )
        elif s.maximum_image_size is not None and s.target_downsample_size > s.maximum_image_size:
            out.append(
                (
                    here + ("target_downsample_size",),
                    f"target_downsample_size ({s.target_downsample_size}) "
                    f"must not exceed maximum_image_size ({s.maximum_image_size}): oversize images "
                    "shrink to it",
                )
            )
        if s.buckets is not None and len(set(s.buckets)) != len(s.buckets):
            out.append((here + ("buckets",), "a bucket is listed twice; remove the duplicate"))
    return out


def path_problems(spec: Recipe) -> list[Found]:
    """Local files and folders the recipe names that do not exist (hub ids and URLs are not checked)."""
    out: list[Found] = []
    for i, s in enumerate(spec.data.sources):
        here = ("data", "sources", i, "path")
        if s.type == "local" and not Path(s.path).expanduser().is_dir():
            out.append((here, f"folder {s.path} does not exist; fix the path or create the dataset there"))
        elif s.type == "webdataset" and not _URL.match(s.path) and not _shards_exist(s.path):
            out.append(
                (here, f"no shard matches {s.path}; make shards with tools/shard_dataset.py or fix the path")
            )
    for path, src in _model_sources(spec):
        if is_local_path(src.path):
            full = Path(src.path, src.subfolder, src.filename or "").expanduser()
            if not full.exists():
                out.append(
                    (
                        path + ("path",),
                        f"{full} does not exist; fix the path, or use a hub repo id (owner/name)",
                    )
                )
    for path, value in (
        (("validation", "prompt_library"), spec.validation.prompt_library),
        (("training", "lora", "init_weights"), spec.training.lora.init_weights),
    ):
        if value is not None and not Path(value).expanduser().is_file():
            out.append((path, f"file {value} does not exist; fix the path or set null"))
    resume = spec.checkpoints.resume
    if resume is not None and resume != "latest" and not Path(resume).expanduser().exists():
        out.append(
            (
                ("checkpoints", "resume"),
                f"checkpoint {resume} does not exist; use `latest`, a checkpoint "
                "folder under OUTPUT/checkpoints/, or null",
            )
        )
    return out


def _shards_exist(pattern: str) -> bool:
    """True when a local shard path, glob or brace list (`{000..009}`, `{a,b}`) names an existing file.

    Only the first member of each brace list is looked for: enough to catch a wrong folder or name.
    """
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match:
        inner = match[1]
        first = inner.split("..")[0] if ".." in inner else inner.split(",")[0]
        return _shards_exist(pattern[: match.start()] + first + pattern[match.end() :])
    return any(Path(p).is_file() for p in glob.glob(str(Path(pattern).expanduser())))
