"""The aesthetic head: an MLP over CLIP image embeddings, in the LAION "improved aesthetic predictor" format.

The widely used predictor (christophschuhmann/improved-aesthetic-predictor, e.g. the file
``sac+logos+ava1-l14-linearMSE.pth``) is a state dict of this module::

    layers = Sequential(Linear(768, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2),
                        Linear(128, 64), Dropout(0.1), Linear(64, 16), Linear(16, 1))

fed with the L2-normalised image embedding of OpenAI CLIP ViT-L/14, and returns a rating on the AVA
scale (about 1 to 10). :func:`load_aesthetic_head` reads that file (``.pth``/``.pt``/``.bin`` through
``torch.load(weights_only=True)``, or ``.safetensors``) for any embedding width, so a head trained on
another model's embeddings loads the same way; a head only means something on the model it was
trained for.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from quality.errors import AestheticHeadError

__all__ = ["AestheticHead", "load_aesthetic_head", "save_aesthetic_head"]

_HIDDEN = (1024, 128, 64, 16)
_LINEAR_INDICES = (0, 2, 4, 6, 7)


class AestheticHead(nn.Module):
    """LAION's MLP (same module layout, so its state dict loads as is)."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, _HIDDEN[0]),
            nn.Dropout(0.2),
            nn.Linear(_HIDDEN[0], _HIDDEN[1]),
            nn.Dropout(0.2),
            nn.Linear(_HIDDEN[1], _HIDDEN[2]),
            nn.Dropout(0.1),
            nn.Linear(_HIDDEN[2], _HIDDEN[3]),
            nn.Linear(_HIDDEN[3], 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Ratings, shape ``[N]``, for L2-normalised embeddings ``[N, input_size]``."""
        return self.layers(embeddings).squeeze(-1)  # type: ignore[no-any-return]


def _read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(loaded, dict) and "state_dict" in loaded:
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise AestheticHeadError(f"{path}: expected a state dict, found {type(loaded).__name__}")
    return loaded


def load_aesthetic_head(
    path: str | Path, *, expected_dim: int | None = None, device: torch.device | str = "cpu"
) -> AestheticHead:
    """Load a LAION-format head from ``path``, in eval mode, float32; check it fits ``expected_dim``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise AestheticHeadError(f"no aesthetic head file at {path}")
    state = dict(_read_state_dict(path))
    state = {k.removeprefix("module."): v for k, v in state.items()}
    expected_keys = {f"layers.{i}.{p}" for i in _LINEAR_INDICES for p in ("weight", "bias")}
    if set(state) != expected_keys:
        raise AestheticHeadError(
            f"{path} is not a LAION aesthetic predictor: keys {sorted(state)[:6]}…, "
            f"expected {sorted(expected_keys)[:6]}…"
        )
    input_size = int(state["layers.0.weight"].shape[1])
    if expected_dim is not None and input_size != expected_dim:
        raise AestheticHeadError(
            f"{path} rates {input_size}-wide embeddings, the model gives {expected_dim}-wide ones"
        )
    head = AestheticHead(input_size)
    try:
        head.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as exc:
        raise AestheticHeadError(f"{path}: {exc}") from exc
    head.eval()
    for p in head.parameters():
        p.requires_grad_(False)
    return head.to(device)


def save_aesthetic_head(head: AestheticHead, path: str | Path) -> None:
    """Write ``head`` in the LAION file format (a plain ``torch.save`` of its state dict)."""
    torch.save(head.state_dict(), Path(path))
