"""Multi-GPU scaling of the real recipes through torchrun, from synthesized real-size weights: JSON out.

    python tools/bench_distributed.py --work /tmp/dist --gpus 2 --out bench_distributed.json

1. Real-size random weights for the lite prior (tools/synthesize_checkpoints.py) and a shard set.
2. `recipes/stage_c_lite_lora.yaml` (LoRA over DDP) on 1 GPU and on `--gpus` GPUs with the same per-GPU
   batch: samples/s and the speed-up.
3. `recipes/stage_c_full.yaml` on the lite prior over FSDP2 on `--gpus` GPUs: step time and peak memory
   of rank 0 (the ranks are symmetric).
4. With `--resume-check`: the FSDP run also checkpoints half-way, a second run resumes from that sharded
   checkpoint, and the JSON lists both runs' losses. The first resumed step must repeat the uninterrupted
   loss exactly (weights, optimizer state, batch and RNG states all come back); later steps may differ by
   the GPU's reduction-order noise.
Validation is off: this measures training. Each run is a separate `runner` process, as a user starts it.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_e2e import make_images, report, run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--lora-steps", type=int, default=60)
    parser.add_argument("--full-steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("bench_distributed.json"))
    parser.add_argument("--skip-single", action="store_true", help="skip the 1-GPU LoRA baseline run")
    parser.add_argument("--skip-lora", action="store_true", help="run only the FSDP full fine-tune")
    parser.add_argument("--resume-check", action="store_true",
                        help="resume the FSDP run from its half-way checkpoint and compare the losses")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra recipe overrides, applied last (e.g. a CPU smoke run on tiny weights)")
    args = parser.parse_args(argv)
    work, py = args.work, sys.executable
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "checkpoints"
    if not (ckpt / "README.txt").is_file():
        run([py, "tools/synthesize_checkpoints.py", str(ckpt), "--priors", "stage-c-lite"],
            work / "synth.log")
    make_images(work / "images", 16 * args.gpus * 4)
    run([py, "tools/shard_dataset.py", "--input", str(work / "images"), "--output", str(work / "shards"),
         "--samples-per-shard", "32", "--workers", "8"], work / "shard.log")
    models = ("model.prior.path", "model.text_encoder.path", "model.tokenizer.path", "model.effnet.path",
              "model.previewer.path")
    common = [f"{key}={ckpt}" for key in models]
    common += ["model.prior.subfolder=prior_lite", "model.prior.filename=null", "model.flavour=stage-c-lite",
               f"data.sources.0.path={work / 'shards'}/*.tar", "validation.enabled=false",
               "logging.progress_bar=false", "data.workers=4", "output.overwrite=true",
               f"data.cache.text_embeddings_dir={work / 'cache'}"]
    result: dict = {"gpus": args.gpus}

    def train(name: str, recipe: str, nproc: int, steps: int, extra: list[str], every: int = 0) -> dict:
        launcher = [py, "-m", "runner"] if nproc == 1 else [
            py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "runner"]
        out = work / name
        overrides = [*common, f"output.dir={out}", f"training.max_steps={steps}",
                     f"checkpoints.every_n_steps={every or steps}",
                     f"training.scheduler.warmup_steps={max(1, steps // 10)}",
                     *extra, *args.override]
        wall = run([*launcher, f"recipes/{recipe}", *overrides], work / f"{name}.log")
        metrics = report(out, wall)
        last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])  # samples of all ranks
        metrics["samples_per_s"] = round(last["samples"] / last["step"] / metrics["median_step_s"], 2)
        print(name, json.dumps(metrics), flush=True)
        return metrics

    lora = ["model.decoder=null", "training.gradient_checkpointing=false"]
    single = not (args.skip_single or args.skip_lora)  # the 1-GPU LoRA baseline
    if single:
        result["lora_1gpu"] = train("lora_1gpu", "stage_c_lite_lora.yaml", 1, args.lora_steps, lora)
    if not args.skip_lora:
        result[f"lora_{args.gpus}gpu"] = train(f"lora_{args.gpus}gpu", "stage_c_lite_lora.yaml", args.gpus,
                                               args.lora_steps, lora)
    if single:
        result["lora_speedup"] = round(result[f"lora_{args.gpus}gpu"]["samples_per_s"]
                                       / result["lora_1gpu"]["samples_per_s"], 2)
    full = f"fsdp_full_{args.gpus}gpu"
    fsdp = ["model.decoder=null", "distributed.strategy=fsdp", "training.ema.enabled=false",
            "export.full_formats=[original]", "export.dtype=bf16"]
    half = args.full_steps // 2
    result[full] = train(full, "stage_c_full.yaml", args.gpus, args.full_steps, fsdp,
                         every=half if args.resume_check else 0)
    if args.resume_check:
        checkpoint = work / full / "checkpoints" / f"step_{half:06d}"
        shutil.rmtree(work / f"{full}_resumed", ignore_errors=True)  # this tool's own earlier output
        train(f"{full}_resumed", "stage_c_full.yaml", args.gpus, args.full_steps,
              [*fsdp, f"checkpoints.resume={checkpoint}", "output.overwrite=false"], every=half)
        result["resume_check"] = compare_losses(work / full, work / f"{full}_resumed", half)
        print("resume_check", json.dumps(result["resume_check"]), flush=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({"lora_speedup": result.get("lora_speedup")}))
    return 0


def compare_losses(straight: Path, resumed: Path, from_step: int) -> dict:
    """The resumed run's logged losses next to the uninterrupted run's, step by step."""
    def losses(out: Path) -> dict[int, float]:
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows}

    before, after = losses(straight), losses(resumed)
    steps = sorted(after)
    if not steps or steps[0] != from_step + 1:
        raise SystemExit(f"{resumed} did not continue from step {from_step}: logged steps {steps}")
    rel = [abs(after[s] - before[s]) / abs(before[s]) for s in steps]
    return {"resumed_from_step": from_step, "steps": steps,
            "loss_uninterrupted": [before[s] for s in steps], "loss_resumed": [after[s] for s in steps],
            "first_resumed_step_equal": after[steps[0]] == before[steps[0]],
            "max_relative_difference": max(rel)}


if __name__ == "__main__":
    sys.exit(main())
