"""Batched image preprocessing in torch: one uint8 stack, one resize, crop and normalisation.

open_clip's own transform (PIL bicubic resize of the shortest side, centre crop, normalise) runs one
image at a time, which costs more than a small model's forward pass and, on a GPU, caps throughput far
below what the model can encode. Instead the evaluator stacks a caller's decoded images (same size)
into one ``uint8`` ``[N, H, W, 3]`` tensor and this module does the same steps for the whole stack:
antialiased bicubic resize (torch's kernel, which follows PIL's; on the CPU it runs on the uint8
pixels directly, vectorised), rounding to 8 bits as PIL does, centre crop, normalisation, on the
model's device. The result matches the PIL path to about one grey level (cosines agree to ~1e-3).

On the CPU the evaluator uses :meth:`TensorPreprocess.resize_one` per picture instead (the same
kernel, read in place from the caller's array, so no full-size stack is copied) and
:meth:`TensorPreprocess.crop_normalise` for the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
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

    def stack(self, arrays: Sequence[np.ndarray]) -> torch.Tensor:
        """Same-sized ``H×W×3`` uint8 arrays as one ``[N, H, W, 3]`` host tensor (pinned when the model
        is on CUDA, so that its upload is asynchronous), in one copy."""
        first = arrays[0]
        out = torch.empty((len(arrays), *first.shape), dtype=torch.uint8,
                          pin_memory=self.device.type == "cuda")
        np.stack(arrays, out=out.numpy())
        return out

    def resize_one(self, array: np.ndarray) -> torch.Tensor:
        """CPU: one ``H×W×3`` uint8 array resized (shortest side to ``size``, antialiased, rounded to 8
        bits as PIL does) into a uint8 ``[3, h, w]`` tensor, not yet cropped.

        A writable array is read in place (a channels-last view: no copy of the full-size picture); a
        read-only one (``np.asarray`` of a PIL image) is copied first, since torch only wraps writable
        memory.
        """
        if not array.flags.writeable or any(st < 0 for st in array.strides):
            array = np.array(array)
        x = torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)  # [1, 3, H, W] channels-last view
        out: torch.Tensor = TF.resize(x, [self.size], interpolation=self.interpolation, antialias=True)
        return out[0]

    def crop_normalise(self, resized: Sequence[torch.Tensor]) -> torch.Tensor:
        """uint8 ``[3, h, w]`` images from :meth:`resize_one` as the ``[N, 3, size, size]`` model input."""
        x = torch.empty((len(resized), 3, self.size, self.size), dtype=torch.float32)
        for row, image in zip(x, resized, strict=True):
            row.copy_(TF.center_crop(image, [self.size, self.size]))  # uint8 → float in the copy
        x = x.to(self.device).sub_(self._mean).div_(self._std)  # in place: no temporaries
        return x.to(self.dtype)

    def __call__(self, stacks: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[ΣN, 3, size, size]`` model input on the device from uint8 ``[N, H, W, 3]`` stacks (or single
        ``H×W×3`` images), in order; stacks of one size are resized together."""
        batches = [t if t.dim() == 4 else t.unsqueeze(0) for t in stacks]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, t in enumerate(batches):
            groups.setdefault(tuple(t.shape[1:]), []).append(i)
        out: list[torch.Tensor | None] = [None] * len(batches)
        for idx in groups.values():
            parts = [batches[i] for i in idx]
            x = self._one_size(parts[0] if len(parts) == 1 else torch.cat(parts))
            start = 0
            for i in idx:
                n = batches[i].shape[0]
                out[i] = x[start:start + n]
                start += n
        pieces = [t for t in out if t is not None]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def _one_size(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # a channels-last view
        if x.device.type == "cpu":
            # torch's uint8 antialiased kernel: vectorised, and it rounds into 8 bits as PIL does.
            x = TF.resize(x, [self.size], interpolation=self.interpolation, antialias=True)
        else:
            x = TF.resize(x.float(), [self.size], interpolation=self.interpolation, antialias=True)
            x = x.clamp_(0.0, 255.0).round_()  # PIL resamples into 8 bits
        x = TF.center_crop(x, [self.size, self.size])
        x = x.to(torch.float32, memory_format=torch.contiguous_format)
        out: torch.Tensor = ((x - self._mean) / self._std).to(self.dtype)
        return out
