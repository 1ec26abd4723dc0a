"""EDM's non-leaking geometric augmentation (Karras et al. 2022, Appendix F.2), per example on the host.

Each training image is, with probability `p` per transform, y-flipped, isotropically scaled,
rotated, anisotropically scaled and translated by a fraction of its size (x-flips happen half of
the time whatever p is), as in EDM's CIFAR-10 setup (xflip=1e8, yflip=scale=rotate_frac=aniso=
translate_frac=1, p=0.12). The network sees the 9 parameters of what was done as
`augment_labels` and learns to undo it; sampling passes zeros (no augmentation), so the
augmentations do not leak into the generated images.

Labels, in EDM's order: [xflip, yflip, scale, cos(rot) - 1, sin(rot), aniso cos, aniso sin,
translate x, translate y]. Pixels are resampled with cubic splines and mirror padding
(scipy.ndimage); EDM resamples bilinearly on a 2x sym6-wavelet upsampling instead, so the
images differ in fine detail, not in the transform or its labels.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

AUGMENT_DIM = 9
SCALE_STD, ANISO_STD, TRANSLATE_STD = 0.2, 0.2, 0.125  # log2 std, log2 std, fraction of the size


@dataclasses.dataclass(frozen=True)
class Geometric:
    """One example's draw. Zero / False everywhere is the identity."""

    xflip: bool = False
    yflip: bool = False
    scale: float = 0.0  # s = 2 ** (SCALE_STD * scale)
    rotate: float = 0.0  # angle in radians
    aniso: float = 0.0  # s = 2 ** (ANISO_STD * aniso) along the direction aniso_angle
    aniso_angle: float = 0.0
    translate: tuple[float, float] = (0.0, 0.0)  # (x, y) in units of TRANSLATE_STD * size

    def labels(self) -> np.ndarray:
        tx, ty = self.translate
        return np.array(
            [
                self.xflip,
                self.yflip,
                self.scale,
                np.cos(self.rotate) - 1,
                np.sin(self.rotate),
                self.aniso * np.cos(self.aniso_angle),
                self.aniso * np.sin(self.aniso_angle),
                tx,
                ty,
            ],
            np.float32,
        )


def draw(rng: np.random.Generator, p: float) -> Geometric:
    """EDM's random choices (AugmentPipe with the CIFAR-10 multipliers) for one example."""
    on = lambda: rng.random() < p
    xflip = bool(rng.integers(2))  # probability multiplier 1e8: always eligible
    yflip = bool(rng.integers(2)) if on() else False
    scale = rng.standard_normal() if on() else 0.0
    rotate = rng.uniform(-np.pi, np.pi) if on() else 0.0
    aniso, angle = rng.standard_normal(), rng.uniform(-np.pi, np.pi)
    aniso = aniso if on() else 0.0
    rotated_frame = rng.random() < 0.5  # scaled along a rotated frame half of the time
    angle = angle if rotated_frame and aniso != 0 else 0.0
    translate = tuple(rng.standard_normal(2)) if on() else (0.0, 0.0)
    return Geometric(
        xflip, yflip, float(scale), float(rotate), float(aniso), float(angle), (float(translate[0]), float(translate[1]))
    )


def _rotation(theta: float) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s], [s, c]])


def inverse_map(g: Geometric, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(A, b): an output pixel at centred (x, y) samples the input at A @ (x, y) + b (EDM's G_inv)."""
    s = 2.0 ** (SCALE_STD * g.scale)
    a = 2.0 ** (ANISO_STD * g.aniso)
    aniso = _rotation(-g.aniso_angle) @ np.diag([1 / a, a]) @ _rotation(g.aniso_angle)
    linear = np.diag([1 / s, 1 / s]) @ _rotation(g.rotate) @ aniso
    shift = -np.array([g.translate[0] * width, g.translate[1] * height]) * TRANSLATE_STD
    return linear, linear @ shift


def apply(x: np.ndarray, g: Geometric) -> np.ndarray:
    """x (H, W, C) transformed by g; the flips are exact, the rest resampled with mirror padding."""
    if g.xflip:
        x = x[:, ::-1]
    if g.yflip:
        x = x[::-1]
    h, w = x.shape[:2]
    linear, offset = inverse_map(g, h, w)
    if np.allclose(linear, np.eye(2)) and np.allclose(offset, 0):
        return np.ascontiguousarray(x)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
    q = np.stack([cols.ravel() - cx, rows.ravel() - cy])  # centred (x, y) of every output pixel
    src = linear @ q + offset[:, None]
    coords = np.stack([src[1] + cy, src[0] + cx])  # (row, col) in the input
    out = np.stack(
        [ndimage.map_coordinates(x[..., c], coords, order=3, mode="mirror").reshape(h, w) for c in range(x.shape[-1])],
        axis=-1,
    )
    return out.astype(x.dtype)


def augment(x: np.ndarray, rng: np.random.Generator, p: float) -> tuple[np.ndarray, np.ndarray]:
    """One example: (augmented x, its AUGMENT_DIM labels)."""
    g = draw(rng, p)
    return apply(x, g), g.labels()
