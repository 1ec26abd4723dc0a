"""PyTorch reference implementations the tests compare against (pytorch-fid's Inception).

``import torchvision`` fails in this environment: the PyPI torchvision wheel's ``__init__``
registers fake kernels for C++ ops (``torchvision::nms``, ...) compiled against a different
torch, and raises. pytorch-fid imports ``torchvision`` only for the pure-Python Inception
blocks in ``torchvision.models.inception``. ``import_pytorch_fid_inception`` therefore puts
bare package modules for ``torchvision`` and ``torchvision.models`` into ``sys.modules``
(their ``__path__`` is the installed package directory, so their submodules import normally
but their ``__init__`` files never run) and then imports ``pytorch_fid.inception``. If a real
torchvision is already imported, it is used as is.

``fid_inception_peer`` builds pytorch-fid's FID network without its download: the weight
loader pytorch-fid calls is swapped for one returning a same-keyed randomly initialised
state dict, and the BatchNorm statistics are then set to random values of a realistic scale.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from unittest import mock

import pytest


def bare_torchvision() -> bool:
    """Put bare ``torchvision`` / ``torchvision.models`` package modules into ``sys.modules`` (see the
    module docstring); False if torchvision is not installed. Also what diffusers needs: it imports
    torchvision whenever it is installed (benchmarks/train_step.py and accelerator.py call this)."""
    if "torchvision" in sys.modules:
        return True
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    root = types.ModuleType("torchvision")
    root.__path__, root.__spec__ = list(spec.submodule_search_locations), spec  # find_spec() works on it
    sys.modules["torchvision"] = root
    models = types.ModuleType("torchvision.models")
    models.__path__ = [f"{p}/models" for p in root.__path__]
    sys.modules["torchvision.models"] = root.models = models
    root.__version__ = importlib.import_module("torchvision.version").__version__
    models.inception_v3 = importlib.import_module("torchvision.models.inception").inception_v3
    return True


def import_pytorch_fid_inception():
    """``pytorch_fid.inception``, importable without running torchvision's ``__init__``."""
    pytest.importorskip("torch")
    if importlib.util.find_spec("pytorch_fid") is None:
        pytest.skip("pytorch_fid is not installed")
    if not bare_torchvision():
        pytest.skip("torchvision is not installed")
    return importlib.import_module("pytorch_fid.inception")


def fid_inception_peer(seed: int = 0):
    """(pytorch-fid ``InceptionV3([3])`` in eval mode, its inner ``fid_inception_v3()`` network
    that owns the ``fc`` layer and whose ``state_dict()`` has the published file's keys)."""
    pfi = import_pytorch_fid_inception()
    import torch
    from torchvision.models.inception import Inception3

    torch.manual_seed(seed)
    # Same keys and shapes as the published weights (torch's default, random, initialisation).
    random_weights = Inception3(num_classes=1008, aux_logits=False, init_weights=False).state_dict()
    with mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: random_weights):
        inner = pfi.fid_inception_v3()
    with mock.patch.object(pfi, "fid_inception_v3", lambda: inner):
        net = pfi.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True)

    # BatchNorm: random affine parameters, running statistics measured on a random batch (so
    # activations keep an O(1) scale through the 94 layers) and then randomly perturbed.
    bns = [m for m in inner.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.2)
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average: one batch sets the statistics
        net.train()
        net(torch.rand(2, 96, 96, 3).permute(0, 3, 1, 2))  # channels_last: fast CPU convs
        for bn in bns:
            bn.running_mean.add_(0.1 * torch.randn_like(bn.running_mean) * bn.running_var.sqrt())
            bn.running_var.mul_(torch.empty_like(bn.running_var).uniform_(0.7, 1.4))
        inner.fc.bias.normal_(0.0, 0.1)
    net.eval()
    inner.eval()
    return net, inner
