"""tools/shard_dataset.py: shards read back with the plain webdataset library."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import skimage.data
import webdataset as wds
from PIL import Image

REPO = Path(__file__).resolve().parents[3]
TOOL = REPO / "tools" / "shard_dataset.py"
SCHEMA = json.loads((REPO / "schemas" / "shard_sample.schema.json").read_text())


@pytest.fixture(scope="module")
def tool(tools):
    return tools("shard_dataset")


def make_inputs(root: Path) -> dict:
    """A mixed folder; returns the names expected in the shards and those expected to be skipped."""
    root.mkdir()
    good = []

    def save(name: str, im: Image.Image, caption: str | None = "a caption", **kw) -> None:
        im.save(root / name, **kw)
        if caption is not None:
            (root / Path(name).with_suffix(".txt")).write_text(caption, encoding="utf-8")

    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        im = Image.fromarray(getattr(skimage.data, name)())
        im.thumbnail((128, 128))
        save(f"{name}.jpg", im, f"a photo of {name}\nanother caption", quality=90)
        good.append(f"{name}.jpg")
    save("camera gray.png", Image.fromarray(skimage.data.camera()).resize((96, 96)))  # mode L
    save("alpha.png", Image.new("RGBA", (80, 60), (10, 20, 30, 0)))
    save("palette.png", Image.new("P", (64, 64), 3))
    save("café photo ünï.webp", Image.new("RGB", (70, 50), (200, 100, 0)), quality=90)
    save("日本 画像.png", Image.new("RGB", (50, 70), (0, 100, 200)))
    rotated = Image.new("RGB", (120, 60), (5, 6, 7))  # stored 120x60, displayed 60x120
    exif = Image.Exif()
    exif[0x0112] = 6
    save("rotated.jpg", rotated, exif=exif.tobytes())
    sub = root / "sub dir"
    sub.mkdir()
    save("sub dir/nested.jpg", Image.fromarray(np.full((64, 64, 3), 99, np.uint8)))
    good += [
        "camera gray.png",
        "alpha.png",
        "palette.png",
        "café photo ünï.webp",
        "日本 画像.png",
        "rotated.jpg",
        "sub dir/nested.jpg",
    ]
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "corrupt.txt").write_text("x")
    buf = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buf, "JPEG")
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    (root / "truncated.txt").write_text("x")
    save("tiny.png", Image.new("RGB", (20, 20)))
    save("no caption.png", Image.new("RGB", (64, 64)), caption=None)
    skipped = {
        "corrupt.jpg": "unreadable image",
        "truncated.jpg": "unreadable image",
        "tiny.png": "too small",
        "no caption.png": "missing caption",
    }
    return {"good": sorted(good), "skipped": skipped}


def read_back(out: Path) -> list[dict]:
    urls = sorted(str(p) for p in out.glob("shard-*.tar"))
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil"))


@pytest.fixture(scope="module")
def built(tool, tmp_path_factory) -> tuple[Path, Path, dict]:
    tmp = tmp_path_factory.mktemp("shard")
    expected = make_inputs(tmp / "in")
    argv = [
        "--input",
        str(tmp / "in"),
        "--output",
        str(tmp / "out"),
        "--samples-per-shard",
        "4",
        "--min-size",
        "32",
    ]
    assert tool.main(argv) == 0
    return tmp, tmp / "out", expected


def test_shards_read_back(built):
    _, out, expected = built
    samples = read_back(out)
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    metas = [s["json"] for s in samples]
    assert sorted(m["source_path"] for m in metas) == expected["good"]
    assert manifest["samples"] == len(samples) == len(expected["good"])
    assert manifest["input_files"] == len(expected["good"]) + len(expected["skipped"])
    assert len(manifest["shards"]) == -(-manifest["input_files"] // 4)  # ceil(inputs / 4 per shard)
    assert sum(manifest["aspect_histogram"].values()) == len(samples)
    for s in samples:
        jsonschema.validate(s["json"], SCHEMA)
        image = s[s["json"]["format"]]
        assert image.mode == "RGB" and image.size == (s["json"]["width"], s["json"]["height"])
    by_name = {s["json"]["source_path"]: s for s in samples}
    rot = by_name["rotated.jpg"]
    assert rot["jpg"].size == (60, 120) and rot["json"]["exif_transposed"]  # stored upright
    assert by_name["astronaut.jpg"]["txt"] == "a photo of astronaut\nanother caption"
    assert by_name["alpha.png"]["png"].getpixel((0, 0)) == (255, 255, 255)  # transparent -> white


def test_skipped_listed_with_reasons(built):
    _, out, expected = built
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    reasons = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == set(expected["skipped"])
    for path, words in expected["skipped"].items():
        assert words in reasons[path] and reasons[path]


def test_rerun_reuses_verified_shards(tool, built):
    tmp, out, _ = built
    first = json.loads((out / "manifest.json").read_text())["shards"]
    argv = ["--input", str(tmp / "in"), "--output", str(out), "--samples-per-shard", "4", "--min-size", "32"]
    assert tool.main(argv) == 0
    assert json.loads((out / "manifest.json").read_text())["built"] == 0
    (out / "shard-000001.tar").unlink()
    with open(out / "shard-000003.tar", "r+b") as f:  # damage: the checksum no longer matches
        f.seek(600)
        f.write(b"garbage")
    assert tool.main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["built"], manifest["reused"]) == (2, len(first) - 2)
    assert manifest["shards"] == first  # deterministic: rebuilt shards are byte-identical


def test_parallel_cli_matches_serial(built, tmp_path):
    tmp, out, _ = built
    cmd = [
        sys.executable,
        str(TOOL),
        "--input",
        str(tmp / "in"),
        "--output",
        str(tmp_path / "par"),
        "--samples-per-shard",
        "4",
        "--min-size",
        "32",
        "--workers",
        "2",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "sharding" in res.stderr  # the progress bar
    par = json.loads((tmp_path / "par" / "manifest.json").read_text())
    assert par["shards"] == json.loads((out / "manifest.json").read_text())["shards"]


def test_max_shard_size_and_downsample(tool, built, tmp_path):
    tmp, _, expected = built
    argv = [
        "--input",
        str(tmp / "in"),
        "--output",
        str(tmp_path / "o"),
        "--max-shard-size",
        "0.02",
        "--max-size",
        "100",
        "--target-downsample-size",
        "64",
        "--caption-strategy",
        "filename",
    ]
    assert tool.main(argv) == 0
    samples = read_back(tmp_path / "o")
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert len(manifest["shards"]) > 1
    for s in samples:
        m = s["json"]
        big = m["original_width"] * m["original_height"] > 100**2
        assert m["downsampled"] == big
        if big:
            assert abs(m["width"] * m["height"] / 64**2 - 1) < 0.05
        assert s["txt"] == Path(m["source_path"]).stem.replace("_", " ")
    assert "no caption.png" in {m["json"]["source_path"] for m in samples}  # filename captions need no .txt
    assert len(samples) == len(expected["good"]) + 2  # tiny.png and no caption.png now pass


def test_group_files_by_bytes(tool, tmp_path):
    files = []
    for i, n in enumerate([400, 400, 400, 2000, 100]):
        p = tmp_path / f"{i}.bin"
        p.write_bytes(b"x" * n)
        files.append(p)
    groups = tool.group_files(files, None, 0.001)  # 1000 bytes per shard
    assert [[p.name for p in g] for g in groups] == [["0.bin", "1.bin"], ["2.bin"], ["3.bin"], ["4.bin"]]


def test_cli_errors(tool, tmp_path):
    (tmp_path / "in").mkdir()
    with pytest.raises(SystemExit) as e:
        tool.main(
            [
                "--input",
                str(tmp_path / "in"),
                "--output",
                str(tmp_path / "o"),
                "--caption-strategy",
                "instanceprompt",
            ]
        )
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        tool.main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"), "--max-size", "9"])
