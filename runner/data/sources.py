"""Data sources: a local folder or WebDataset shards, indexed once per run.

The loader needs each sample's size before it decodes anything (to pick a bucket and plan exact
per-rank batches), so a source is first turned into a list of `SampleRef`s. Shards are indexed by
their tar headers and read back by offset, which gives random access for exact splitting and
mid-epoch resume; remote shard URLs are copied once into a local shard cache through
`webdataset.gopen`. Every file that cannot be used is listed in the `IndexReport` with the reason.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import webdataset as wds
from PIL import Image, ImageOps

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_STRATEGIES = ("filename", "textfile", "instanceprompt", "json")
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that transpose width and height


class CaptionError(ValueError):
    """A sample has no usable caption under the chosen strategy."""


@dataclass(frozen=True)
class SourceSpec:
    """One entry of the recipe's data.sources (same names).

    `path` is a folder for type local; `urls` are shard paths, globs, brace lists or URLs for
    type webdataset. `repeats` = extra passes per epoch (0 = seen once). `probability` = weight for
    choosing which source supplies the next batch.
    """

    type: str
    path: str | None = None
    urls: tuple[str, ...] = ()
    caption_strategy: str = "textfile"
    caption_field: str = "caption"  # caption_strategy json: the field (a.b for nested) holding the caption
    instance_prompt: str | None = None
    prepend_instance_prompt: bool = False
    repeats: int = 0
    probability: float = 1.0

    def __post_init__(self) -> None:
        problems = []
        if self.type not in ("local", "webdataset"):
            problems.append(f"type {self.type!r} must be 'local' or 'webdataset'")
        if self.type == "local" and not self.path:
            problems.append("a local source needs `path` (the image folder)")
        if self.type == "webdataset" and not self.urls:
            problems.append("a webdataset source needs `urls` (shard paths, globs, {a..b} lists or URLs)")
        if self.caption_strategy not in CAPTION_STRATEGIES:
            problems.append(f"caption_strategy {self.caption_strategy!r} is not one of {CAPTION_STRATEGIES}")
        needs_prompt = self.caption_strategy == "instanceprompt" or self.prepend_instance_prompt
        if needs_prompt and not self.instance_prompt:
            problems.append("instance_prompt is required by caption_strategy instanceprompt / prepend")
        if self.repeats < 0:
            problems.append(f"repeats must be >= 0 (0 = each sample once per epoch), got {self.repeats}")
        if not self.probability > 0:
            problems.append(f"probability must be > 0, got {self.probability}")
        if problems:
            raise ValueError("data source: " + "; ".join(problems))

    @property
    def identity(self) -> str:
        """Stable id of the source (used in cache keys)."""
        return self.path if self.type == "local" else "::".join(self.urls)


@dataclass(frozen=True)
class SampleRef:
    """Where one sample lives and what the index knows about it (size after EXIF orientation)."""

    key: str
    width: int
    height: int
    captions: tuple[str, ...]
    file: str  # the image file, or the tar that holds it
    offset: int = -1  # byte offset of the image inside the tar; -1 for a plain file
    length: int = -1

    @property
    def uid(self) -> str:
        """Unique within a source: the relative path, or shard name / key."""
        return self.key if self.offset < 0 else f"{os.path.basename(self.file)}/{self.key}"


@dataclass
class IndexReport:
    """What indexing found: usable samples and every skipped file with its reason."""

    samples: list[SampleRef] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (where, reason)


def open_rgb(fp: str | Path | BinaryIO) -> Image.Image:
    """Decode fully, apply EXIF orientation, flatten alpha onto white, return RGB."""
    with Image.open(fp) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(canvas, rgba).convert("RGB")
        return im.convert("RGB")


def oriented_size(fp: str | Path | BinaryIO) -> tuple[int, int]:
    """(width, height) as displayed, from the header only (EXIF orientation honoured)."""
    with Image.open(fp) as im:
        w, h = im.size
        if im.getexif().get(0x0112, 1) in _SWAPPING_ORIENTATIONS:
            w, h = h, w
    return w, h


def split_captions(text: str) -> tuple[str, ...]:
    """A caption file may hold several captions, one per line; one is picked per use."""
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _json_captions(meta: dict, where: str, field: str) -> tuple[str, ...]:
    """The caption(s) at `field` of a JSON object: a string or a list of strings; `a.b` walks into
    nested objects (img2dataset / LAION metadata keeps captions at different places)."""
    cap: object = meta
    for part in field.split("."):
        cap = cap.get(part) if isinstance(cap, dict) else None
    caps = (cap,) if isinstance(cap, str) else tuple(cap) if isinstance(cap, list) else ()
    caps = tuple(c.strip() for c in caps if isinstance(c, str) and c.strip())
    if not caps:
        keys = ", ".join(sorted(meta)[:8]) or "none"
        raise CaptionError(f"no non-empty {field!r} field in {where} (its keys: {keys}); set the source's "
                           "caption_field")
    return caps


def captions_for_file(image: Path, strategy: str, instance_prompt: str | None,
                      caption_field: str = "caption") -> tuple[str, ...]:
    """Captions of a loose image file: its stem, sibling .txt, the instance prompt or sibling .json."""
    if strategy == "filename":
        caps = split_captions(image.stem.replace("_", " "))
    elif strategy == "instanceprompt":
        caps = split_captions(instance_prompt or "")
    elif strategy == "textfile":
        txt = image.with_suffix(".txt")
        if not txt.is_file():
            raise CaptionError(f"missing caption file {txt.name}")
        caps = split_captions(txt.read_text(encoding="utf-8", errors="replace"))
    elif strategy == "json":
        meta_path = image.with_suffix(".json")
        if not meta_path.is_file():
            raise CaptionError(f"missing caption file {meta_path.name}")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CaptionError(f"unreadable {meta_path.name}: {e}") from None
        caps = _json_captions(meta if isinstance(meta, dict) else {}, meta_path.name, caption_field)
    else:
        raise ValueError(f"caption_strategy {strategy!r} is not one of {CAPTION_STRATEGIES}")
    if not caps:
        raise CaptionError(f"empty caption ({strategy})")
    return caps


def with_instance_prompt(caps: tuple[str, ...], spec: SourceSpec) -> tuple[str, ...]:
    if spec.prepend_instance_prompt and spec.caption_strategy != "instanceprompt":
        return tuple(f"{spec.instance_prompt} {c}" for c in caps)
    return caps


def list_images(folder: Path) -> list[Path]:
    """Image files under folder, recursively, in a fixed (sorted relative path) order."""
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist; check the source `path`")
    found = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def index_local(spec: SourceSpec) -> IndexReport:
    """Index a folder: header sizes and captions; unreadable files and missing captions are reported."""
    root = Path(spec.path)
    report = IndexReport()
    for p in list_images(root):
        rel = p.relative_to(root).as_posix()
        try:
            w, h = oriented_size(p)
        except (OSError, SyntaxError, ValueError) as e:
            report.skipped.append((rel, f"unreadable image: {e}"))
            continue
        try:
            caps = captions_for_file(p, spec.caption_strategy, spec.instance_prompt, spec.caption_field)
        except CaptionError as e:
            report.skipped.append((rel, str(e)))
            continue
        report.samples.append(SampleRef(rel, w, h, with_instance_prompt(caps, spec), str(p)))
    return report


def expand_shards(urls: tuple[str, ...], shard_cache_dir: str | None) -> list[str]:
    """Local paths of all shards: brace lists expanded, globs matched, URLs fetched into the cache."""
    out: list[str] = []
    for url in urls:
        for u in wds.shardlists.expand_urls(url):
            if "://" in u or u.startswith("pipe:"):
                out.append(_fetch_shard(u, shard_cache_dir))
            elif any(c in u for c in "*?["):
                matched = sorted(glob.glob(u))
                if not matched:
                    raise FileNotFoundError(f"shard glob {u!r} matches no file")
                out.extend(matched)
            else:
                if not os.path.isfile(u):
                    raise FileNotFoundError(f"shard {u!r} does not exist; check the source `urls`")
                out.append(u)
    return out


def _fetch_shard(url: str, cache_dir: str | None) -> str:
    """Copy a remote shard once into cache_dir (atomically) and return the local path."""
    if cache_dir is None:
        raise ValueError(f"shard {url!r} is remote: set a shard cache directory to download it into")
    os.makedirs(cache_dir, exist_ok=True)
    name = hashlib.sha256(url.encode()).hexdigest()[:16] + "-" + os.path.basename(url.split("?")[0])
    dest = os.path.join(cache_dir, name)
    if not os.path.exists(dest):
        tmp = f"{dest}.tmp-{os.getpid()}"
        with wds.gopen(url, "rb") as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.replace(tmp, dest)
    return dest


def _tar_members(path: str, report: IndexReport) -> Iterator[tuple[str, str, int, int]]:
    """(key, ext, offset, size) of regular members whose data is complete; truncation is reported."""
    file_size = os.path.getsize(path)
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                if m.offset_data + m.size > file_size:
                    report.skipped.append((f"{path}:{m.name}", "truncated tar: member data cut off"))
                    return
                base, ext = wds.tariterators.base_plus_ext(m.name)
                if base is None:
                    report.skipped.append((f"{path}:{m.name}", "member name has no extension"))
                    continue
                yield base, ext.lower(), m.offset_data, m.size
    except (tarfile.TarError, EOFError, OSError) as e:
        report.skipped.append((path, f"truncated or corrupt tar ({e}); later members not read"))


def _read_at(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def _shard_captions(
    spec: SourceSpec, key: str, members: dict, meta: dict | None, tar: str
) -> tuple[str, ...]:
    strategy = spec.caption_strategy
    if strategy == "instanceprompt":
        return split_captions(spec.instance_prompt or "")
    if strategy == "textfile":
        hit = members.get("txt") or members.get("caption")
        if hit is None:
            raise CaptionError("missing caption (.txt member)")
        caps = split_captions(_read_at(tar, *hit).decode("utf-8", errors="replace"))
    elif strategy == "json":
        caps = _json_captions(meta or {}, f"{key}.json", spec.caption_field)
    else:
        stem = Path((meta or {}).get("source_path", key)).stem
        caps = split_captions(stem.replace("_", " "))
    if not caps:
        raise CaptionError(f"empty caption ({strategy})")
    return caps


def index_webdataset(spec: SourceSpec, shard_cache_dir: str | None = None) -> IndexReport:
    """Index shards by tar headers; sizes from the .json sidecar or, without one, the image header."""
    report = IndexReport()
    for tar in expand_shards(spec.urls, shard_cache_dir):
        groups: dict[str, dict[str, tuple[int, int]]] = {}
        for key, ext, off, size in _tar_members(tar, report):
            groups.setdefault(key, {})[ext] = (off, size)
        for key, members in groups.items():
            where = f"{os.path.basename(tar)}:{key}"
            img_ext = next((e for e in IMAGE_EXTS if e in members), None)
            if img_ext is None:
                report.skipped.append((where, "no image member (jpg/jpeg/png/webp)"))
                continue
            off, length = members[img_ext]
            try:
                meta = json.loads(_read_at(tar, *members["json"])) if "json" in members else None
                if meta and "width" in meta and "height" in meta:
                    w, h = int(meta["width"]), int(meta["height"])
                else:
                    w, h = oriented_size(io.BytesIO(_read_at(tar, off, length)))
                caps = _shard_captions(spec, key, members, meta, tar)
            except CaptionError as e:
                report.skipped.append((where, str(e)))
                continue
            except (OSError, SyntaxError, ValueError) as e:
                report.skipped.append((where, f"unreadable sample: {e}"))
                continue
            report.samples.append(SampleRef(key, w, h, with_instance_prompt(caps, spec), tar, off, length))
    return report


def index_source(spec: SourceSpec, shard_cache_dir: str | None = None) -> IndexReport:
    return index_local(spec) if spec.type == "local" else index_webdataset(spec, shard_cache_dir)


def load_image(ref: SampleRef) -> Image.Image:
    """Decode a sample's image (RGB, EXIF applied). Raises OSError on a corrupt image."""
    if ref.offset < 0:
        return open_rgb(ref.file)
    return open_rgb(io.BytesIO(_read_at(ref.file, ref.offset, ref.length)))
