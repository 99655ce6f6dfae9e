from __future__ import annotations

import pytest
import torch

from gaflab.models import build_model


def test_small_cnn_shapes():
    m = build_model("small_cnn", 10, 1, 28)
    assert m(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert not any(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())


@pytest.mark.parametrize(("name", "params"), [("resnet18", 11_220_132), ("resnet34", 21_328_292)])
def test_cifar_resnets(name, params):
    torch.manual_seed(0)
    m = build_model(name, 100, 3, 32)
    assert sum(p.numel() for p in m.parameters()) == params  # the standard CIFAR ResNets
    # CIFAR-style stem: 3x3 stride-1 convolution, no max-pool
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert not any(isinstance(x, torch.nn.MaxPool2d) for x in m.modules())
    thin = build_model(name, 100, 3, 32, width=8).eval()  # same depth, cheap to run
    with torch.no_grad():
        assert thin(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model 'vgg'.*resnet18"):
        build_model("vgg", 10, 3, 32)
