"""Multi-GPU scaling of the real recipes through torchrun, from synthesized real-size weights: JSON out.

    python tools/bench_distributed.py --work /tmp/dist --gpus 2 --out bench_distributed.json

1. Real-size random weights for the lite prior (tools/synthesize_checkpoints.py) and a shard set.
2. `recipes/stage_c_lite_lora.yaml` (LoRA over DDP) on 1 GPU and on `--gpus` GPUs with the same per-GPU
   batch: samples/s and the speed-up.
3. `recipes/stage_c_full.yaml` on the lite prior over FSDP2 on `--gpus` GPUs: step time and peak memory
   of rank 0 (the ranks are symmetric).
Validation is off: this measures training. Each run is a separate `runner` process, as a user starts it.
"""
from __future__ import annotations

import argparse
import json
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

    def train(name: str, recipe: str, nproc: int, steps: int, extra: list[str]) -> dict:
        launcher = [py, "-m", "runner"] if nproc == 1 else [
            py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "runner"]
        out = work / name
        overrides = [*common, f"output.dir={out}", f"training.max_steps={steps}",
                     f"checkpoints.every_n_steps={steps}",
                     f"training.scheduler.warmup_steps={max(1, steps // 10)}",
                     *extra, *args.override]
        wall = run([*launcher, f"recipes/{recipe}", *overrides], work / f"{name}.log")
        metrics = report(out, wall)
        last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])  # samples of all ranks
        metrics["samples_per_s"] = round(last["samples"] / last["step"] / metrics["median_step_s"], 2)
        print(name, json.dumps(metrics), flush=True)
        return metrics

    lora = ["model.decoder=null", "training.gradient_checkpointing=false"]
    if not args.skip_single:
        result["lora_1gpu"] = train("lora_1gpu", "stage_c_lite_lora.yaml", 1, args.lora_steps, lora)
    result[f"lora_{args.gpus}gpu"] = train(f"lora_{args.gpus}gpu", "stage_c_lite_lora.yaml", args.gpus,
                                           args.lora_steps, lora)
    if not args.skip_single:
        result["lora_speedup"] = round(result[f"lora_{args.gpus}gpu"]["samples_per_s"]
                                       / result["lora_1gpu"]["samples_per_s"], 2)
    result[f"fsdp_full_{args.gpus}gpu"] = train(
        f"fsdp_full_{args.gpus}gpu", "stage_c_full.yaml", args.gpus, args.full_steps,
        ["model.decoder=null", "distributed.strategy=fsdp", "training.ema.enabled=false",
         "export.full_formats=[original]", "export.dtype=bf16"])
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({"lora_speedup": result.get("lora_speedup")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
