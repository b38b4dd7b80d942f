"""Helpers shared by the tests that build tiny torchvision models."""

from __future__ import annotations

import torch
from torch import nn

#: resnet18's stages, shallow to deep, as ``layers="auto"`` picks them.
RESNET_STAGES = ["relu", "layer1", "layer2", "layer3", "layer4"]


def randomise_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BatchNorm statistics and affine parameters.

    Without them the eval-mode maps of an untrained net are degenerate.
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(0.2 * torch.randn(c, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
                m.weight.copy_(0.5 + torch.rand(c, generator=gen))
                m.bias.copy_(0.2 * torch.randn(c, generator=gen))
