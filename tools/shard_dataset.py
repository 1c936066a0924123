"""Images + captions -> WebDataset tar shards and a manifest.

    python tools/shard_dataset.py --input photos/ --output shards/ --caption-strategy textfile --workers 4

Shards are fixed groups of the sorted input files, so the output is deterministic and each shard
can be built, verified and skipped on its own: a re-run keeps a shard whose report matches its
inputs, options and tar checksum, and rebuilds the rest. Every input that is not written is
listed in manifest.json with the reason.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import sys
from collections import Counter
from pathlib import Path

import jsonschema
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from runner.data.buckets import SizeRules, closest_bucket, default_buckets
from runner.data.sources import CAPTION_STRATEGIES, CaptionError, captions_for_file, list_images, open_rgb

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "shard_sample.schema.json"
HISTOGRAM_RESOLUTION = 1024  # aspect histogram = closest default Stage C bucket at this resolution
_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_SAVE = {"jpg": ("JPEG", {"quality": 95}), "png": ("PNG", {}), "webp": ("WEBP", {"quality": 95})}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, type=Path, help="folder of images (searched recursively)")
    p.add_argument("--output", required=True, type=Path, help="folder for shard-*.tar and manifest.json")
    p.add_argument("--caption-strategy", choices=CAPTION_STRATEGIES, default="textfile")
    p.add_argument("--instance-prompt", help="caption for every image (caption strategy instanceprompt)")
    p.add_argument("--caption-field", default="caption",
                   help="caption strategy json: the field of each image's .json holding its caption (a.b for "
                        "nested; default caption)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--samples-per-shard", type=int, help="input images per shard (default 1000)")
    size.add_argument("--max-shard-size", type=float, help="MB of input image bytes per shard")
    p.add_argument("--min-size", type=int, help="skip images with width*height below PX^2")
    p.add_argument("--max-size", type=int, help="downsample images with width*height above PX^2 ...")
    p.add_argument("--target-downsample-size", type=int, help="... to about PX^2 pixels (with --max-size)")
    p.add_argument("--workers", type=int, default=1, help="parallel processes")
    args = p.parse_args(argv)
    if args.caption_strategy == "instanceprompt" and not args.instance_prompt:
        p.error("--caption-strategy instanceprompt needs --instance-prompt TEXT")
    if (args.max_size is None) != (args.target_downsample_size is None):
        p.error("--max-size and --target-downsample-size must be given together")
    for name in (
        "samples_per_shard",
        "max_shard_size",
        "workers",
        "min_size",
        "max_size",
        "target_downsample_size",
    ):
        v = getattr(args, name)
        if v is not None and v <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if not args.input.is_dir():
        p.error(f"--input {args.input} is not a folder")
    return args


def group_files(
    files: list[Path], samples_per_shard: int | None, max_shard_mb: float | None
) -> list[list[Path]]:
    """Consecutive groups of the sorted inputs: by count, or by input bytes (a file larger than the
    limit gets a shard of its own)."""
    if max_shard_mb is None:
        n = samples_per_shard or 1000
        return [files[i : i + n] for i in range(0, len(files), n)]
    limit, groups, size = max_shard_mb * 1e6, [], 0.0
    for f in files:
        b = f.stat().st_size
        if not groups or (size + b > limit and groups[-1]):
            groups.append([])
            size = 0.0
        groups[-1].append(f)
        size += b
    return groups


def _encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    name, kw = _SAVE[fmt]
    im.save(buf, name, **kw)
    return buf.getvalue()


def make_sample(path: Path, rel: str, key: str, opts: dict) -> dict:
    """One shard sample (webdataset dict of bytes). Raises ValueError/OSError/CaptionError to skip."""
    raw = path.read_bytes()
    with Image.open(io.BytesIO(raw)) as probe:
        fmt = _FORMATS.get(probe.format or "")
        orientation = probe.getexif().get(0x0112, 1)
        mode = probe.mode
    if fmt is None:
        raise ValueError("not a JPEG, PNG or WebP file")
    im = open_rgb(io.BytesIO(raw))  # full decode: catches truncated / corrupt data
    ow, oh = im.size
    rules = SizeRules(opts["min_size"], opts["max_size"], opts["target_downsample_size"])
    if rules.too_small(ow, oh):
        raise ValueError(f"too small: {ow}x{oh} has fewer than {opts['min_size']}^2 pixels")
    caps = captions_for_file(path, opts["caption_strategy"], opts["instance_prompt"], opts["caption_field"])
    down = rules.downsample_size(ow, oh)
    if down is not None:
        im = im.resize(down, Image.Resampling.LANCZOS)
    exif_applied = orientation not in (None, 1)
    keep_bytes = not exif_applied and down is None and mode == "RGB"  # already upright RGB: copy losslessly
    meta = {
        "key": key,
        "source_path": rel,
        "width": im.width,
        "height": im.height,
        "original_width": ow,
        "original_height": oh,
        "caption_source": opts["caption_strategy"],
        "format": fmt,
        "exif_transposed": exif_applied,
        "downsampled": down is not None,
    }
    return {
        "__key__": key,
        fmt: raw if keep_bytes else _encode(im, fmt),
        "txt": "\n".join(caps).encode("utf-8"),
        "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"),
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _inputs_fingerprint(root: Path, files: list[Path]) -> list[list]:
    return [[f.relative_to(root).as_posix(), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def shard_is_done(tar: Path, report_path: Path, inputs: list[list], opts: dict) -> bool:
    """A finished shard: its report matches the inputs and options and the tar's checksum."""
    if not (tar.is_file() and report_path.is_file()):
        return False
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return (
        report.get("inputs") == inputs
        and report.get("options") == opts
        and report.get("sha256") == _sha256(tar)
    )


def build_shard(job: tuple) -> dict:
    """Write one shard (temp file + rename) and its report; returns the report."""
    root, out, index, first, files, opts = job
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text(encoding="utf-8")))
    buckets = default_buckets(HISTOGRAM_RESOLUTION)
    tar = out / f"shard-{index:06d}.tar"
    tmp = out / f".shard-{index:06d}.tar.tmp-{os.getpid()}"
    written, skipped, hist = [], [], Counter()
    with wds.TarWriter(str(tmp), encoder=False, mtime=0.0) as sink:
        for j, path in enumerate(files):
            rel = path.relative_to(root).as_posix()
            key = f"{first + j:09d}"
            try:
                sample = make_sample(path, rel, key, opts)
            except (CaptionError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                why = str(e) or type(e).__name__
                if not isinstance(e, ValueError):  # CaptionError and size rules are ValueErrors
                    why = f"unreadable image: {why}"
                skipped.append({"path": rel, "reason": why})
                continue
            meta = json.loads(sample["json"])
            validator.validate(meta)
            sink.write(sample)
            written.append(key)
            hist[closest_bucket(meta["width"], meta["height"], buckets).name] += 1
    os.replace(tmp, tar)
    report = {
        "shard": tar.name,
        "samples": len(written),
        "keys": written,
        "skipped": skipped,
        "aspect_histogram": dict(sorted(hist.items())),
        "inputs": _inputs_fingerprint(root, files),
        "options": opts,
        "sha256": _sha256(tar),
    }
    tmp_report = out / f".{tar.stem}.report.json.tmp-{os.getpid()}"
    tmp_report.write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp_report, out / f"{tar.stem}.report.json")
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    opts = {
        "caption_strategy": args.caption_strategy,
        "instance_prompt": args.instance_prompt,
        "caption_field": args.caption_field,
        "min_size": args.min_size,
        "max_size": args.max_size,
        "target_downsample_size": args.target_downsample_size,
    }
    files = list_images(args.input)
    groups = group_files(files, args.samples_per_shard, args.max_shard_size)
    args.output.mkdir(parents=True, exist_ok=True)
    jobs, reports, first = [], {}, 0
    for i, g in enumerate(groups):
        tar, rep = args.output / f"shard-{i:06d}.tar", args.output / f"shard-{i:06d}.report.json"
        if shard_is_done(tar, rep, _inputs_fingerprint(args.input, g), opts):
            reports[i] = json.loads(rep.read_text(encoding="utf-8"))
        else:
            jobs.append((args.input, args.output, i, first, g, opts))
        first += len(g)
    bar = tqdm(total=len(files), unit="img", desc="sharding", file=sys.stderr)
    bar.update(sum(len(groups[i]) for i in reports))
    if args.workers > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            for rep in pool.imap_unordered(build_shard, jobs):
                reports[int(rep["shard"][6:12])] = rep
                bar.update(len(rep["inputs"]))
    else:
        for job in jobs:
            rep = build_shard(job)
            reports[job[2]] = rep
            bar.update(len(rep["inputs"]))
    bar.close()
    ordered = [reports[i] for i in sorted(reports)]
    hist: Counter = Counter()
    for r in ordered:
        hist.update(r["aspect_histogram"])
    manifest = {
        "input_files": len(files),
        "samples": sum(r["samples"] for r in ordered),
        "skipped_count": sum(len(r["skipped"]) for r in ordered),
        "shards": [{"name": r["shard"], "samples": r["samples"], "sha256": r["sha256"]} for r in ordered],
        "skipped": [s for r in ordered for s in r["skipped"]],
        "aspect_histogram": dict(sorted(hist.items())),
        "aspect_histogram_resolution": HISTOGRAM_RESOLUTION,
        "built": len(jobs),
        "reused": len(groups) - len(jobs),
        "options": opts,
    }
    tmp = args.output / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, args.output / "manifest.json")
    print(
        f"{manifest['samples']} samples in {len(ordered)} shards ({len(jobs)} built, {manifest['reused']} "
        f"reused); {manifest['skipped_count']} skipped, listed in {args.output / 'manifest.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
