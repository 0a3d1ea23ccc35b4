"""Procedural 32 px colour shape images, written as ImageFolder directories (numpy + PIL, no download).

Two disjoint 10-class tasks from one renderer: ``TARGET`` (the deployment benchmark's held-out task) and
``PRETRAIN`` (other shapes, used to pre-train weights for the fine-tuning benchmark). A class is a shape *and*
a typical hue: the foreground hue is drawn around ``class / 10`` of the colour wheel with a spread that makes
neighbouring classes overlap, so colour alone gets a model part of the way and the shape must do the rest.
Every image also has a random dull background with a gradient, random position, scale and rotation, a
distractor blob and pixel noise, so that no model reaches 100 %: small shapes at 32 px with noise are
genuinely ambiguous (a small ring looks like a disk, a semicircle like a triangle).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

Mask = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (u, v) in shape units -> bool mask
SIZE = 32
_SUPER = 2  # render at 2x and average down: anti-aliased edges


def _r(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.sqrt(u * u + v * v)


_SHAPES: dict[str, Mask] = {
    # target task
    "disk": lambda u, v: _r(u, v) < 1.0,
    "square": lambda u, v: np.maximum(abs(u), abs(v)) < 0.8,
    "triangle": lambda u, v: (v > -0.6) & (v < 0.9 - 1.7 * abs(u)),
    "ring": lambda u, v: (_r(u, v) < 1.0) & (_r(u, v) > 0.55),
    "plus": lambda u, v: ((abs(u) < 0.3) & (abs(v) < 1.0)) | ((abs(v) < 0.3) & (abs(u) < 1.0)),
    "bar": lambda u, v: (abs(u) < 1.0) & (abs(v) < 0.25),
    "stripes": lambda u, v: (_r(u, v) < 1.0) & (np.sin(u * np.pi * 2.5) > 0),
    "checker": lambda u, v: (np.maximum(abs(u), abs(v)) < 0.9)
    & ((np.floor(u * 2.2) + np.floor(v * 2.2)) % 2 == 0),
    "dots": lambda u, v: (_r(u - 0.55, v) < 0.4) | (_r(u + 0.55, v) < 0.4),
    "semicircle": lambda u, v: (_r(u, v) < 1.0) & (v > 0),
    # pre-training task (disjoint shapes)
    "hollow_square": lambda u, v: (np.maximum(abs(u), abs(v)) < 0.9) & (np.maximum(abs(u), abs(v)) > 0.55),
    "x_cross": lambda u, v: ((abs(u - v) < 0.35) | (abs(u + v) < 0.35)) & (np.maximum(abs(u), abs(v)) < 0.9),
    "ell": lambda u, v: ((abs(u + 0.6) < 0.3) & (abs(v) < 1.0)) | ((abs(v - 0.7) < 0.3) & (abs(u) < 0.9)),
    "tee": lambda u, v: ((abs(u) < 0.25) & (abs(v) < 1.0)) | ((abs(v + 0.75) < 0.25) & (abs(u) < 1.0)),
    "diamond": lambda u, v: abs(u) + abs(v) < 1.0,
    "crescent": lambda u, v: (_r(u, v) < 1.0) & (_r(u - 0.5, v) > 0.75),
    "three_dots": lambda u, v: (_r(u - 0.6, v + 0.4) < 0.32) | (_r(u + 0.6, v + 0.4) < 0.32)
    | (_r(u, v - 0.6) < 0.32),
    "frame_disk": lambda u, v: (_r(u, v) < 0.4) | ((np.maximum(abs(u), abs(v)) < 1.0)
                                                  & (np.maximum(abs(u), abs(v)) > 0.8)),
    "wave": lambda u, v: (abs(v - 0.4 * np.sin(u * 3.0)) < 0.25) & (abs(u) < 1.0),
    "grid": lambda u, v: (np.maximum(abs(u), abs(v)) < 0.9)
    & ((np.cos(u * np.pi * 2.2) > 0.5) | (np.cos(v * np.pi * 2.2) > 0.5)),
}
TARGET: tuple[str, ...] = tuple(list(_SHAPES)[:10])
PRETRAIN: tuple[str, ...] = tuple(list(_SHAPES)[10:])


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    k = (np.array([5.0, 3.0, 1.0]) + h * 6) % 6
    return v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)


def render(shape: str, rng: np.random.Generator, noise: float = 0.08, hue: float = 0.0,
           hue_spread: float = 0.07) -> np.ndarray:
    """One HxWx3 uint8 image of ``shape`` with a foreground hue around ``hue`` (0..1)."""
    n = SIZE * _SUPER
    yy, xx = (np.mgrid[0:n, 0:n] + 0.5) / _SUPER
    bg = _hsv(rng.uniform(), rng.uniform(0.0, 0.35), rng.uniform(0.1, 0.9))
    slope = rng.normal(0, 0.01, (2, 3))
    img = bg + xx[..., None] * slope[0] + yy[..., None] * slope[1] - 16 * slope.sum(0)
    fg = _hsv((hue + rng.normal(0, hue_spread)) % 1.0, rng.uniform(0.5, 1.0), rng.uniform(0.45, 1.0))
    # distractor: a faint blob somewhere
    dc, dr = rng.uniform(4, SIZE - 4, 2), rng.uniform(1.5, 3.0)
    blob = ((xx - dc[0]) ** 2 + (yy - dc[1]) ** 2) < dr * dr
    img[blob] = img[blob] * 0.6 + rng.uniform(0, 1, 3) * 0.4
    scale = rng.uniform(6.5, 11.0)
    cx, cy = rng.uniform(scale * 0.7 + 1, SIZE - scale * 0.7 - 1, 2)
    theta = rng.uniform(0, 2 * np.pi)
    c, s = np.cos(theta), np.sin(theta)
    u = ((xx - cx) * c + (yy - cy) * s) / scale
    v = (-(xx - cx) * s + (yy - cy) * c) / scale
    mask = _SHAPES[shape](u, v)
    img[mask] = fg
    img = img.reshape(SIZE, _SUPER, SIZE, _SUPER, 3).mean(axis=(1, 3))
    img = img + rng.normal(0, noise, img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def write_split(root: Path, classes: tuple[str, ...], per_class: int, seed: int, noise: float = 0.08) -> Path:
    """``root/<class>/<i>.png`` for ``per_class`` images of each class; returns ``root``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(render(name, rng, noise, hue=k / len(classes))).save(d / f"{i:05d}.png")
    return root


def write_task(root: Path, classes: tuple[str, ...], train_per_class: int, test_per_class: int,
               seed: int) -> tuple[Path, Path]:
    """``root/train`` and ``root/test`` ImageFolder trees (different seeds, so test images are unseen)."""
    return (write_split(root / "train", classes, train_per_class, seed),
            write_split(root / "test", classes, test_per_class, seed + 1_000_003))
