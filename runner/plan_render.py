"""The text form of `runner plan`: sections for people, from the plain data `runner.plan.make_plan` returns.

Kept apart from the plan itself so the data (also the `--json` output) and its wording change separately.
"""

from __future__ import annotations

from typing import Any


def _n(x: int | None) -> str:
    return "?" if x is None else f"{x:,}"


def _render_sources(plan: dict[str, Any]) -> list[str]:
    lines = ["", "models and files:"]
    for s in plan["sources"]:
        if s["kind"] == "local":
            lines.append(f"  {s['role']}: local {s['path']}" + ("" if s["exists"] else "  (MISSING)"))
            continue
        state = "in the local HF cache" if s["cached"] else "would be downloaded"
        lines.append(f"  {s['role']}: hub {s['repo']}@{s['revision']} ({state})")
        for f in s["files"]:
            mark = f"cached: {', '.join(f['cached'])}" if f["cached"] else "not cached"
            lines.append(f"    {f['pattern']}  [{mark}]")
    return lines


def _render_data(plan: dict[str, Any]) -> list[str]:
    lines = ["", "data:"]
    for d in plan["data"]:
        lines.append(
            f"  {d['name']} ({d['type']} {d['path']}, repeats {d['repeats']}, probability "
            f"{d['probability']}): {d['samples']} samples"
        )
        if "error" in d:
            lines.append(f"    {d['error']}")
        for what in ("skipped", "filtered"):
            info = d[what]
            if info["count"]:
                reasons = "; ".join(f"{n} x {r}" for r, n in info["reasons"].items())
                lines.append(f"    {what} {info['count']}: {reasons} (e.g. {info['examples'][0][0]})")
    if plan["buckets"]:
        lines += [
            "",
            "buckets (latent cells h x w, training px, encoder px, samples per epoch after pruning):",
        ]
        for b in plan["buckets"]:
            (h, w), (ph, pw), (eh, ew) = b["cells"], b["pixels"], b["encoder"]
            lines.append(f"  {b['source']}: {h}x{w} cells  {ph}x{pw} px  encoder {eh}x{ew}  {b['samples']}")
    st = plan["steps"]
    lines += [
        "",
        f"steps: {_n(st['per_epoch'])} batches per epoch (batch {st['batch_size']}, gradient "
        f"accumulation {st['gradient_accumulation']}), {_n(st['total'])} optimizer steps in total"
        + (f" = {st['epochs']} epochs" if st["epochs"] else ""),
    ]
    return lines


def _render_cache(plan: dict[str, Any]) -> list[str]:
    t, lat = plan["cache"]["text_embeddings"], plan["cache"]["latents"]
    on = {True: "on", False: "off"}
    lines = [
        "",
        "caches:",
        f"  text embeddings ({on[t['enabled']]}, {t['dir']}): encoder {t['encoder']}; "
        + (
            f"{t['cached']} of {t['captions']} captions cached"
            if "cached" in t
            else f"{t['captions']} captions, cached count unknown until the encoder is downloaded"
        ),
    ]
    latents = f"  latents ({on[lat['enabled']]}, {lat['dir']}): encoder {lat['encoder']}"
    if "crops_per_epoch" in lat:
        latents += (
            f"; {lat['cached']} of {lat['crops_per_epoch']} planned crops cached"
            if "cached" in lat
            else f"; {lat['crops_per_epoch']} planned crops"
        )
    lines.append(latents)
    if t["enabled"] or lat["enabled"]:
        lines.append("  fill them before training: runner cache RECIPE [key=value ...]")
    return lines


def _render_memory(plan: dict[str, Any]) -> list[str]:
    m, models = plan["memory"], plan["models"]
    h, w = m["latent_cells"]
    lines = [
        "",
        f"Stage C ({models['flavour']}): {_n(models['prior_params'])} parameters"
        + (f", LoRA {_n(models['lora_params'])}" if models["lora_params"] else ""),
        f"estimated GPU memory ({m['latent_from']} {h}x{w} latents, batch size per GPU):",
        f"  weights           {m['weights_gib']:6.2f} GiB  ({m['weights_dtype']})",
        f"  trainable state   {m['trainable_state_gib']:6.2f} GiB  ({m['trainable_note']})",
        f"  activations       {m['activations_gib']:6.2f} GiB  ({m['activations_note']})",
        f"  Stage C step      {m['stage_c_step_gib']:6.2f} GiB",
    ]
    for name, gib in m["helpers_gib"].items():
        lines.append(
            f"  + {name:<15} {gib:6.2f} GiB  (frozen, fp32, {_n(models['helper_params'][name])} params)"
        )
    lines += [
        f"  total             {m['total_gib']:6.2f} GiB  (+ ~0.5-1 GiB CUDA context)",
        f"  formula: {m['formula']}",
    ]
    q = plan["int8_quality"]
    if q:
        own = q[q["backend"]]
        pct = 100 * own["mean_abs_diff"] / q["output_mean_abs"]
        others = ", ".join(
            f"{k} max {v['max_abs_diff']} / mean {v['mean_abs_diff']}"
            for k, v in q.items()
            if k.startswith("int8") and k != q["backend"]
        )
        lines += [
            "",
            f"int8 quality cost ({q['backend']}): output diff vs bf16 max {own['max_abs_diff']} / mean "
            f"{own['mean_abs_diff']} on outputs of mean magnitude {q['output_mean_abs']} (~{pct:.1f}%); "
            f"{others}",
            f"  measured: {q['measured']}",
        ]
    r = plan["scheduled_sampling"]
    if r:
        lines += [
            "",
            f"scheduled sampling: ~{r['extra_forwards_per_step']} extra forward passes per step "
            f"(p mean {r['p_mean']}, from {r['p_first_step']} to {r['p_last_step']}, x mean offset "
            f"{r['mean_offset']}; ~{r['extra_sample_forwards_per_step']} per-sample forwards)",
        ]
    return lines


def render_plan(plan: dict[str, Any]) -> list[str]:
    """The plan for people: sources, data and buckets, steps, caches, memory, int8 and rollout costs."""
    return [
        "",
        "plan (nothing was downloaded or loaded):",
        *_render_sources(plan),
        *_render_data(plan),
        *_render_cache(plan),
        *_render_memory(plan),
        *_render_hub(plan),
    ]


def _render_hub(plan: dict[str, Any]) -> list[str]:
    hub = plan.get("hub")
    if hub is None:
        return []
    parts = (("each checkpoint", hub["checkpoints"]),
             ("the exports, model card and images at the end", hub["at_end"]))
    what = " and ".join(part for part, on in parts if on)
    if hub["token_found"]:
        token = "a token is there (its write access is checked when training starts)"
    else:
        token = "NO token found: run `hf auth login` or set HF_TOKEN before training, which stops otherwise"
    visibility = "private" if hub["private"] else "public"
    return ["", f"hub: uploads {what} to {hub['repo']} ({visibility} if new); {token}"]
