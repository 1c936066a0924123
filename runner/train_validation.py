"""Validation images during training: the recipe's prompts and seeds, the same every time, so the grids of
different steps compare. Written to OUTPUT/validation/step_NNNNNN/ by `runner.validation.run_validation`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from cascade_core.pipeline import CascadeModels, SamplerSettings
from runner.build import AUTOCAST_DTYPES, Decoders, TextEncoder
from runner.errors import UserError
from runner.spec import Recipe, ValidationSpec
from runner.step import autocast_context
from runner.validation import ValidationJob, run_validation, validation_dir


def validation_prompts(spec: ValidationSpec) -> list[str]:
    """The recipe's prompts followed by those of its prompt library (a JSON object name -> prompt)."""
    prompts = list(spec.prompts)
    if spec.prompt_library:
        path = Path(spec.prompt_library)
        try:
            library = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(
                f"validation.prompt_library {path}: {err}; give a JSON object of name -> prompt"
            ) from None
        if not isinstance(library, dict) or not all(isinstance(v, str) for v in library.values()):
            raise UserError(
                f"validation.prompt_library {path}: expected a JSON object of name -> prompt text"
            )
        prompts += list(library.values())
    return prompts


def validation_job(recipe: Recipe) -> ValidationJob:
    spec = recipe.validation
    prompts = validation_prompts(spec)
    pairs = [(p, s) for p in prompts for s in spec.seeds]  # every prompt with every seed
    return ValidationJob(
        prompts=tuple(p for p, _ in pairs), seeds=tuple(s for _, s in pairs),
        negative_prompt=spec.negative_prompt, height=spec.height, width=spec.width,
        prior=SamplerSettings(steps=spec.prior_steps, guidance=spec.prior_guidance, shift=spec.prior_shift,
                              sampler=spec.prior_sampler, cfg_rho=spec.prior_cfg_rescale),
        decoder=SamplerSettings(steps=spec.decoder_steps, guidance=spec.decoder_guidance, shift=1.0),
        preview_only=not spec.use_decoder)


class TrainingValidator:
    """Renders the recipe's validation job with the prior as it is being trained."""

    def __init__(self, recipe: Recipe, text: TextEncoder, decoders: Decoders, out_dir: Path,
                 device: torch.device) -> None:
        self.job = validation_job(recipe)
        self.text, self.decoders, self.out_dir, self.device = text, decoders, out_dir, device
        self.autocast_dtype = AUTOCAST_DTYPES[recipe.training.precision.mixed_precision]

    def run(self, prior: nn.Module, step: int) -> Path:
        """Write the images of `step`; the prior goes back to its training mode afterwards."""
        models = CascadeModels(stage_c=prior, text_model=self.text.model, tokenizer=self.text.tokenizer,
                               previewer=self.decoders.previewer, stage_b=self.decoders.stage_b,
                               stage_a=self.decoders.stage_a)
        was_training = prior.training
        prior.eval()
        try:
            with torch.no_grad(), autocast_context(self.device, self.autocast_dtype):
                result = run_validation(models, self.job, validation_dir(self.out_dir.parent, step))
        finally:
            prior.train(was_training)
        return result.grid.parent
