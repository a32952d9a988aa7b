"""Batched image preprocessing on the model's device, for when per-image PIL work is the bottleneck.

open_clip's own transform (PIL bicubic resize of the shortest side, centre crop, normalise) runs one
image at a time on the CPU. On a GPU that caps throughput far below what the model can encode, so
there the evaluator ships each decoded image as a ``uint8`` tensor and this module does the same
steps for a whole batch on the device: antialiased bicubic resize (torchvision's tensor kernel, which
follows PIL's), rounding to 8 bits as PIL does, centre crop, normalisation. The result matches the
PIL path to about one grey level (cosines agree to ~1e-3). On the CPU the PIL path stays the default.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

__all__ = ["TensorPreprocess"]


class TensorPreprocess:
    """open_clip's inference transform (``resize_mode="shortest"``) for batches of uint8 HWC tensors."""

    def __init__(
        self,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        interpolation: str = "bicubic",
        resize_mode: str = "shortest",
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if resize_mode != "shortest":
            raise ValueError(f"tensor preprocessing supports resize_mode 'shortest', not {resize_mode!r}")
        self.size = size
        self.device = torch.device(device)
        self.dtype = dtype
        self.interpolation = (InterpolationMode.BILINEAR if interpolation == "bilinear"
                              else InterpolationMode.BICUBIC)
        self._mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255.0

    @staticmethod
    def to_uint8(image: Image.Image) -> torch.Tensor:
        """An RGB PIL image as an ``H×W×3`` uint8 tensor (on the CPU; cheap, no torch kernels)."""
        return torch.from_numpy(np.array(image.convert("RGB") if image.mode != "RGB" else image))

    def __call__(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[N, 3, size, size]`` normalised model input on the device, from uint8 ``H×W×3`` tensors."""
        out: list[torch.Tensor | None] = [None] * len(images)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault(tuple(im.shape), []).append(i)
        for idx in groups.values():
            # One copy into (pinned, on CUDA) host memory, then one upload for the whole group.
            pinned = self.device.type == "cuda"
            batch = torch.empty((len(idx), *images[idx[0]].shape), dtype=torch.uint8, pin_memory=pinned)
            for row, i in enumerate(idx):
                batch[row].copy_(images[i])
            if pinned:
                batch = batch.to(self.device, non_blocking=True)
            x = batch.permute(0, 3, 1, 2).float()
            x = TF.resize(x, [self.size], interpolation=self.interpolation, antialias=True)
            x = x.clamp_(0.0, 255.0).round_()  # PIL resamples into 8 bits
            x = TF.center_crop(x, [self.size, self.size])
            x = ((x - self._mean) / self._std).to(self.dtype)
            for row, i in enumerate(idx):
                out[i] = x[row]
        return torch.stack([t for t in out if t is not None])
