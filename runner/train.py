"""`runner RECIPE`: one readable loop for LoRA and full fine-tuning of the Stage C prior.

setup -> (step -> log -> checkpoint -> validate)* -> export -> summary. Randomness comes from the global
torch RNG, seeded from the recipe and saved in every checkpoint, so on the CPU N straight steps equal
k steps + resume + N-k steps bit for bit.

Under torchrun the same loop runs on every rank; runner/distributed.py owns the process group, the
DDP / FSDP2 wrapping and the collectives. Rank 0 writes every file (checkpoints, logs, validation,
exports); the others hand it their parts (RNG states, FSDP weights for validation and export) and wait.
FSDP checkpoints are the exception: every rank writes its own shards (runner/checkpoint_shards.py).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from runner.build import (
    AUTOCAST_DTYPES,
    build_decoders,
    build_effnet,
    build_loader,
    build_prior,
    build_text_encoder,
    pick_device,
)
from runner.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    prepare_output_dir,
    resolve_resume,
    restore_rng_state,
    save_checkpoint,
)
from runner.checkpoint_shards import save_sharded_checkpoint
from runner.cli import dump_yaml
from runner.distributed import Dist, session
from runner.ema import EMA
from runner.errors import UserError
from runner.hub_push import RECIPE_FILE, HubPusher
from runner.optim import all_finite, build_scheduler, optimizer_from_spec
from runner.recipe import LoadedRecipe
from runner.run_log import RunLogger, note
from runner.spec import Recipe
from runner.step import loss_name, stage_c_loss

MAX_NONFINITE_IN_A_ROW = 10  # more skipped steps than this in a row stops the run (after a checkpoint)


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    samples: int = 0
    skipped_nonfinite: int = 0
    nonfinite_in_a_row: int = 0


class NonFiniteLossError(UserError):
    pass


def _precision_setup(recipe: Recipe, device: torch.device) -> torch.dtype | None:
    precision = recipe.training.precision
    torch.backends.cuda.matmul.allow_tf32 = precision.allow_tf32
    torch.backends.cudnn.allow_tf32 = precision.allow_tf32
    if precision.mixed_precision == "fp16" and device.type == "cpu":
        raise UserError("training.precision.mixed_precision: fp16 autocast needs a GPU; use bf16 or no")
    return AUTOCAST_DTYPES[precision.mixed_precision]


def total_steps(recipe: Recipe, steps_per_epoch: int) -> int:
    training = recipe.training
    if training.max_steps is not None:
        return training.max_steps
    return max(1, training.num_epochs * math.ceil(steps_per_epoch / training.gradient_accumulation_steps))


def _latents(batch: dict, effnet: nn.Module, latent_cache, batch_size: int,
             device: torch.device) -> torch.Tensor:
    """Stage C latents [B,16,h,w] (fp32, on device) of a loader batch: from the cache or the EfficientNet."""
    from cascade_core.models.effnet import imagenet_normalize

    def encode(images: torch.Tensor) -> torch.Tensor:
        return effnet(images.to(device, non_blocking=True))  # pinned batches (performance.pin_memory)

    if latent_cache is not None:
        return latent_cache.complete(batch, encode, batch_size).to(device=device, dtype=torch.float32)
    with torch.no_grad():
        return encode(imagenet_normalize(batch["images"].to(device, non_blocking=True))).float()


def _conditioning(captions: list[str], text, text_cache, empty, caption_dropout: float, batch_size: int,
                  device: torch.device):
    from cascade_core.models.text import TextConditioning, drop_captions

    if text_cache is not None:
        hidden, pooled = text_cache.get(captions, lambda c: _text_pair(text, c), batch_size)
        cond = TextConditioning(hidden.to(device, torch.float32), pooled.to(device, torch.float32),
                                torch.zeros(len(captions), 1, empty.clip_img.shape[-1], device=device))
    else:
        cond = text.encode(captions).to(device=device, dtype=torch.float32)
    drop = torch.rand(len(captions)) < caption_dropout  # [B] bool, global RNG
    return drop_captions(cond, empty, drop) if caption_dropout > 0 else cond


def _text_pair(text, captions: list[str]):
    cond = text.encode(captions)
    return cond.clip_text, cond.clip_text_pooled


def train(loaded: LoadedRecipe) -> dict:
    """Run the recipe to the end; returns the summary (an empty dict on ranks other than 0)."""
    with session(loaded.spec, pick_device(loaded.spec.device)) as dist:
        return _train(loaded, dist)


def _train(loaded: LoadedRecipe, dist: Dist) -> dict:
    recipe = loaded.spec
    training = recipe.training
    device = dist.device
    autocast_dtype = _precision_setup(recipe, device)
    out = Path(recipe.output.dir)
    resume_from = resolve_resume(out, recipe.checkpoints.resume)  # an explicit folder works into a new output
    dist.on_main(prepare_output_dir, out, resuming=resume_from is not None, overwrite=recipe.output.overwrite)
    recipe_text = dump_yaml(loaded.resolved)
    dist.on_main((out / RECIPE_FILE).write_text, recipe_text, encoding="utf-8")
    pusher = dist.on_main(HubPusher.open, recipe.hub, note)  # fails here, not after the training
    torch.manual_seed(training.seed)  # the same on every rank: identical LoRA init and frozen parts

    # ---- setup: models (frozen helpers first, then the prior), data, optimizer
    text = build_text_encoder(recipe, device)
    effnet, effnet_id = build_effnet(recipe, device)
    prior = build_prior(recipe, device)
    text.clip_img_dim = prior.config.c_clip_img
    prior.train(training.mode == "full")  # LoRA trains without dropout, as the official trainer does
    validation = None
    if recipe.validation.enabled and dist.is_main:
        from runner.train_validation import TrainingValidator

        decoders = build_decoders(recipe, device, need_full=recipe.validation.use_decoder)
        validation = TrainingValidator(recipe, text, decoders, out / "validation", device)
    text_cache = latent_cache = None
    if recipe.data.cache.text_embeddings:
        from runner.data.text_cache import TextCache

        text_cache = TextCache(recipe.data.cache.text_embeddings_dir, text.identity)
    if recipe.data.cache.latents:
        from runner.data.latent_cache import LatentCache

        latent_cache = LatentCache(recipe.data.cache.latents_dir, effnet_id)
    loader, _ = build_loader(recipe, rank=dist.rank, world_size=dist.world_size, latent_cache=latent_cache,
                             device=device)
    steps = total_steps(recipe, loader.steps_per_epoch())
    model = dist.wrap(prior, training.mode)  # what the step calls; `prior` stays the (sharded) StageC
    params = [p for p in prior.parameters() if p.requires_grad]
    optimizer = optimizer_from_spec(training.optimizer, params, training.learning_rate)
    sched = training.scheduler
    scheduler = build_scheduler(sched.name, optimizer, warmup_steps=sched.warmup_steps, total_steps=steps,
                                num_cycles=sched.num_cycles, power=sched.power,
                                min_lr_ratio=sched.lr_end / training.learning_rate)
    ema = None
    if training.ema.enabled:
        ema = EMA(prior, decay=training.ema.decay, update_interval=training.ema.update_every,
                  start_step=training.ema.start_step, device="cpu" if training.ema.device == "cpu" else None)
    adaptive = None
    if training.loss_weighting == "adaptive":
        from cascade_core.diffusion.objective import AdaptiveLossWeight

        adaptive = AdaptiveLossWeight().to(device)
    empty = text.empty()
    scaler = torch.amp.GradScaler(device.type) if autocast_dtype == torch.float16 else None
    dist.diverge_rng(training.seed)  # each rank its own noise from here on (rank 0: unchanged)

    graphed = None  # performance.cuda_graphs: the micro-batch forward + backward replayed from a CUDA graph
    if recipe.performance.cuda_graphs:
        from runner.graphed_step import GraphedLoss, graph_support_problem

        problem = graph_support_problem(device, dist.world_size)
        if problem is not None:
            raise UserError(problem)
        graphed = GraphedLoss(prior, params, training, autocast_dtype=autocast_dtype, adaptive=adaptive,
                              accumulation_steps=training.gradient_accumulation_steps)

    state = TrainState()
    if resume_from is not None:
        # FSDP: the full optimizer state of an unsharded checkpoint stays on the host; loading shards it
        ckpt = load_checkpoint(resume_from, map_location="cpu" if dist.fsdp else device, restore_rng=False)
        dist.check_sharding(ckpt.sharded, resume_from)
        dist.check_world_size(ckpt.rng_states, resume_from)
        if ckpt.sharded is not None:  # each rank reads its own shards; no full tensor anywhere
            dist.load_sharded(prior, optimizer, resume_from)
        else:
            dist.load_trainable(prior, ckpt.trainable, resume_from)
            dist.load_optimizer(prior, optimizer, ckpt.optimizer)
        scheduler.load_state_dict(ckpt.scheduler)
        if ema is not None and ckpt.ema is not None:
            ema.load_state_dict(ckpt.ema)
        if adaptive is not None and ckpt.loss_weight is not None:
            adaptive.load_state_dict({k: v.to(device) for k, v in ckpt.loss_weight.items()})
        try:
            loader.load_state_dict(ckpt.data_cursor["loader"])
        except ValueError as err:
            raise UserError(f"resume from {resume_from}: {err}") from None
        state.step, state.samples = ckpt.step, int(ckpt.data_cursor.get("samples", 0))
        restore_rng_state(ckpt.rng_states[dist.rank])  # last: nothing random may run after it

    logger = RunLogger(out, report_to=recipe.logging.report_to, total_steps=steps, start_step=state.step,
                       is_main=dist.is_main, progress_bar=recipe.logging.progress_bar,
                       run_name=recipe.logging.run_name,
                       wandb_project=recipe.logging.wandb_project or "cascade-runner", device=device)

    def checkpoint() -> None:
        """Rank 0 writes the folder; every rank hands over its RNG state and under FSDP writes its shards."""
        rng_states = dist.gather_objects(capture_rng_state())
        if pusher is not None:
            pusher.wait()  # the save below may prune the folder still going up
        small = dict(scheduler_state=scheduler.state_dict(), recipe_text=recipe_text,
                     data_cursor={"loader": loader.state_dict(), "samples": state.samples},
                     loss_weight_state=adaptive.state_dict() if adaptive is not None else None,
                     keep_last=recipe.checkpoints.keep_last, rng_states=rng_states)
        if dist.fsdp:  # EMA is refused with FSDP (runner/distributed.session)
            model_state, optimizer_state = dist.sharded_state(prior, optimizer)
            path = save_sharded_checkpoint(out, state.step, dist=dist, model_state=model_state,
                                           optimizer_state=optimizer_state, **small)
        else:
            path = dist.on_main(lambda: save_checkpoint(
                out, state.step, trainable=dist.trainable_state(prior),
                optimizer_state=optimizer.state_dict(),
                ema_state=ema.state_dict() if ema is not None else None, **small))
        if path is not None:  # rank 0: the step folder
            logger.add_file(path.parent)
            if pusher is not None:
                pusher.checkpoint_written(path)

    def validate() -> None:
        """Rank 0 samples with the plain prior (FSDP: a gathered copy) while the others wait."""
        if not recipe.validation.enabled:
            return
        plain = dist.plain_prior(prior, device)

        def run() -> None:
            if ema is not None:
                with ema.swap_into(plain):
                    written = validation.run(plain, state.step)
            else:
                written = validation.run(plain, state.step)
            logger.add_file(written)

        dist.on_main(run)

    if recipe.validation.at_start and state.step == 0:
        validate()

    # ---- the loop
    accum = training.gradient_accumulation_steps
    micro = 0
    started = time.perf_counter()
    window_loss, window_samples = 0.0, 0
    while state.step < steps:
        micro_before, fresh_epoch = micro, loader.cursor == 0  # a resume may land at an epoch's end
        for batch in loader:
            if not batch["keys"]:
                continue  # every image of this batch failed to decode (listed in batch["skipped"])
            latents = _latents(batch, effnet, latent_cache, recipe.data.cache.encoder_batch_size, device)
            cond = _conditioning(batch["captions"], text, text_cache, empty, training.caption_dropout,
                                 recipe.data.cache.text_batch_size, device)
            if graphed is not None:  # one process, so nothing to synchronise; adds into .grad itself
                result = graphed(latents, cond)
            else:
                with dist.accumulating(model, sync=(micro + 1) % accum == 0):  # reduce grads on the last
                    result = stage_c_loss(model, latents, cond, training, step=state.step,
                                          autocast_dtype=autocast_dtype, adaptive=adaptive)
                    loss = result.loss / accum
                    (scaler.scale(loss) if scaler is not None else loss).backward()
            window_loss += float(result.loss.detach())
            if adaptive is not None:  # every rank updates with the global batch, so they stay equal
                raw, logsnr = dist.gather_cat(result.raw), dist.gather_cat(result.logsnr)
                if bool(torch.isfinite(raw).all()):
                    adaptive.update(logsnr, raw)
            window_samples += latents.shape[0]
            micro += 1
            if micro % accum:
                continue
            if scaler is not None:
                scaler.unscale_(optimizer)
            grad_norm = dist.clip_gradients(params, training.max_grad_norm)
            window_loss, window_samples = dist.sum_floats(window_loss, window_samples)
            window_loss /= dist.world_size  # the mean over ranks of each rank's mean micro-batch loss
            state.samples += int(window_samples)
            finite = all_finite(torch.tensor(window_loss), grad_norm)
            if finite:
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                state.nonfinite_in_a_row = 0
            else:
                state.skipped_nonfinite += 1
                state.nonfinite_in_a_row += 1
            optimizer.zero_grad(set_to_none=graphed is None)  # graphs add into the same .grad tensors
            state.step += 1
            if finite and ema is not None:
                ema.update(state.step)
            mean_loss = window_loss / accum
            window_loss, window_samples = 0.0, 0
            lr = scheduler.get_last_lr()[0]
            logger.progress(state.step, loss=mean_loss, lr=lr)
            if state.step % recipe.logging.every_n_steps == 0 or state.step == steps:
                logger.log(state.step, {
                    "loss": mean_loss if finite else None, "objective": loss_name(training), "lr": lr,
                    "grad_norm": float(grad_norm), "epoch": loader.epoch, "samples": state.samples,
                    "skipped_nonfinite": state.skipped_nonfinite, "rollout_forwards": result.extra_forwards,
                    "text_cache_hits": text_cache.hits if text_cache else None,
                    "latent_cache_hits": latent_cache.hits if latent_cache else None,
                    "cuda_graphs": graphed.captures if graphed is not None else None,
                    "elapsed_s": round(time.perf_counter() - started, 3)})
            if state.nonfinite_in_a_row > MAX_NONFINITE_IN_A_ROW:
                checkpoint()
                raise NonFiniteLossError(
                    f"{state.nonfinite_in_a_row} optimizer steps in a row had a NaN/inf loss or gradient "
                    f"(step {state.step}); the weights were left untouched and a checkpoint was saved. Check "
                    "training.precision (use mixed_precision bf16 or no; fp16 overflows in Stage C), lower "
                    "training.learning_rate, or set training.max_grad_norm")
            if state.step % recipe.checkpoints.every_n_steps == 0 or state.step == steps:
                checkpoint()
            if recipe.validation.enabled and (
                    state.step % recipe.validation.every_n_steps == 0 or state.step == steps):
                validate()
            if state.step >= steps:
                break
        if micro == micro_before and fresh_epoch:
            raise UserError("data: a whole epoch produced no usable batch (every image failed to decode?); "
                            "run `runner plan` on the recipe to see the skipped samples")

    # ---- the end: exports and the summary
    from runner.export import export_training_result

    plain = dist.plain_prior(prior, torch.device("cpu"))  # FSDP: gathered on rank 0's host

    def export() -> None:
        for path in export_training_result(recipe, plain, ema, out):
            logger.add_file(path)

    dist.on_main(export)
    summary = logger.finish(step=state.step, samples=state.samples, skipped_steps=state.skipped_nonfinite)
    if pusher is not None:  # rank 0; the files are all written, so a failed upload loses nothing
        url = pusher.finish(out, loaded.resolved)
        if url is not None:
            note(f"pushed to {url}")
    return summary
