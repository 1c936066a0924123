"""Stage C LoRA training-step benchmark: ours vs diffusers' StableCascadeUNet + PEFT, JSON out.

    python tools/bench_train_step.py --with-diffusers --out bench_train_step.json
    python tools/bench_train_step.py --cases ours:stage-c:bf16:4 ours:stage-c:bf16:4:compile --profile 0

A case is `impl:flavour:mode:batch[:flag,...]`: impl `ours` | `diffusers`; flavour `stage-c` |
`stage-c-lite` | `tiny`; mode `fp32` (TF32 off) | `tf32` | `bf16-autocast` (fp32 weights) | `bf16`
(frozen base in bf16, LoRA in fp32) | `int8` (ours: int8 base, bf16 activations, LoRA fp32); flags
`ckpt` (gradient checkpointing), `compile` (ours: runner.performance.compile_blocks),
`nchw` (ours: contiguous activations instead of channels-last, for A/B), `graph` (ours: the product's
`performance.cuda_graphs`, runner/graphed_step.py: the training loss of recipes/stage_c_lora.yaml with
its forward + backward captured as a CUDA graph and replayed, fused AdamW outside the graph).

Both models are built from random weights on the meta device and materialized on the GPU (no CPU
copy), LoRA rank 16 / alpha 16 on the attention projections (ours: fused in_proj + out_proj,
`inject_lora(targets="attention")`; diffusers: to_q/to_k/to_v/to_out.0 through PEFT). One step =
forward + MSE loss + backward + fused AdamW on the LoRA parameters, same inputs for both: 24x24
latents, 77 text tokens. Reported per case: median step time (CUDA events, after warm-up), peak
memory, FLOPs counted by FlopCounterMode on one eager step, TFLOP/s, utilization of a bf16 matmul
peak measured in the same run, compile time; then ours/diffusers ratios and the issue's targets.
`diffusers` and `peft` are imported only for diffusers cases (the `bench` extra, never the product).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tools"), str(ROOT)]
from bench_profile import attention_kernels, profile_steps  # noqa: E402

from cascade_core.formats import original_to_diffusers_config  # noqa: E402
from cascade_core.models.stage_c import StageC, StageCConfig  # noqa: E402
from cascade_core.peft.lora import inject_lora  # noqa: E402
from cascade_core.quant.int8 import quantize_model_  # noqa: E402
from runner.performance import compile_blocks, set_attention_backend  # noqa: E402

MODES = ("fp32", "tf32", "bf16-autocast", "bf16", "int8")
RANK, TEXT_TOKENS, LATENT = 16, 77, 24
SPEED_FLAGS = frozenset({"compile", "nchw", "graph"})  # ours only; none changes the maths
DEFAULT_CASES = [
    *(
        f"{impl}:stage-c:{mode}:4"
        for mode in ("fp32", "tf32", "bf16-autocast", "bf16")
        for impl in ("ours", "diffusers")
    ),
    "ours:stage-c:bf16:4:nchw",
    "ours:stage-c:bf16:4:ckpt",
    "diffusers:stage-c:bf16:4:ckpt",
    "ours:stage-c:int8:4:ckpt",
    "ours:stage-c:bf16:16",
    "diffusers:stage-c:bf16:16",
    *(f"{impl}:stage-c-lite:{mode}:4" for mode in ("tf32", "bf16") for impl in ("ours", "diffusers")),
    "ours:stage-c:bf16:4:compile",
    "ours:stage-c:bf16:16:compile",
]


@dataclass(frozen=True)
class Case:
    impl: str
    flavour: str
    mode: str
    batch: int
    flags: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def parse(cls, text: str) -> Case:
        parts = text.split(":")
        if len(parts) not in (4, 5):
            raise SystemExit(f"case {text!r}: expected impl:flavour:mode:batch[:flags]")
        impl, flavour, mode, batch = parts[:4]
        flags = frozenset(f for f in (parts[4].split(",") if len(parts) == 5 else []) if f)
        if impl not in ("ours", "diffusers") or mode not in MODES or flags - {"ckpt", *SPEED_FLAGS}:
            raise SystemExit(f"case {text!r}: unknown impl, mode or flag")
        if impl == "diffusers" and (mode == "int8" or flags & SPEED_FLAGS):
            raise SystemExit(f"case {text!r}: int8 / compile / nchw / graph are cases of ours only")
        return cls(impl, flavour, mode, int(batch), flags)

    @property
    def label(self) -> str:
        tail = ":" + ",".join(sorted(self.flags)) if self.flags else ""
        return f"{self.impl}:{self.flavour}:{self.mode}:{self.batch}{tail}"

    @property
    def weight_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.mode in ("bf16", "int8") else torch.float32


def set_precision(mode: str) -> None:
    """fp32 = bit-faithful fp32 (TF32 off for matmuls and convolutions); every other mode allows TF32."""
    tf32 = mode != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> None:
    """N(0, 0.02) for every floating parameter: no zero weights (zeros time faster than real data)."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for p in model.parameters():
        if p.is_floating_point():
            p.normal_(0.0, 0.02, generator=gen)


def build_ours(case: Case, device: torch.device) -> nn.Module:
    model = StageC(StageCConfig.preset(case.flavour), device="meta", dtype=case.weight_dtype)
    model.to_empty(device=device)
    randomize_(model)
    if case.mode == "int8":
        quantize_model_(model, "int8")
    inject_lora(model, rank=RANK, alpha=RANK, targets="attention", dtype=torch.float32)
    model.set_gradient_checkpointing("ckpt" in case.flags)
    if "nchw" in case.flags:
        model.memory_format = torch.contiguous_format
    return model.train()


def build_diffusers(case: Case, device: torch.device) -> nn.Module:
    from diffusers.models.unets.unet_stable_cascade import StableCascadeUNet
    from peft import LoraConfig, inject_adapter_in_model

    config = original_to_diffusers_config(StageCConfig.preset(case.flavour).to_dict())
    config.pop("_class_name", None)
    with torch.device("meta"):
        unet = StableCascadeUNet(**config).to(case.weight_dtype)
    unet.to_empty(device=device)
    randomize_(unet)
    lora = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    unet = inject_adapter_in_model(lora, unet)
    for name, p in unet.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_" in name:
            p.data = p.data.float()  # LoRA in fp32 over any base, as ours
    if "ckpt" in case.flags:
        unet.enable_gradient_checkpointing()
    return unet.train()


def make_inputs(batch: int, cfg: StageCConfig, device: torch.device) -> dict[str, Tensor]:
    gen = torch.Generator(device=device).manual_seed(1)
    kw = {"device": device, "generator": gen}
    return {
        "x": torch.randn(batch, cfg.c_in, LATENT, LATENT, **kw),
        "r": torch.rand(batch, **kw),
        "clip_text": torch.randn(batch, TEXT_TOKENS, cfg.c_clip_text, **kw),
        "clip_text_pooled": torch.randn(batch, 1, cfg.c_clip_text_pooled, **kw),
        "clip_img": torch.randn(batch, 1, cfg.c_clip_img, **kw),
        "target": torch.randn(batch, cfg.c_out, LATENT, LATENT, **kw),
    }


def make_step(case: Case, model: nn.Module, inputs: dict[str, Tensor]) -> Callable[[], float]:
    act = case.weight_dtype
    x, target = inputs["x"].to(act), inputs["target"]
    clips = {k: inputs[k].to(act) for k in ("clip_text", "clip_text_pooled", "clip_img")}
    params = [p for p in model.parameters() if p.requires_grad]
    fused = params[0].is_cuda
    opt = torch.optim.AdamW(params, lr=1e-4, fused=fused or None)
    autocast = case.mode == "bf16-autocast"
    if case.impl == "ours":
        r = inputs["r"]

        def forward() -> Tensor:
            return model(x, r, **clips)
    else:
        r = inputs["r"].to(act)  # diffusers casts its r-embedding to r's dtype

        def forward() -> Tensor:
            return model(x, r, return_dict=False, **clips)[0]

    def step() -> float:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = forward()
        loss = F.mse_loss(out.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def make_graphed_step(case: Case, model: nn.Module, inputs: dict[str, Tensor]) -> Callable[[], Tensor]:
    """The product's `performance.cuda_graphs` path: runner.graphed_step.GraphedLoss (stage_c_loss of
    recipes/stage_c_lora.yaml: noise, t ~ U, P2 weight; forward + backward captured per shape) and the
    fused AdamW step outside the graph, as runner/train.py runs them."""
    from cascade_core.models.text import TextConditioning
    from runner.graphed_step import GraphedLoss
    from runner.recipe import read_recipe

    training = read_recipe(ROOT / "recipes" / "stage_c_lora.yaml", paths="warn").spec.training
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    # as runner/train.py: mixed_precision bf16 autocasts in both bf16 modes (bf16 weights or fp32 weights)
    autocast = torch.bfloat16 if case.mode in ("bf16-autocast", "bf16", "int8") else None
    graphed = GraphedLoss(model, params, training, autocast_dtype=autocast, adaptive=None,
                          accumulation_steps=1)
    latents = inputs["x"]  # fp32, as the loop hands them over
    cond = TextConditioning(inputs["clip_text"], inputs["clip_text_pooled"], inputs["clip_img"])

    def step() -> Tensor:
        loss = graphed(latents, cond).loss
        opt.step()
        opt.zero_grad(set_to_none=False)  # the graph adds into these .grad tensors
        return loss

    return step


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds for one call, measured with CUDA events on the GPU."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1000


def count_flops(step: Callable[[], object]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def matmul_peak(device: torch.device, n: int = 8192) -> float:
    """bf16 n^3 matmul TFLOP/s on random data (median of 20 after 3 warm-ups)."""
    if device.type != "cuda":
        return float("nan")
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = [timed(lambda: a @ b, device) for _ in range(20)]
    return 2 * n**3 / statistics.median(times) / 1e12


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_case(case: Case, device: torch.device, args, flops_cache: dict, peak: float) -> dict:
    set_precision(case.mode)
    torch._dynamo.reset()
    builder = build_ours if case.impl == "ours" else build_diffusers
    model = builder(case, device)
    inputs = make_inputs(case.batch, StageCConfig.preset(case.flavour), device)
    step = make_step(case, model, inputs)
    result: dict = {"case": case.label, **asdict(case), "flags": sorted(case.flags)}
    key = (case.impl, case.flavour, case.batch, "ckpt" in case.flags)
    if key not in flops_cache:
        flops_cache[key] = count_flops(step)  # one eager step, before compile / capture
    if "compile" in case.flags:
        compile_blocks(model)
    start = time.perf_counter()
    if "graph" in case.flags:
        step = make_graphed_step(case, model, inputs)  # captures on its first call (timed below)
    first = timed(step, device)  # includes torch.compile when on, cuDNN/cuBLAS autotuning otherwise
    setup = time.perf_counter() - start
    for _ in range(args.warmup - 1):
        step()
    # a graph's activations were allocated while it was captured (in its pool): keep that peak
    capture_peak = peak_gib(device) if "graph" in case.flags else 0.0
    free(device)
    times = [timed(step, device) for _ in range(args.steps)]
    s = statistics.median(times)
    flops = flops_cache[key]
    result.update(
        s_per_step=round(s, 4),
        step_times=[round(t, 4) for t in times],
        peak_gib=round(max(capture_peak, peak_gib(device)), 2),
        reserved_gib=round(torch.cuda.memory_reserved(device) / 2**30, 2) if device.type == "cuda" else None,
        tflop_per_step=round(flops / 1e12, 2),
        tflops=round(flops / s / 1e12, 1),
        util_pct=round(100 * flops / s / 1e12 / peak, 1),
        first_step_s=round(first, 2),
        compile_s=round(setup - s, 1) if case.flags & {"compile", "graph"} else None,
    )
    if case.label in args.profile_cases:
        name = "".join(ch if ch.isalnum() else "_" for ch in case.label)
        result["profile"] = profile_steps(step, s, Path(args.out).with_suffix(f".{name}.prof.txt"))
    del model, step
    free(device)
    return result


def ratios(results: list[dict]) -> list[dict]:
    """ours / diffusers for every (flavour, mode, batch, ckpt) measured by both, plus the fp32 target pair."""
    by = {r["case"]: r for r in results if "s_per_step" in r}
    out = []
    for label, ours in by.items():
        if not label.startswith("ours:"):
            continue
        flags = set(ours["flags"]) - SPEED_FLAGS
        tail = ":" + ",".join(sorted(flags)) if flags else ""
        other = f"diffusers:{ours['flavour']}:{ours['mode']}:{ours['batch']}{tail}"
        pairs = [other] + ([other.replace(":tf32:", ":fp32:")] if ours["mode"] == "tf32" else [])
        for ref in pairs:
            if ref in by:
                d = by[ref]
                out.append(
                    {
                        "ours": label,
                        "diffusers": ref,
                        "speedup": round(d["s_per_step"] / ours["s_per_step"], 2),
                        "memory_ratio": round(ours["peak_gib"] / d["peak_gib"], 2),
                    }
                )
    return out


def targets(results: list[dict]) -> dict:
    """The issue-12 targets, each with the measured value (None when its case did not run)."""
    by = {r["case"]: r for r in results if "s_per_step" in r}

    def best(*labels: str) -> dict | None:
        found = [by[label] for label in labels if label in by]
        return min(found, key=lambda r: r["s_per_step"]) if found else None

    fast = ("", ":compile", ":graph", ":compile,graph")  # product switches (nchw is an A/B only)
    b4 = best(*(f"ours:stage-c:bf16:4{f}" for f in fast))
    b16 = best(*(f"ours:stage-c:bf16:16{f}" for f in fast))
    int8 = by.get("ours:stage-c:int8:4:ckpt")
    ours32, d32 = by.get("ours:stage-c:tf32:4"), by.get("diffusers:stage-c:fp32:4")
    return {
        "bf16_b4_s_le_0.14": b4
        and {"case": b4["case"], "value": b4["s_per_step"], "met": b4["s_per_step"] <= 0.14},
        "bf16_b4_util_ge_30": b4
        and {"case": b4["case"], "value": b4["util_pct"], "met": (b4["util_pct"] or 0) >= 30},
        "bf16_b16_util_ge_45": b16
        and {"case": b16["case"], "value": b16["util_pct"], "met": (b16["util_pct"] or 0) >= 45},
        "int8_ckpt_peak_le_8gib": int8 and {"value": int8["peak_gib"], "met": int8["peak_gib"] <= 8},
        "fp32_mode_speedup_ge_2.5": (ours32 and d32)
        and {
            "note": "ours mixed_precision: no (allow_tf32 default true) vs diffusers fp32 defaults",
            "value": round(d32["s_per_step"] / ours32["s_per_step"], 2),
            "met": d32["s_per_step"] / ours32["s_per_step"] >= 2.5,
        },
    }


def print_table(results: list[dict]) -> None:
    head = f"{'case':42} {'s/step':>7} {'GiB':>6} {'TFLOP':>6} {'TFLOP/s':>8} {'%peak':>6} {'compile':>7}"
    print(head)
    for r in results:
        if "error" in r:
            print(f"{r['case']:42} ERROR {r['error'][:60]}")
            continue
        cells = [
            r["s_per_step"],
            r["peak_gib"],
            r["tflop_per_step"],
            r["tflops"],
            r["util_pct"],
            r["compile_s"],
        ]
        print(
            f"{r['case']:42} "
            + " ".join(
                f"{'-' if v is None else v:>{w}}" for v, w in zip(cells, (7, 6, 6, 8, 6, 7), strict=True)
            )
        )


def merge(paths: list[Path], out: Path) -> dict:
    """One report from several runs (e.g. eager and compile cases run separately); later cases win."""
    reports = [json.loads(p.read_text()) for p in paths]
    merged = {
        k: v for r in reversed(reports) for k, v in r.items() if k not in ("results", "ratios", "targets")
    }
    merged["matmul_peak_tflops_per_run"] = [r["matmul_peak_tflops"] for r in reports]
    by_case = {}
    for report in reports:
        for r in report["results"]:
            by_case[r["case"]] = {**r, "matmul_peak_tflops": report["matmul_peak_tflops"]}
    flops = {
        (r["impl"], r["flavour"], r["batch"], "ckpt" in r["flags"]): r["tflop_per_step"]
        for r in by_case.values()
        if r.get("tflop_per_step")
    }
    for r in by_case.values():  # runs that skipped the count take it from the same model and batch
        tflop = flops.get((r.get("impl"), r.get("flavour"), r.get("batch"), "ckpt" in r.get("flags", [])))
        if "s_per_step" in r and not r.get("tflop_per_step") and tflop:
            r["tflop_per_step"], r["tflops"] = tflop, round(tflop / r["s_per_step"], 1)
            r["util_pct"] = round(100 * r["tflops"] / r["matmul_peak_tflops"], 1)  # its own run's peak
    merged["results"] = list(by_case.values())
    merged["ratios"], merged["targets"] = ratios(merged["results"]), targets(merged["results"])
    out.write_text(json.dumps(merged, indent=1))
    print_table(merged["results"])
    print(json.dumps({"ratios": merged["ratios"], "targets": merged["targets"]}, indent=1))
    return merged


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="*", default=DEFAULT_CASES)
    parser.add_argument("--with-diffusers", action="store_true", help="run the diffusers + PEFT cases")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--profile", type=int, nargs="*", default=[], help="indices in --cases to profile")
    parser.add_argument("--attention-backend", default="auto", help="runner.performance SDPA choice")
    parser.add_argument("--attention", action="store_true", help="also time SDPA backends at Stage C's shape")
    parser.add_argument("--merge", nargs="*", default=None, help="only merge these JSON reports into --out")
    parser.add_argument("--out", default="bench_train_step.json")
    args = parser.parse_args(argv)
    if args.merge is not None:
        return merge([Path(p) for p in args.merge], Path(args.out))
    cases = [Case.parse(c) for c in args.cases]
    args.profile_cases = {cases[i].label for i in args.profile}
    if not args.with_diffusers:
        cases = [c for c in cases if c.impl == "ours"]
    device = torch.device(args.device)
    set_attention_backend(args.attention_backend)
    report: dict = {
        "attention_backend": args.attention_backend,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "matmul_peak_tflops": round(matmul_peak(device), 1),
        "results": [],
    }
    if args.attention and device.type == "cuda":
        report["attention_ms"] = attention_kernels(device)
        print("attention fwd+bwd ms:", report["attention_ms"], flush=True)
    if args.with_diffusers:
        import diffusers
        import peft

        report.update(diffusers=diffusers.__version__, peft=peft.__version__)
    flops_cache: dict = {}
    for case in cases:
        print(f"-- {case.label}", flush=True)
        try:
            result = run_case(case, device, args, flops_cache, report["matmul_peak_tflops"])
        except Exception as err:  # one failing case must not lose the others
            result = {"case": case.label, "error": f"{type(err).__name__}: {err}"[:500]}
            free(device)
        report["results"].append(result)
        report["ratios"], report["targets"] = ratios(report["results"]), targets(report["results"])
        Path(args.out).write_text(json.dumps(report, indent=1))
    print_table(report["results"])
    print(json.dumps({"ratios": report["ratios"], "targets": report["targets"]}, indent=1))
    return report


if __name__ == "__main__":
    main()
