"""Make everything `recipes/quickstart.yaml` needs, offline: tiny checkpoints and a small real dataset.

    python tools/prepare_quickstart.py [--root .cache]

1. `ROOT/tiny_checkpoints/`: tiny random models laid out like the hub repos (tools/make_tiny_checkpoints.py).
2. `ROOT/quickstart_data/images/`: the photos scikit-image ships (astronaut, coffee, chelsea the cat, ...),
   each with a caption written for it in a .txt file beside it.
3. `ROOT/quickstart_data/shards/`: those images as WebDataset shards (tools/shard_dataset.py).
Each step is skipped when its output is already complete, so running it twice costs nothing.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parent

# scikit-image's bundled photos (skimage.data.<name>) and captions written for them
PHOTOS = {
    "astronaut": "a portrait photo of an astronaut in a white spacesuit in front of an american flag",
    "coffee": "a cup of coffee on a saucer, seen from above, on a wooden table",
    "chelsea": "a photo of a ginger tabby cat looking to the side",
    "rocket": "a rocket on its launch pad under a blue sky",
    "hubble_deep_field": "a deep space photo full of distant galaxies",
    "immunohistochemistry": "a microscope image of stained tissue cells",
    "colorwheel": "a colour wheel with every hue around a white centre",
    "moon": "a black and white photo of the surface of the moon",
    "retina": "a medical photo of the back of a human eye",
    "camera": "a black and white photo of a man with a camera on a tripod",
    "coins": "a black and white photo of old coins on a table",
    "page": "a scanned page of printed text",
    "horse": "a black silhouette of a horse on a white background",
}


def write_images(folder: Path) -> int:
    """Save each photo as PNG with its caption; returns how many were written now."""
    import numpy as np
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for name, caption in PHOTOS.items():
        png, txt = folder / f"{name}.png", folder / f"{name}.txt"
        if png.is_file() and txt.is_file():
            continue
        array = getattr(data, name)()
        if array.dtype == bool:
            array = array.astype(np.uint8) * 255
        if array.dtype != np.uint8:
            span = max(float(array.max() - array.min()), 1e-8)
            array = (255 * (array - array.min()) / span).astype(np.uint8)
        Image.fromarray(array).convert("RGB").save(png)
        txt.write_text(caption + "\n", encoding="utf-8")
        written += 1
    return written


def run(argv: list[str]) -> None:
    subprocess.run([sys.executable, *argv], check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".cache", help="where the quickstart files go (default .cache)")
    args = parser.parse_args(argv)
    root = Path(args.root)
    run([str(TOOLS / "make_tiny_checkpoints.py"), str(root / "tiny_checkpoints")])
    images = root / "quickstart_data" / "images"
    print(f"quickstart images: {write_images(images)} written, {len(PHOTOS)} in {images}")
    run([str(TOOLS / "shard_dataset.py"), "--input", str(images), "--output",
         str(root / "quickstart_data" / "shards"), "--caption-strategy", "textfile",
         "--samples-per-shard", "6"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
