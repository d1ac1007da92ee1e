"""Ordinary damage to a picture of a diagram: what screenshots, scans, exports and phone
cameras do to it.

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
    return on_a_surface(image, scale, image.getpixel((0, 0)))


def perspective(image: Image.Image, reach: float, rng: random.Random) -> Image.Image:
    """Seen at a slant: each corner moved by up to `reach` of the side, the uncovered edge
    filled with the background."""
    side = image.width
    corners = [(x + rng.uniform(-reach, reach) * side, y + rng.uniform(-reach, reach) * side)
               for x, y in [(0, 0), (0, side), (side, side), (side, 0)]]  # where the source's corners are
    return image.transform(image.size, Image.QUAD, [c for corner in corners for c in corner], Image.BICUBIC,
                           fillcolor=image.getpixel((0, 0)))


def uneven_light(image: Image.Image, darkest: float, rng: random.Random) -> Image.Image:
    """Light falling off across the picture in a random direction, down to `darkest` of it."""
    side = image.width
    angle = rng.uniform(0, 2 * np.pi)
    y, x = np.mgrid[0:side, 0:side] / side - 0.5
    along = (x * np.cos(angle) + y * np.sin(angle)) / np.sqrt(0.5) * 0.5 + 0.5  # 0 to 1 across
    return scaled(image, (1 - (1 - darkest) * along)[..., None])


def colour_cast(image: Image.Image, gains: tuple[float, float, float]) -> Image.Image:
    """Each channel scaled by its gain: a lamp's or a screen's tint."""
    return scaled(image, np.array(gains))


def scaled(image: Image.Image, factor: np.ndarray) -> Image.Image:
    """Every pixel's channels times `factor` (broadcast over [H, W, 3]), kept within 0-255."""
    return Image.fromarray((np.asarray(image).astype(float) * factor).clip(0, 255).astype(np.uint8))


def on_a_surface(image: Image.Image, scale: float, surface: tuple[int, int, int]) -> Image.Image:
    """The picture as a sheet filling `scale` of the frame, centred on a surface of another
    colour: its edge visible, so sizes still read against the sheet."""
    side = round(image.width * scale)
    out = Image.new("RGB", image.size, surface)
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
# The wide envelope's (create_images.py --looks wide): a phone's photos of sheets and screens too.
WIDE_DAMAGE_ODDS = {"sheet": 1 / 6, "shift": 3 / 4, "zoom": 1 / 4, "rotate": 1 / 3, "perspective": 1 / 4,
                    "light": 1 / 4, "cast": 1 / 5, "blur": 1 / 4, "noise": 1 / 4, "jpeg": 1 / 4}


def random_damage(image: Image.Image, rng: random.Random, wide: bool = False) -> Image.Image:
    """For training: each kind of damage with its DAMAGE_ODDS, at a random strength up to a
    little beyond CHECKS' (geometry first, then blur, noise and compression, as a camera or
    an export would), and at least one."""
    side = image.width
    odds_of = WIDE_DAMAGE_ODDS if wide else DAMAGE_ODDS
    kinds = [k for k, odds in odds_of.items() if rng.random() < odds] or [rng.choice(list(odds_of))]
    if "sheet" in kinds:  # a sheet photographed on a table
        background = image.getpixel((0, 0))
        surface = background
        while abs(sum(surface) - sum(background)) < 3 * 40:
            surface = tuple(rng.randint(0, 255) for _ in range(3))
        image = on_a_surface(image, rng.uniform(0.7, 0.95), surface)
    elif "zoom" in kinds:  # a picture exported at a smaller scale; wide: the diagram 70-100% of the frame
        image = zoom_out(image, rng.uniform(0.7 if wide else 0.9, 1.0))
    if "shift" in kinds:
        reach = round(0.05 * side)  # 11 px at 224
        image = shift(image, rng.randint(-reach, reach), rng.randint(-reach, reach))
    if "rotate" in kinds:
        image = rotate(image, rng.uniform(-5, 5))
    if "perspective" in kinds:
        image = perspective(image, rng.uniform(0.01, 0.06), rng)
    if "light" in kinds:
        image = uneven_light(image, rng.uniform(0.55, 0.95), rng)
    if "cast" in kinds:
        image = colour_cast(image, tuple(rng.uniform(0.8, 1.2) for _ in range(3)))
    if "blur" in kinds:
        image = blur(image, rng.uniform(0.3, 1.5))
    if "noise" in kinds:
        image = noise(image, rng.uniform(3, 15), rng)
    if "jpeg" in kinds:
        image = jpeg(image, rng.randint(15, 80))
    return image
