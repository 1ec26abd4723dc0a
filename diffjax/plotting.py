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
    lim = lim or 1.1 * max(float(np.abs(a).max()) for a in arrays)
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
