"""The shapes world's scenes: 1-3 coloured shapes on a 3x3 grid over a textured background, 224 px.

BLIP-2 learns from millions of web photos; this course needs data that a 2-core CPU can learn from
in minutes and that needs no download. Each object has a shape (5), a colour (6), a size (2) and a
grid cell (9). Relations are strict grid relations: "A to the left of B" means A's column is left
of B's column, whatever the rows; "above" compares rows likewise.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 224
CELL = IMAGE_SIZE / 3
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
SHAPES = ("circle", "square", "triangle", "star", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses"}
COLORS = {  # saturated and far apart in RGB, so that colour names are never a judgement call
    "red": (215, 35, 35),
    "green": (35, 160, 60),
    "blue": (35, 85, 215),
    "yellow": (235, 205, 30),
    "purple": (135, 55, 175),
    "orange": (240, 130, 20),
}
COLOR_NAMES = tuple(COLORS)
RADII = {"small": 14, "large": 26}  # pixels from centre to the outline's farthest point (about)
N_OBJECTS, N_OBJECTS_P = (1, 2, 3), (0.15, 0.35, 0.5)  # few lone objects: they are the least distinct
JITTER = 6  # max centre offset in px: with the largest object (~29.3 px) it stays inside its cell
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
RELATIONS = ("left_of", "right_of", "above", "below")
QUESTION_TYPES = ("color", "count", "exists", "relation", "shape")


def _unit_outline(shape: str) -> np.ndarray:
    """Vertices ``[k, 2]`` of a shape of radius 1 centred at 0, pointing up (image y grows down)."""
    if shape == "circle":
        angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)  # a polygon: every shape rotates alike
        radii = np.ones(48)
    elif shape == "square":
        angles, radii = np.pi / 4 + np.arange(4) * np.pi / 2, np.ones(4)
    elif shape == "triangle":
        angles, radii = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3, np.ones(3)
    elif shape == "star":
        angles, radii = -np.pi / 2 + np.arange(10) * np.pi / 5, np.tile([1.0, 0.45], 5)
    else:  # cross: a plus sign with arms 0.6 wide
        a, w = 1.0, 0.3
        return np.array([(w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a),
                         (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w), (-w, -a)])
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


OUTLINES = {shape: _unit_outline(shape) for shape in SHAPES}


def sample_objects(rng: np.random.Generator) -> tuple[list[dict], list[np.ndarray]]:
    """Objects (attributes, bbox, rgb) in reading order, and the polygon that draws each."""
    n = int(rng.choice(N_OBJECTS, p=N_OBJECTS_P))
    objects, polygons = [], []
    for cell in sorted(rng.choice(9, size=n, replace=False)):  # one object per cell: no overlap
        row, col = divmod(int(cell), 3)
        shape, color = SHAPES[rng.integers(len(SHAPES))], COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
        size = ("small", "large")[rng.integers(2)]
        centre = (np.array([col, row]) + 0.5) * CELL + rng.uniform(-JITTER, JITTER, 2)
        angle = 0.0 if shape == "circle" else np.deg2rad(rng.uniform(-12, 12))
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        points = centre + RADII[size] * rng.uniform(0.92, 1.08) * OUTLINES[shape] @ rot.T
        rgb = np.clip(np.array(COLORS[color]) + rng.integers(-12, 13, 3), 0, 255)
        bbox = [*np.floor(points.min(0)).astype(int).tolist(), *np.ceil(points.max(0)).astype(int).tolist()]
        objects.append(dict(shape=shape, color=color, size=size, row=row, col=col, bbox=bbox, rgb=rgb.tolist()))
        polygons.append(points)
    return objects, polygons


_GRID = np.linspace(-0.5, 0.5, 28)


def _background(rng: np.random.Generator) -> Image.Image:
    """A dull (low-saturation) dark or light colour, a linear gradient, and smooth blotches.

    Drawn at 28x28 and upsampled: smooth backgrounds are cheap to draw and to PNG-encode, and
    the low saturation keeps the six object colours the only vivid ones in the image.
    """
    base = rng.uniform(35, 85) if rng.random() < 0.5 else rng.uniform(150, 205)
    start = base + rng.uniform(-15, 15, 3)
    end = start + rng.uniform(-30, 30)
    angle = rng.uniform(0, 2 * np.pi)
    t = np.cos(angle) * _GRID[None, :] + np.sin(angle) * _GRID[:, None] + 0.5
    blotches = Image.fromarray(rng.normal(0, 6, (6, 6)).astype(np.float32)).resize((28, 28), Image.Resampling.BICUBIC)
    texture = np.asarray(blotches) + rng.normal(0, 3, (28, 28))
    pixels = start + (end - start) * t[..., None] + texture[..., None]
    small = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return small.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)


def render(objects: list[dict], polygons: list[np.ndarray], rng: np.random.Generator) -> Image.Image:
    image = _background(rng)
    draw = ImageDraw.Draw(image)
    for obj, points in zip(objects, polygons):
        draw.polygon([tuple(p) for p in points.tolist()], fill=tuple(obj["rgb"]))
    return image


def related(a: dict, rel: str, b: dict) -> bool:
    return {"left_of": a["col"] < b["col"], "right_of": a["col"] > b["col"],
            "above": a["row"] < b["row"], "below": a["row"] > b["row"]}[rel]


def choose(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[rng.integers(len(options))]

