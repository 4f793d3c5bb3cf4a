"""Write a synthetic multi-domain image collection: one imagefolder per domain, one subfolder per class, JPEG files.

Classes are coloured shapes (a disc, a square, a bar, ...) on a noisy background; each domain changes the style
(colours inverted, rotated, low contrast, ...), so the domains share the classes but not the pixels. It is for
tests and benchmarks of the data pipeline and for GPU training runs at real image sizes: nothing is committed,
and any number of images is written in a streaming way (one image in memory at a time).

    python benchmarks/make_image_domains.py OUT_DIR --domains 3 --classes 10 --per_class 40 --size 224
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image, ImageDraw, ImageOps

STYLES = ["plain", "inverted", "rotated", "lowcontrast", "grayscale", "shifted"]


def _image(cls: int, style: str, size: int, rng: np.random.Generator) -> Image.Image:
    background = rng.integers(0, 80, size=(size, size, 3), dtype=np.uint8)
    img = Image.fromarray(background)
    draw = ImageDraw.Draw(img)
    colour = tuple(int(c) for c in (np.array([cls * 53, cls * 97, cls * 151]) % 200 + 55))
    cx, cy = rng.integers(size // 4, 3 * size // 4, size=2)
    half = int(size * (0.12 + 0.02 * (cls % 5)))
    box = [cx - half, cy - half, cx + half, cy + half]
    shape = cls % 4
    if shape == 0:
        draw.ellipse(box, fill=colour)
    elif shape == 1:
        draw.rectangle(box, fill=colour)
    elif shape == 2:
        draw.rectangle([cx - half, cy - half // 3, cx + half, cy + half // 3], fill=colour)
    else:
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=colour)
    if style == "inverted":
        img = ImageOps.invert(img)
    elif style == "rotated":
        img = img.rotate(90)
    elif style == "lowcontrast":
        img = Image.blend(img, Image.new("RGB", img.size, (128, 128, 128)), 0.6)
    elif style == "grayscale":
        img = ImageOps.grayscale(img).convert("RGB")
    elif style == "shifted":
        img = Image.fromarray(np.roll(np.asarray(img), shift=size // 5, axis=(0, 1)))
    return img


def write_domains(out: str, domains: int = 3, classes: int = 10, per_class: int = 40, size: int = 64,
                  seed: int = 0, quality: int = 90) -> list[str]:
    """Writes OUT/<domain>/<class>/<i>.jpg and returns the domain directories."""
    if not 1 <= domains <= len(STYLES):
        raise ValueError(f"domains={domains} must be between 1 and {len(STYLES)}")
    rng = np.random.default_rng(seed)
    dirs = []
    for style in STYLES[:domains]:
        for cls in range(classes):
            folder = os.path.join(out, style, f"class_{cls:03d}")
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                _image(cls, style, size, rng).save(os.path.join(folder, f"{i:06d}.jpg"), quality=quality)
        dirs.append(os.path.join(out, style))
    return dirs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--domains", type=int, default=3)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per_class", type=int, default=40)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    dirs = write_domains(args.out, args.domains, args.classes, args.per_class, args.size, args.seed)
    print(f"wrote {len(dirs)} domains x {args.classes} classes x {args.per_class} images ({args.size} px) to {args.out}")


if __name__ == "__main__":
    main()
