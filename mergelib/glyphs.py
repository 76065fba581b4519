"""Synthetic glyphs: a labelled pretraining source rendered from the fonts matplotlib ships.

Why it exists. CLIP, the papers' backbone, saw text and symbols of every kind during pretraining; a
ViT pretrained on six CIFAR-10 classes alone crowds every grayscale image into a small corner of its
feature space, and task vectors of the grayscale tasks then interfere (notebook 01 measures this).
A second, *labelled* pretraining source of rendered characters gives the backbone features that
separate shapes and strokes. It contains **no digits** and no downstream image: 52 Latin letters and
33 Greek letters (Greek capitals that look like Latin ones are left out), each rendered in 16 faces
(DejaVu Sans / Sans Mono / Serif and STIX, regular, bold, italic, bold italic), then randomly
thickened or thinned, rotated (±15°), sheared, scaled, shifted and blurred, with random foreground and
background levels and pixel noise.

Everything is seeded: :func:`render` gives the same uint8 images for the same arguments on any
machine with the same fonts (matplotlib's bundled copies; their version enters the data cache key).
Fonts: DejaVu (Bitstream Vera licence) and STIX (SIL Open Font License), as shipped with matplotlib.
"""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["FONTS", "CHARACTERS", "GLYPHS_VERSION", "font_dir", "glyph_masks", "render", "load_glyphs"]

GLYPHS_VERSION = 1  # bump when the rendering changes (it is part of the data cache key)
FONTS = ("DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique", "DejaVuSans-BoldOblique",
         "DejaVuSansMono", "DejaVuSansMono-Bold", "DejaVuSansMono-Oblique", "DejaVuSansMono-BoldOblique",
         "DejaVuSerif", "DejaVuSerif-Bold", "DejaVuSerif-Italic", "DejaVuSerif-BoldItalic",
         "STIXGeneral", "STIXGeneralBol", "STIXGeneralItalic", "STIXGeneralBolIta")
LATIN = tuple(chr(c) for c in range(ord("A"), ord("Z") + 1)) + tuple(chr(c) for c in range(ord("a"), ord("z") + 1))
GREEK = tuple("αβγδεζηθικλμνξπρστυφχψω") + tuple("ΓΔΘΛΞΠΣΦΨΩ")
CHARACTERS = LATIN + GREEK
TRAIN_PER_CLASS, TEST_PER_CLASS = 400, 40
TRAIN_SEED, TEST_SEED = 20241101, 20241102


def font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@lru_cache(maxsize=2)
def glyph_masks(size: int = 64) -> torch.Tensor:
    """Float (fonts, characters, size, size) masks in [0, 1]: each glyph centred, about 0.7 * size tall."""
    from PIL import Image, ImageDraw, ImageFont

    out = np.zeros((len(FONTS), len(CHARACTERS), size, size), np.float32)
    for fi, name in enumerate(FONTS):
        path = font_dir() / f"{name}.ttf"
        if not path.is_file():
            raise FileNotFoundError(f"font {path} not found (it ships with matplotlib; reinstall matplotlib)")
        font = ImageFont.truetype(str(path), int(size * 0.7))
        for ci, ch in enumerate(CHARACTERS):
            img = Image.new("L", (size, size), 0)
            draw = ImageDraw.Draw(img)
            left, top, right, bottom = draw.textbbox((0, 0), ch, font=font)
            draw.text(((size - (right - left)) / 2 - left, (size - (bottom - top)) / 2 - top), ch, fill=255, font=font)
            out[fi, ci] = np.asarray(img, np.float32) / 255.0
    return torch.from_numpy(out)


def render(n: int, seed: int, image_size: int = 32, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random glyph images: uint8 ``(n, image_size, image_size)`` and int64 labels (balanced)."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    g = torch.Generator().manual_seed(seed)
    masks = glyph_masks(2 * image_size)
    n_fonts, n_chars = masks.shape[:2]
    labels = torch.arange(n) % n_chars
    labels = labels[torch.randperm(n, generator=g)]
    fonts = torch.randint(0, n_fonts, (n,), generator=g)
    images = [_augment(masks[fonts[i:i + chunk], labels[i:i + chunk]], g, image_size)
              for i in range(0, n, chunk)]
    return torch.cat(images).numpy(), labels.numpy().astype(np.int64)


def _augment(x: torch.Tensor, g: torch.Generator, out_size: int) -> torch.Tensor:
    """(n, S, S) float masks -> (n, out_size, out_size) uint8 images (S = 2 * out_size)."""
    n, size = x.shape[0], x.shape[-1]
    x = x[:, None]
    # stroke width: erode once, keep, dilate once or twice (3x3 max filters)
    thick = torch.randint(-1, 3, (n,), generator=g)
    eroded = -F.max_pool2d(-x, 3, 1, 1)
    dil1 = F.max_pool2d(x, 3, 1, 1)
    dil2 = F.max_pool2d(dil1, 3, 1, 1)
    x = torch.stack([eroded, x, dil1, dil2])[thick + 1, torch.arange(n)]
    # affine: rotation, shear, scale, shift (grid units; scale > 1 shrinks the glyph)
    ang = (torch.rand(n, generator=g) * 2 - 1) * math.radians(15)
    scale = 0.9 + torch.rand(n, generator=g) * 0.6
    shear = (torch.rand(n, generator=g) * 2 - 1) * 0.25
    tx, ty = ((torch.rand(2, n, generator=g) * 2 - 1) * 0.15).unbind(0)
    cos, sin = torch.cos(ang), torch.sin(ang)
    theta = torch.stack([torch.stack([scale * cos, scale * (shear - sin), tx], 1),
                         torch.stack([scale * sin, scale * cos, ty], 1)], 1)
    grid = F.affine_grid(theta, (n, 1, size, size), align_corners=False)
    x = F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
    # blur: separable Gaussian with one sigma per image, then 2x2 area downsampling
    sigma = 0.2 + torch.rand(n, generator=g) * 1.3
    r = torch.arange(-3, 4, dtype=torch.float32)
    ker = torch.exp(-r[None] ** 2 / (2 * sigma[:, None] ** 2))
    ker = ker / ker.sum(1, keepdim=True)
    y = x.reshape(1, n, size, size)
    y = F.conv2d(F.pad(y, (0, 0, 3, 3)), ker.view(n, 1, 7, 1), groups=n)
    y = F.conv2d(F.pad(y, (3, 3, 0, 0)), ker.view(n, 1, 1, 7), groups=n)
    x = F.avg_pool2d(y.reshape(n, 1, size, size), size // out_size)
    # levels and noise
    fg = 0.6 + 0.4 * torch.rand(n, 1, 1, 1, generator=g)
    bg = 0.25 * torch.rand(n, 1, 1, 1, generator=g)
    x = bg + (fg - bg) * x.clamp(0, 1) + 0.03 * torch.randn(x.shape, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)[:, 0]


def load_glyphs(root: Path | None = None, download: bool = False) -> dict:
    """The data registry's loader: ``{"train": (images, labels), "test": (images, labels)}`` at 32 px."""
    k = len(CHARACTERS)
    return {"train": render(TRAIN_PER_CLASS * k, TRAIN_SEED), "test": render(TEST_PER_CLASS * k, TEST_SEED)}
