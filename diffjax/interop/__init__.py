"""Released weights from other tools as diffjax models (``diffjax import``).

- ``load_diffusers(src) -> (config, denoiser)``: a diffusers UNet2DModel directory as a Denoiser.
- ``import_diffusers(src, workdir)``: the same as a diffjax workdir (config.json + orbax checkpoint)
  that ``diffjax sample``, ``serve``, ``eval`` and ``train`` (fine-tuning) read unchanged.
"""

from __future__ import annotations

import os

import ml_collections

from diffjax.interop.diffusers import import_diffusers, load_diffusers, load_params  # noqa: F401
from diffjax.interop.diffusers_unet import UnsupportedModel, WeightsError  # noqa: F401

__all__ = ["load_diffusers", "load_params", "import_diffusers", "default_config", "UnsupportedModel", "WeightsError"]


def default_config() -> ml_collections.ConfigDict:
    """configs/default.py of the source tree: the base of an import without --config."""
    from diffjax import configuration

    path = os.path.join(
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs", "default.py"
    )
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found (diffjax installed without its configs): pass --config")
    return configuration.load_config(path)
