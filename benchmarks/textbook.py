"""The data side of PyTorch's MNIST example, shared by the benchmarks' textbook loops."""

from __future__ import annotations

import torch


class PilImages(torch.utils.data.Dataset):
    """torchvision.datasets.MNIST's item access: uint8 images in memory, a PIL image per
    item (mode L, implied by the 2-D uint8 array), then the per-sample transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform) -> None:
        self.data, self.targets, self.transform = images[:, 0], labels, transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        from PIL import Image

        img = Image.fromarray(self.data[index].numpy())
        return self.transform(img), int(self.targets[index])
