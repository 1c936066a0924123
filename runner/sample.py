"""`runner sample`: prompts -> PNGs (+ grid.png and settings.json) with Stage C, then Stage B + A or the
Previewer, optionally with LoRA files merged into Stage C.

    runner sample --model stabilityai/stable-cascade --prompt "a red fox" --size 1024x1024 --out samples/

SOURCE (`--model`) is a local folder laid out like the hub repositories or a hub repo id (fetched into
the standard cache through runner/hub.py). Inside it each model is looked up in this order (the first that
exists wins; `--prior` / `--decoder` pick another file, subfolder or path):
  prior     stage_c_bf16.safetensors, stage_c.safetensors, prior/
  decoder   stage_b_bf16.safetensors, stage_b.safetensors, decoder/     (not needed with --preview-only)
  stage A   stage_a.safetensors, vqgan/                                 (not needed with --preview-only)
  previewer previewer.safetensors                                      (only with --preview-only)
  text      text_encoder/ and tokenizer/
This module imports only the standard library at load time, so `runner --help` stays fast.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path
from typing import Any

from runner.errors import UserError

PRIOR_CANDIDATES = ("stage_c_bf16.safetensors", "stage_c.safetensors", "prior")
DECODER_CANDIDATES = ("stage_b_bf16.safetensors", "stage_b.safetensors", "decoder")
STAGE_A_CANDIDATES = ("stage_a.safetensors", "vqgan")
PREVIEWER_CANDIDATES = ("previewer.safetensors",)
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "tokenizer.json",
)
DTYPES = ("auto", "fp32", "bf16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare `runner sample`'s options (defaults = the official inference settings)."""
    parser.add_argument(
        "--model",
        required=True,
        metavar="SOURCE",
        help="folder laid out like stabilityai/stable-cascade, or a hub repo id",
    )
    parser.add_argument(
        "--prompt",
        required=True,
        action="append",
        metavar="TEXT",
        help="what to draw; repeat for several prompts",
    )
    parser.add_argument(
        "--negative-prompt",
        default="",
        metavar="TEXT",
        help="used by the unconditional branch of guidance (default: empty)",
    )
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:STRENGTH]",
        help="LoRA file merged into Stage C (native, kohya/ComfyUI, PEFT or official "
        "layout); strength defaults to 1; repeat for several",
    )
    parser.add_argument("--steps", type=int, default=20, help="Stage C sampling steps (default 20)")
    parser.add_argument("--guidance", type=float, default=4.0, help="Stage C CFG scale (default 4)")
    parser.add_argument("--shift", type=float, default=2.0, help="Stage C schedule shift (default 2)")
    parser.add_argument("--decoder-steps", type=int, default=10, help="Stage B steps (default 10)")
    parser.add_argument(
        "--decoder-guidance",
        type=float,
        default=1.1,
        help="Stage B CFG scale (default 1.1; 0 switches guidance off)",
    )
    parser.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm", help="default ddpm")
    parser.add_argument("--size", default="1024x1024", metavar="WxH", help="image size (default 1024x1024)")
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the first image of each prompt; image j uses seed + j (default random)",
    )
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt (default 1)")
    parser.add_argument("--batch-size", type=int, default=1, help="images per model call (default 1)")
    parser.add_argument(
        "--preview-only",
        action="store_true",
        help="decode with the fast Previewer instead of Stage B + Stage A",
    )
    parser.add_argument(
        "--prior",
        metavar="NAME",
        help="prior file/subfolder in SOURCE, or a path (e.g. stage_c_lite_bf16.safetensors, prior_lite)",
    )
    parser.add_argument(
        "--decoder",
        metavar="NAME",
        help="Stage B file/subfolder in SOURCE, or a path (e.g. stage_b_lite_bf16.safetensors, decoder_lite)",
    )
    parser.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu, cuda, cuda:N")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="model precision: auto = bf16 on GPU, fp32 on CPU (fp16 overflows in Stage C)",
    )
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for the files")


def parse_size(text: str) -> tuple[int, int]:
    """'WxH' (or 'N' for a square) -> (height, width)."""
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or min(values) < 1:
        raise UserError(f"--size {text!r}: give WIDTHxHEIGHT in pixels, e.g. 1024x1024 or 1536x1024")
    width, height = values
    return height, width


def parse_lora(spec: str) -> tuple[Path, float]:
    """'FILE' or 'FILE:STRENGTH' -> (path, strength); the file must exist."""
    path_text, strength = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep:
        try:
            path_text, strength = head, float(tail)
        except ValueError:
            path_text, strength = spec, 1.0
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise UserError(f"--lora {spec!r}: no such file {path}; give FILE or FILE:STRENGTH")
    return path, strength


def _device_and_dtype(device_name: str, dtype_name: str) -> tuple[Any, Any]:
    import torch

    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device_name)
    except RuntimeError:
        raise UserError(f"--device {device_name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device_name}: PyTorch sees no CUDA GPU here; use --device cpu")
    if dtype_name == "auto":
        dtype_name = "bf16" if device.type == "cuda" else "fp32"
    return device, {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]


def _fetch(source: str, name: str, *, subfolder: str | None = None) -> Path:
    """The local path of file or folder `name` in SOURCE (a hub id is fetched); raises HubError."""
    from runner.hub import HubError, resolve_model_source

    if name.endswith(".safetensors") or subfolder:
        path = resolve_model_source(source, subfolder=subfolder, filename=name)
        if not path.is_file():
            raise HubError(f"{path} does not exist")
        return path
    root = resolve_model_source(source, subfolder=name)
    if not (root / name).is_dir():
        raise HubError(f"{root / name} does not exist")
    return root / name


def locate(source: str, candidates: tuple[str, ...], what: str, override: str | None = None) -> Path:
    """The first of `candidates` present in SOURCE (or `override`: a name in SOURCE or a path)."""
    from runner.hub import HubError

    if override is not None:
        if Path(override).expanduser().exists():
            return Path(override).expanduser()
        candidates = (override,)
    first_error = None
    for name in candidates:
        try:
            return _fetch(source, name)
        except HubError as err:
            first_error = first_error or err
    raise UserError(f"--model {source}: no {what} found (looked for {', '.join(candidates)}); {first_error}")


def _fetch_text_folder(source: str, subfolder: str, files: tuple[str, ...]) -> Path:
    """A local text_encoder/ or tokenizer/ folder: the folder itself, or the files fetched from the hub."""
    from runner.hub import HubError, looks_like_repo_id

    if not looks_like_repo_id(source):
        folder = Path(source).expanduser() / subfolder
        if not folder.is_dir():
            raise UserError(
                f"--model {source}: no {subfolder}/ folder (the CLIP text encoder and its tokenizer)"
            )
        return folder
    found, last = [], None
    for name in files:
        try:
            found.append(_fetch(source, name, subfolder=subfolder))
        except HubError as err:
            last = err
    if not found:
        raise UserError(f"--model {source}: cannot get {subfolder}/: {last}")
    return found[0].parent


def _text_encoder_files(source: str) -> tuple[str, ...]:
    """config.json and the weight files of text_encoder/ (one file, or the shards an index lists)."""
    import json

    from runner.hub import HubError, looks_like_repo_id

    if not looks_like_repo_id(source):
        return ()
    try:
        _fetch(source, "model.safetensors", subfolder="text_encoder")
        return ("config.json",)
    except HubError:
        index = _fetch(source, "model.safetensors.index.json", subfolder="text_encoder")
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return ("config.json", *shards)


def load_models(args: argparse.Namespace, device: Any, dtype: Any) -> tuple[Any, dict[str, str]]:
    """(CascadeModels, where each model came from) for the options in `args`."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    from cascade_core.checkpoint_io import CheckpointError
    from cascade_core.decoder_io import load_previewer, load_stage_a, load_stage_b
    from cascade_core.pipeline import CascadeModels
    from cascade_core.stage_c_io import load_stage_c
    from runner.hub import HubError, looks_like_repo_id

    source = args.model
    local = Path(source).expanduser()
    if local.is_file() or (not local.exists() and not looks_like_repo_id(source)):
        raise UserError(
            f"--model {source}: {'is a file' if local.is_file() else 'no such folder'}; give a folder laid "
            "out like the hub repositories (e.g. made by tools/make_tiny_checkpoints.py) or a hub repo id "
            "such as stabilityai/stable-cascade"
        )
    found = {"prior": locate(source, PRIOR_CANDIDATES, "Stage C prior", args.prior)}
    if args.preview_only:
        found["previewer"] = locate(source, PREVIEWER_CANDIDATES, "Previewer")
    else:
        found["decoder"] = locate(source, DECODER_CANDIDATES, "Stage B decoder", args.decoder)
        found["stage_a"] = locate(source, STAGE_A_CANDIDATES, "Stage A (VQGAN)")
    try:
        text_files = _text_encoder_files(source)
    except HubError as err:
        raise UserError(f"--model {source}: cannot get text_encoder/: {err}") from None
    text_dir = _fetch_text_folder(source, "text_encoder", text_files)
    tok_dir = _fetch_text_folder(source, "tokenizer", TOKENIZER_FILES)
    kw = {"device": device, "dtype": dtype}
    try:
        stage_c = load_stage_c(found["prior"], **kw)
        previewer = load_previewer(found["previewer"], **kw) if args.preview_only else None
        stage_b = None if args.preview_only else load_stage_b(found["decoder"], **kw)
        stage_a = None if args.preview_only else load_stage_a(found["stage_a"], **kw)
    except CheckpointError as err:
        raise UserError(f"--model {source}: {err}") from None
    try:
        text_model = CLIPTextModelWithProjection.from_pretrained(str(text_dir))
        text_model = text_model.to(device=device, dtype=dtype).eval()
        tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    except (OSError, ValueError) as err:
        raise UserError(f"--model {source}: cannot load {text_dir} / {tok_dir}: {err}") from None
    models = CascadeModels(stage_c, text_model, tokenizer, previewer, stage_b, stage_a)
    return models, {k: str(v) for k, v in {**found, "text_encoder": text_dir, "tokenizer": tok_dir}.items()}


def read_lora(path: Path) -> tuple[Any, str]:
    """(lazy tensors, detected format) of a LoRA file; bad files are user errors."""
    from cascade_core.checkpoint_io import CheckpointError, read_safetensors_state_dict
    from cascade_core.peft.formats import LoRAFormatError, detect_lora_format

    try:
        state = read_safetensors_state_dict(path)
        return state, detect_lora_format(state, state.metadata)
    except (CheckpointError, LoRAFormatError, OSError) as err:
        raise UserError(f"--lora {path}: {err}") from None


def apply_loras(stage_c: Any, loras: list[tuple[Path, float, Any, str]]) -> None:
    """Convert each LoRA to our layout, check it fits Stage C, and merge it at its strength."""
    from cascade_core.peft.formats import LoRAFormatError, LoRAMismatchError, convert_to_native
    from cascade_core.peft.lora import load_lora_state_dict, lora_target_shapes, merge_lora

    dtype = next(stage_c.parameters()).dtype
    for i, (path, strength, state, fmt) in enumerate(loras):
        try:
            native = convert_to_native(state, state.metadata, lora_target_shapes(stage_c), fmt)
            load_lora_state_dict(stage_c, native, name=f"lora_{i}", strength=strength, dtype=dtype)
        except (LoRAFormatError, LoRAMismatchError, ValueError) as err:
            raise UserError(f"--lora {path}: {err}") from None
    merge_lora(stage_c)


def run(args: argparse.Namespace) -> int:
    """`runner sample`: validate the options, load the models, render, write the files."""
    from tqdm import tqdm

    from cascade_core.pipeline import SamplerSettings
    from runner.validation import ValidationJob, run_validation

    height, width = parse_size(args.size)
    loras = [(p, s, *read_lora(p)) for p, s in (parse_lora(spec) for spec in args.lora)]
    for name in ("num_images", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    seed = secrets.randbelow(2**31) if args.seed is None else args.seed
    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")
    try:
        prior = SamplerSettings(args.steps, args.guidance, args.shift, args.sampler)
        decoder = SamplerSettings(args.decoder_steps, args.decoder_guidance, 1.0, args.sampler)
    except ValueError as err:
        raise UserError(
            f"{err} (options --steps/--guidance/--shift, --decoder-steps/--decoder-guidance)"
        ) from None
    device, dtype = _device_and_dtype(args.device, args.dtype)
    models, sources = load_models(args, device, dtype)
    apply_loras(models.stage_c, loras)
    prompts = [p for p in args.prompt for _ in range(args.num_images)]
    seeds = [seed + j for _ in args.prompt for j in range(args.num_images)]
    extra = {
        "command": "runner sample",
        "model": args.model,
        "files": sources,
        "loras": [{"file": str(p), "strength": s, "format": fmt} for p, s, _, fmt in loras],
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
    }
    job = ValidationJob(
        prompts=tuple(prompts),
        seeds=tuple(seeds),
        negative_prompt=args.negative_prompt,
        height=height,
        width=width,
        prior=prior,
        decoder=decoder,
        preview_only=args.preview_only,
        batch_size=args.batch_size,
        extra=extra,
    )
    batches = -(-len(prompts) // args.batch_size)
    total = batches * (prior.steps + (0 if args.preview_only else decoder.steps))
    with tqdm(total=total, unit="step", desc="prior", file=sys.stderr) as bar:

        def progress(phase: str, done: int, steps: int) -> None:
            bar.set_description(phase, refresh=False)
            bar.update(1)

        result = run_validation(models, job, args.out, progress=progress)
    print(f"wrote {len(result.images)} image(s), {result.grid.name} and {result.settings.name} to {args.out}")
    return 0
