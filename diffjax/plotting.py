"""Pictures with Pillow: scatter panels for 2-D data and image grids for samples."""

from __future__ import annotations

import math

import numpy as np
from etils import epath
from PIL import Image, ImageDraw

_COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]


def scatter_png(panels: list[tuple[str, np.ndarray]], path, size: int = 360, lim: float | None = None) -> epath.Path:
    """Side-by-side scatter plots of 2-D point sets [(title, (N, 2)), ...] on shared axes."""
    arrays = [np.asarray(p, np.float64) for _, p in panels]
    lim = lim or 1.1 * max(float(np.abs(a).max()) for a in arrays) or 1.0  # all-zero points: a unit square
    pad, title_h = 10, 22
    img = Image.new("RGB", (len(panels) * (size + pad) + pad, size + title_h + pad), "white")
    draw = ImageDraw.Draw(img)
    for i, ((title, _), pts) in enumerate(zip(panels, arrays)):
        x0, y0 = pad + i * (size + pad), title_h
        draw.rectangle([x0, y0, x0 + size, y0 + size], outline=(160, 160, 160))
        draw.line([x0 + size // 2, y0, x0 + size // 2, y0 + size], fill=(225, 225, 225))
        draw.line([x0, y0 + size // 2, x0 + size, y0 + size // 2], fill=(225, 225, 225))
        draw.text((x0 + 4, 4), title, fill="black")
        px = x0 + (pts[:, 0] / lim + 1) * size / 2
        py = y0 + (1 - pts[:, 1] / lim) * size / 2
        color = _COLORS[i % len(_COLORS)]
        for u, v in zip(px, py):
            draw.point([(u, v), (u + 1, v), (u, v + 1), (u + 1, v + 1)], fill=color)
    return save_png(img, path)


def pixel_centres(lim: float, size: int) -> np.ndarray:
    """(size * size, 2) points at the pixel centres of a size x size panel of the square [-lim, lim]^2,
    row-major with row 0 at y = +lim (as `heatmap_strip_png` draws a density evaluated on them)."""
    c = (np.arange(size) + 0.5) / size * 2 * lim - lim
    xx, yy = np.meshgrid(c, c[::-1])
    return np.stack([xx.ravel(), yy.ravel()], axis=-1)


_HEAT = np.array([[255, 255, 255], [158, 202, 225], [49, 130, 189], [8, 48, 107]], np.float64)  # white -> dark blue


def heatmap_strip_png(
    panels: list[tuple[str, np.ndarray, np.ndarray]], path, lim: float, *, gamma: float = 0.5
) -> epath.Path:
    """Side-by-side panels [(title, density (size, size) on `pixel_centres(lim, size)`, points (N, 2)),
    ...]: each density a white-to-blue heat map scaled to its own maximum (value^gamma), the points
    drawn on it in red. The PNG is n (size + 10) + 10 by size + 32 pixels."""
    size = int(np.shape(panels[0][1])[0])
    pad, title_h = 10, 22
    img = Image.new("RGB", (len(panels) * (size + pad) + pad, size + title_h + pad), "white")
    draw = ImageDraw.Draw(img)
    for i, (title, density, pts) in enumerate(panels):
        d = np.asarray(density, np.float64)
        if d.shape != (size, size):
            raise ValueError(f"heatmap_strip_png: panel {i} has a {d.shape} density, the first one {(size, size)}")
        v = (d / d.max() if d.max() > 0 else d) ** gamma * (len(_HEAT) - 1)
        lo = np.clip(np.floor(v).astype(int), 0, len(_HEAT) - 2)
        rgb = _HEAT[lo] + (v - lo)[..., None] * (_HEAT[lo + 1] - _HEAT[lo])
        x0, y0 = pad + i * (size + pad), title_h
        img.paste(Image.fromarray(np.round(rgb).astype(np.uint8)), (x0, y0))
        draw.rectangle([x0 - 1, y0 - 1, x0 + size, y0 + size], outline=(160, 160, 160))
        draw.text((x0 + 2, 4), title, fill="black")
        p = np.asarray(pts, np.float64)
        px, py = x0 + (p[:, 0] / lim + 1) * size / 2, y0 + (1 - p[:, 1] / lim) * size / 2
        inside = (px >= x0) & (px < x0 + size - 1) & (py >= y0) & (py < y0 + size - 1)
        for u, w in zip(px[inside], py[inside]):
            draw.point([(u, w), (u + 1, w), (u, w + 1), (u + 1, w + 1)], fill=(214, 39, 40))
    return save_png(img, path)


def save_png(img: Image.Image, path) -> epath.Path:
    """A Pillow image -> a PNG at `path` (local or gs://, written atomically)."""
    import io

    from diffjax import storage

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return storage.write_bytes(path, buf.getvalue())


def to_uint8(images: np.ndarray, data_range=(-1.0, 1.0)) -> np.ndarray:
    """Values in data_range -> uint8 0..255 (clipped, rounded to nearest)."""
    lo, hi = data_range
    x = np.clip((np.asarray(images, np.float64) - lo) / (hi - lo), 0.0, 1.0)
    return (x * 255 + 0.5).astype(np.uint8)


def image_grid(images: np.ndarray, data_range=(-1.0, 1.0), pad: int = 2, scale: int = 1) -> Image.Image:
    """A near-square grid of images (N, H, W, C) in data_range, as a Pillow image."""
    x = to_uint8(images, data_range)
    n, h, w, c = x.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = x[i]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    return img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST) if scale > 1 else img
