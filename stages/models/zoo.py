"""The model zoo, chosen by `model.name`; every net normalizes its own 0..1 input.

torchvision is imported only by the builders that need it: importing it (and the
torch._dynamo it pulls in) costs every stage that loads a model about two seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from stages.core.errors import StageError
from stages.core.outputs import load_torch


class Normalize(nn.Module):
    """(x - mean) / std with the training split's statistics, inside the graph.

    Baking it into the model means ONNX, OpenVINO and `predict` need no separate
    preprocessing beyond pixels / 255.
    """

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def cnn(channels: int, size: int, classes: int) -> nn.Module:
    """The classic MNIST network of PyTorch's examples: conv 32, conv 64, pool, 128 hidden."""
    side = (size - 4) // 2
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3),
        nn.ReLU(inplace=True),
        nn.Conv2d(32, 64, 3),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Dropout(0.25),
        nn.Flatten(),
        nn.Linear(64 * side * side, 128),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Linear(128, classes),
    )


def lenet5(channels: int, size: int, classes: int) -> nn.Module:
    """LeCun's LeNet-5 with ReLU and max-pooling; any input size pools to 5x5."""
    return nn.Sequential(
        nn.Conv2d(channels, 6, 5, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(5),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120),
        nn.ReLU(inplace=True),
        nn.Linear(120, 84),
        nn.ReLU(inplace=True),
        nn.Linear(84, classes),
    )


def resnet18(channels: int, size: int, classes: int) -> nn.Module:
    """torchvision's ResNet-18 with a 3x3 stem and no stem pooling (CIFAR-style)."""
    from torchvision import models as tv

    net = tv.resnet18(weights=None, num_classes=classes)
    net.conv1 = nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


def vgg11_bn(channels: int, size: int, classes: int) -> nn.Module:
    """torchvision's VGG-11 (batch norm) with four poolings and a small head."""
    from torchvision import models as tv

    net = tv.vgg11_bn(weights=None, num_classes=classes)
    net.features[0] = nn.Conv2d(channels, 64, 3, padding=1)
    # Five 2x poolings would shrink 28 px to nothing: drop the last one.
    net.features = net.features[:-1]
    net.avgpool = nn.AdaptiveAvgPool2d(1)
    net.classifier = nn.Sequential(
        nn.Linear(512, 256), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(256, classes)
    )
    return net


def googlenet(channels: int, size: int, classes: int) -> nn.Module:
    """torchvision's GoogLeNet (Inception v1) with a 3x3 stem and no stem pooling."""
    from torchvision import models as tv
    from torchvision.models.googlenet import BasicConv2d

    net = tv.googlenet(
        weights=None,
        num_classes=classes,
        aux_logits=False,
        transform_input=False,
        init_weights=True,
    )
    net.conv1 = BasicConv2d(channels, 64, kernel_size=3, padding=1)
    net.maxpool1 = nn.Identity()
    net.maxpool2 = nn.Identity()
    return net


# name -> (builder, smallest image side it works on)
ZOO: dict[str, tuple[Callable[[int, int, int], nn.Module], int]] = {
    "cnn": (cnn, 8),
    "lenet5": (lenet5, 12),
    "resnet18": (resnet18, 8),
    "vgg11_bn": (vgg11_bn, 16),
    "googlenet": (googlenet, 16),
}


def model_config(name: str, meta: dict[str, Any]) -> dict[str, Any]:
    """Everything needed to rebuild the model and preprocess its input, saved beside it."""
    return {
        "name": name,
        "channels": meta["channels"],
        "image_size": meta["image_size"],
        "classes": meta["classes"],
        "mean": meta["mean"],
        "std": meta["std"],
    }


def build(config: dict[str, Any]) -> nn.Module:
    """The network a config describes, with its input normalization in front."""
    builder, min_size = ZOO[config["name"]]
    size = config["image_size"]
    if size < min_size:
        raise StageError(
            f"model.name: {config['name']} needs images of at least {min_size} px, "
            f"data.image_size is {size}"
        )
    net = builder(config["channels"], size, len(config["classes"]))
    return nn.Sequential(Normalize(config["mean"], config["std"]), net)


def example_input(config: dict[str, Any], batch: int = 1) -> torch.Tensor:
    """A zero batch of the model's input shape (float 0..1, N x C x H x W)."""
    size = config["image_size"]
    return torch.zeros(batch, config["channels"], size, size)


def load(file) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a saved model (weights + config) in eval mode on the CPU."""
    blob = load_torch(file, "a saved model")
    if not isinstance(blob, dict) or not {"config", "state_dict"} <= blob.keys():
        raise StageError(f"{file}: not a saved model (no config and weights)")
    model = build(blob["config"])
    model.load_state_dict(blob["state_dict"])
    return model.eval(), blob["config"]
