"""Ordinary damage to a picture of a diagram: what screenshots, scans and exports do to it.

Two users: `robustness.py` scores a checkpoint on each kind at a fixed strength
(`CHECKS`), and `create_images.py --damage P` gives a share P of the training images a
random mix of them at random strengths (`random_damage`), so that the model learns to
read through them. Each function takes an RGB image and returns a new one.
"""

from __future__ import annotations

import io
import random

import numpy as np
from PIL import Image, ImageFilter


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def noise(image: Image.Image, sigma: float, rng: random.Random) -> Image.Image:
    pixels = np.asarray(image).astype(float)
    pixels += np.random.default_rng(rng.randrange(2**32)).normal(0, sigma, pixels.shape)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def blur(image: Image.Image, radius: float) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(radius))


def rotate(image: Image.Image, degrees: float) -> Image.Image:
    """Turned about the centre; the corners filled with the background (the top-left pixel)."""
    return image.rotate(degrees, resample=Image.BICUBIC, fillcolor=image.getpixel((0, 0)))


def shift(image: Image.Image, dx: int, dy: int) -> Image.Image:
    """The whole picture moved; the uncovered edge filled with the background."""
    moved = Image.new("RGB", image.size, image.getpixel((0, 0)))
    moved.paste(image, (dx, dy))
    return moved


def rescale(image: Image.Image, side: int) -> Image.Image:
    return image.resize((side, side), Image.BICUBIC)


def fade(image: Image.Image, amount: float) -> Image.Image:
    """Ink and background pulled towards mid-grey by `amount` (a faded print or scan)."""
    return Image.blend(image, Image.new("RGB", image.size, (128, 128, 128)), amount)


def zoom_out(image: Image.Image, scale: float) -> Image.Image:
    """The picture shrunk about its centre, the margin filled with the background: every
    shape smaller and nearer the centre than the envelope draws it."""
    side = round(image.width * scale)
    out = Image.new("RGB", image.size, image.getpixel((0, 0)))
    out.paste(image.resize((side, side), Image.BICUBIC), ((image.width - side) // 2, (image.height - side) // 2))
    return out


# The fixed strengths robustness.py scores, one kind at a time.
CHECKS = {
    "clean": lambda image, rng: image,
    "jpeg quality 25": lambda image, rng: jpeg(image, 25),
    "gaussian noise sigma 12": lambda image, rng: noise(image, 12, rng),
    "gaussian blur radius 1.2": lambda image, rng: blur(image, 1.2),
    "rotated up to 4 degrees": lambda image, rng: rotate(image, rng.uniform(-4, 4)),
    "shifted up to 8 px": lambda image, rng: shift(image, rng.randint(-8, 8), rng.randint(-8, 8)),
    "512 px": lambda image, rng: rescale(image, 512),
    # Two kinds random_damage below never applies (112 px, faded), one it does (zooming out,
    # by 0 to 10%), and three of its kinds at once at fixed strengths.
    "112 px": lambda image, rng: rescale(image, 112),
    "faded by 40%": lambda image, rng: fade(image, 0.4),
    "zoomed out to 92%": lambda image, rng: zoom_out(image, 0.92),
    "shifted, turned and JPEG": lambda image, rng: jpeg(rotate(shift(image, rng.randint(-6, 6), rng.randint(-6, 6)),
                                                              rng.uniform(-3, 3)), 40),
}


def check(kind: str, image: Image.Image, seed: int, index: int) -> Image.Image:
    """The damage of CHECKS[kind] to the index-th picture of a set: the same every time."""
    return CHECKS[kind](image, random.Random(f"{seed}:{kind}:{index}"))


# How often random_damage applies each kind. Geometry comes most often: photometric damage
# is read through without training on it, shifts and zooms are not (docs/LOG.md).
DAMAGE_ODDS = {"shift": 3 / 4, "zoom": 1 / 4, "rotate": 1 / 3, "blur": 1 / 4, "noise": 1 / 4, "jpeg": 1 / 4}


def random_damage(image: Image.Image, rng: random.Random) -> Image.Image:
    """For training: each kind of damage with its DAMAGE_ODDS, at a random strength up to a
    little beyond CHECKS' (geometry first, then blur, noise and compression, as a camera or
    an export would), and at least one."""
    side = image.width
    kinds = [k for k, odds in DAMAGE_ODDS.items() if rng.random() < odds] or [rng.choice(list(DAMAGE_ODDS))]
    if "zoom" in kinds:  # a picture exported or scanned at a slightly smaller scale
        image = zoom_out(image, rng.uniform(0.9, 1.0))
    if "shift" in kinds:
        reach = round(0.05 * side)  # 11 px at 224
        image = shift(image, rng.randint(-reach, reach), rng.randint(-reach, reach))
    if "rotate" in kinds:
        image = rotate(image, rng.uniform(-5, 5))
    if "blur" in kinds:
        image = blur(image, rng.uniform(0.3, 1.5))
    if "noise" in kinds:
        image = noise(image, rng.uniform(3, 15), rng)
    if "jpeg" in kinds:
        image = jpeg(image, rng.randint(15, 80))
    return image
