"""Procedural 2D images of coloured primitives (the built-in image source, deterministic by index).

Image ``index`` of generator ``seed`` draws one primitive (its class is the label) in a named
colour, with random size, position and rotation, on a black background, anti-aliased by drawing at
4x and downscaling. Attributes (shape, colour name, rgb) come with each image for captions.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from fields.data.procgen_3d import PALETTE

SHAPES_2D = ("circle", "square", "triangle", "ellipse", "ring", "cross", "star", "diamond")
SUPERSAMPLE = 4


def _polygon(sides: int, centre, radius: float, angle: float, inner: float | None = None) -> list[tuple]:
    """Vertices of a regular polygon (or a star when ``inner`` radius is given)."""
    points = []
    count = sides * (2 if inner else 1)
    for k in range(count):
        r = radius if (k % 2 == 0 or not inner) else inner
        theta = angle + 2.0 * math.pi * k / count
        points.append((centre[0] + r * math.cos(theta), centre[1] + r * math.sin(theta)))
    return points


def primitive_image(index: int, seed: int = 0, size: int = 28) -> tuple[np.ndarray, int, dict]:
    """Draws image ``index`` of generator ``seed``.

    Returns:
        ``(image [size, size, 3] float32 in [0, 1], label, attributes)`` where ``label`` indexes
        ``SHAPES_2D`` and ``attributes`` has ``shape``, ``colour``, ``rgb``, ``caption``.
    """
    rng = np.random.default_rng([seed, index])
    label = int(rng.integers(len(SHAPES_2D)))
    shape = SHAPES_2D[label]
    colour = list(PALETTE)[int(rng.integers(len(PALETTE)))]
    rgb = PALETTE[colour]
    big = size * SUPERSAMPLE
    radius = float(rng.uniform(0.22, 0.4)) * big
    centre = (float(rng.uniform(radius, big - radius)), float(rng.uniform(radius, big - radius)))
    angle = float(rng.uniform(0.0, 2.0 * math.pi))
    fill = tuple(int(round(255 * c)) for c in rgb)
    canvas = Image.new("RGB", (big, big), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    x, y = centre
    if shape == "circle":
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=fill)
    elif shape == "ellipse":
        ellipse = Image.new("L", (big, big), 0)
        ImageDraw.Draw(ellipse).ellipse([x - radius, y - 0.55 * radius, x + radius, y + 0.55 * radius], fill=255)
        canvas.paste(fill, mask=ellipse.rotate(math.degrees(angle), center=centre))
    elif shape == "ring":
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=fill)
        hole = 0.55 * radius
        draw.ellipse([x - hole, y - hole, x + hole, y + hole], fill=(0, 0, 0))
    elif shape == "cross":
        arm = 0.3 * radius
        bar = Image.new("L", (big, big), 0)
        bar_draw = ImageDraw.Draw(bar)
        bar_draw.rectangle([x - radius, y - arm, x + radius, y + arm], fill=255)
        bar_draw.rectangle([x - arm, y - radius, x + arm, y + radius], fill=255)
        canvas.paste(fill, mask=bar.rotate(math.degrees(angle), center=centre))
    else:
        sides, inner = {"square": (4, None), "triangle": (3, None), "star": (5, 0.45 * radius),
                        "diamond": (4, None)}[shape]
        scale = 0.8 if shape == "diamond" else 1.0
        points = _polygon(sides, centre, radius * scale, angle, inner)
        if shape == "diamond":  # squashed square
            points = [(x + (px - x) * 0.6, py) for px, py in points]
        draw.polygon(points, fill=fill)
    image = canvas.resize((size, size), Image.Resampling.BOX)
    array = np.asarray(image, np.float32) / 255.0
    attributes = {"shape": shape, "colour": colour, "rgb": list(rgb), "caption": f"a {colour} {shape}"}
    return array, label, attributes
