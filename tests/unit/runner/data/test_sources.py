"""Local-folder and shard indexing: sizes, captions and every skipped file reported."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from runner.data.sources import SourceSpec, index_local, index_webdataset, load_image


def test_local_index(image_folder: Path):
    (image_folder / "gen 00.txt").unlink()  # missing caption
    (image_folder / "broken.jpg").write_bytes(b"not an image")
    (image_folder / "broken.txt").write_text("x")
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90: displayed size is the transpose
    Image.new("RGB", (100, 40)).save(image_folder / "über rot.jpg", exif=exif.tobytes())
    (image_folder / "über rot.txt").write_text("first\n\nsecond\n", encoding="utf-8")
    Image.new("LA", (40, 40)).save(image_folder / "la.png")
    (image_folder / "la.txt").write_text("gray alpha")
    report = index_local(SourceSpec(type="local", path=str(image_folder), caption_strategy="textfile"))
    skipped = dict(report.skipped)
    assert set(skipped) == {"gen 00.png", "broken.jpg"}
    assert "missing caption file gen 00.txt" in skipped["gen 00.png"]
    assert "unreadable image" in skipped["broken.jpg"]
    refs = {r.key: r for r in report.samples}
    assert len(refs) == 4 + 20 - 1 + 2
    rot = refs["über rot.jpg"]
    assert (rot.width, rot.height) == (40, 100) and rot.captions == ("first", "second")
    assert load_image(rot).size == (40, 100)
    assert load_image(refs["la.png"]).mode == "RGB"


def test_caption_strategies(image_folder: Path):
    Image.new("RGB", (50, 50)).save(image_folder / "red_car.png")
    (image_folder / "red_car.json").write_text(json.dumps({"caption": ["one", "two"]}))
    by = {}
    for strategy in ("filename", "instanceprompt", "json"):
        spec = SourceSpec(
            type="local",
            path=str(image_folder),
            caption_strategy=strategy,
            instance_prompt="sks",
            prepend_instance_prompt=strategy != "instanceprompt",
        )
        by[strategy] = index_local(spec)
    assert {r.key: r.captions for r in by["filename"].samples}["red_car.png"] == ("sks red car",)
    assert all(r.captions == ("sks",) for r in by["instanceprompt"].samples)
    assert [r.captions for r in by["json"].samples] == [("sks one", "sks two")]
    assert len(by["json"].skipped) == 24 and "missing caption file" in by["json"].skipped[0][1]


def test_json_captions_from_the_named_field(image_folder: Path, tmp_path: Path):
    """caption_field picks the caption's field (nested with a.b), for loose files and shard members
    alike; a sample without it is skipped with the keys it does have."""
    Image.new("RGB", (50, 50)).save(image_folder / "a.png")
    (image_folder / "a.json").write_text(json.dumps({"meta": {"prompt": "nested one"}, "caption": "no"}))
    Image.new("RGB", (50, 50)).save(image_folder / "b.png")
    (image_folder / "b.json").write_text(json.dumps({"caption": "only the default"}))
    spec = SourceSpec(type="local", path=str(image_folder), caption_strategy="json",
                      caption_field="meta.prompt")
    report = index_local(spec)
    assert [(r.key, r.captions) for r in report.samples] == [("a.png", ("nested one",))]
    reason = dict(report.skipped)["b.png"]
    assert "no non-empty 'meta.prompt' field in b.json (its keys: caption)" in reason
    assert "caption_field" in reason

    import webdataset as wds

    buf = io.BytesIO()
    Image.new("RGB", (64, 48)).save(buf, format="PNG")
    with wds.TarWriter(str(tmp_path / "s.tar")) as sink:
        meta = json.dumps({"TEXT": "laion style"}).encode()
        sink.write({"__key__": "k0", "png": buf.getvalue(), "json": meta})
    shards = SourceSpec(type="webdataset", urls=(str(tmp_path / "s.tar"),), caption_strategy="json",
                        caption_field="TEXT")
    assert [r.captions for r in index_webdataset(shards).samples] == [("laion style",)]


def test_source_spec_errors():
    with pytest.raises(ValueError) as e:
        SourceSpec(type="s3", caption_strategy="parquet", repeats=-1, probability=0)
    for words in ("type 's3'", "caption_strategy 'parquet'", "repeats", "probability"):
        assert words in str(e.value)
    with pytest.raises(ValueError, match="instance_prompt is required"):
        SourceSpec(type="local", path="x", caption_strategy="instanceprompt")
    with pytest.raises(ValueError, match="needs `urls`"):
        SourceSpec(type="webdataset")


def test_shard_index_brace_list(shard_dir: Path):
    spec = SourceSpec(type="webdataset", urls=(str(shard_dir / "shard-{000000..000004}.tar"),))
    report = index_webdataset(spec)
    assert len(report.samples) == 24 and report.skipped == []
    astro = next(r for r in report.samples if r.captions == ("a photo of astronaut",))
    assert load_image(astro).size == (astro.width, astro.height)
    glob_spec = SourceSpec(type="webdataset", urls=(str(shard_dir / "*.tar"),), caption_strategy="filename")
    assert {r.captions[0] for r in index_webdataset(glob_spec).samples} >= {"astronaut", "gen 03"}


def test_truncated_tar_and_missing_caption(shard_dir: Path, tmp_path: Path):
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "extra.tar"), encoder=False) as sink:
        buf = io.BytesIO()
        Image.new("RGB", (64, 48)).save(buf, "PNG")
        sink.write({"__key__": "nocap", "png": buf.getvalue()})
        sink.write({"__key__": "noimage", "txt": b"caption without image"})
    tar = shard_dir / "shard-000001.tar"
    os.truncate(tar, os.path.getsize(tar) // 2)
    spec = SourceSpec(
        type="webdataset", urls=(str(shard_dir / "shard-00000{0,1}.tar"), str(tmp_path / "extra.tar"))
    )
    report = index_webdataset(spec)
    reasons = [r for _, r in report.skipped]
    assert any("truncated" in r for r in reasons)
    assert "missing caption (.txt member)" in reasons and "no image member (jpg/jpeg/png/webp)" in reasons
    from_first = sum(r.file.endswith("shard-000000.tar") for r in report.samples)
    from_cut = sum(r.file.endswith("shard-000001.tar") for r in report.samples)
    assert from_first == 5 and 0 < from_cut < 5
    for r in report.samples:
        assert load_image(r).size == (r.width, r.height)  # every indexed sample is whole


def test_remote_urls_fetched_into_shard_cache(shard_dir: Path, tmp_path: Path):
    url = f"file://{shard_dir}/shard-{{000000..000001}}.tar"
    spec = SourceSpec(type="webdataset", urls=(url,))
    with pytest.raises(ValueError, match="shard cache directory"):
        index_webdataset(spec)
    report = index_webdataset(spec, shard_cache_dir=str(tmp_path / "cache"))
    assert len(report.samples) == 10 and len(list((tmp_path / "cache").glob("*.tar"))) == 2
    assert all(Path(r.file).parent == tmp_path / "cache" for r in report.samples)
