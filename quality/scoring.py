"""The CLIP quality evaluator: prompt alignment, negative prompts, technical checks, aesthetics.

::

    async with ClipEvaluator("tiny-shapes") as evaluator:
        scores = await evaluator.score(images, "a photo of a red circle", negative="text")
        best = max(scores, key=lambda s: s.value)

Every evaluator of the same (model, device, precision) in a process shares one loaded model and one
batching worker (:func:`quality.encoder.shared_encoders`), so concurrent pipelines batch together.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import numpy as np
import numpy.typing as npt
import torch

from quality.aesthetic import AestheticHead, load_aesthetic_head
from quality.encoder import ClipEncoder, PreprocessMode, SharedEncoders, shared_encoders
from quality.errors import EvaluatorClosed
from quality.models import Precision
from quality.registry import DEFAULT_MODEL, ModelSpec, Registry, default_registry
from quality.scores import QualityScore, ScoreWeights, clip_score
from quality.technical import TechnicalLimits
from quality.types import ImageInput

__all__ = ["ClipEvaluator"]

logger = logging.getLogger(__name__)


class ClipEvaluator:
    """Scores images against prompts with an open_clip model from the registry.

    The model loads on first use (off the event loop) or on ``async with``. Implements
    :class:`quality.types.Evaluator`.
    """

    def __init__(
        self,
        model: str | ModelSpec = DEFAULT_MODEL,
        *,
        registry: Registry | None = None,
        device: str | torch.device | None = None,
        precision: Precision | None = None,
        weights: ScoreWeights | Mapping[str, float] | None = None,
        aesthetic_head: str | Path | AestheticHead | None = None,
        limits: TechnicalLimits | None = None,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        preprocess: PreprocessMode = "auto",
        encoders: SharedEncoders | None = None,
    ) -> None:
        self.spec = model if isinstance(model, ModelSpec) else (registry or default_registry()).get(model)
        self.device = device
        self.precision: Precision | None = precision
        if weights is None:
            weights = ScoreWeights()
        self.weights = weights if isinstance(weights, ScoreWeights) else ScoreWeights.from_mapping(weights)
        self.limits = limits or TechnicalLimits()
        self.max_batch = max_batch
        self.max_wait_ms = max_wait_ms
        self.preprocess: PreprocessMode = preprocess
        self._aesthetic_source = aesthetic_head
        self._head: AestheticHead | None = aesthetic_head if isinstance(aesthetic_head, AestheticHead) else None
        self._encoders = encoders
        self._encoder: ClipEncoder | None = None
        self._load_lock = threading.Lock()
        self._closed = False

    @property
    def model_name(self) -> str:
        return self.spec.name

    # -- lifecycle ----------------------------------------------------------------------------------

    def load(self) -> ClipEncoder:
        """Load (or join) the shared encoder and the aesthetic head. Blocking: takes seconds the first time."""
        if self._closed:
            raise EvaluatorClosed("this evaluator is closed; make a new one")
        with self._load_lock:
            if self._encoder is None or self._encoder.closed:
                encoders = self._encoders or shared_encoders()
                self._encoder = encoders.get(self.spec, device=self.device, precision=self.precision,
                                             max_batch=self.max_batch, max_wait_ms=self.max_wait_ms,
                                             preprocess=self.preprocess)
            if self._head is None and self._aesthetic_source is not None:
                assert not isinstance(self._aesthetic_source, AestheticHead)
                self._head = load_aesthetic_head(self._aesthetic_source, expected_dim=self._encoder.model.embed_dim)
            return self._encoder

    async def _ready(self) -> ClipEncoder:
        if self._closed:
            raise EvaluatorClosed("this evaluator is closed; make a new one")
        enc = self._encoder
        if enc is not None and not enc.closed:
            return enc
        return await asyncio.to_thread(self.load)

    async def __aenter__(self) -> Self:
        await self._ready()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Refuse further use. The shared model stays loaded for the process's other evaluators."""
        self._closed = True
        self._encoder = None

    @property
    def encoder(self) -> ClipEncoder | None:
        return self._encoder

    # -- scoring ------------------------------------------------------------------------------------

    async def score(
        self,
        images: Sequence[ImageInput],
        prompt: str,
        *,
        negative: str | None = None,
    ) -> list[QualityScore]:
        """One :class:`QualityScore` per image, in order.

        Images failing a technical check score 0 with ``parts == {"technical": 0.0}`` and cost no
        model time; the others get ``alignment`` (CLIPScore against the cleaned prompt), ``negative``
        (CLIPScore against the negative prompt, when given) and ``aesthetic`` (with a head).
        """
        enc = await self._ready()
        texts = [prompt] if negative is None else [prompt, negative]
        text_emb, embedded = await asyncio.gather(
            enc.embed_texts(texts), enc.embed_images(images, self.limits, self._head)
        )
        prompt_info, prompt_emb = text_emb[0]
        negative_info, negative_emb = text_emb[1] if negative is not None else (None, None)
        results = []
        for report, emb, rating in embedded:
            if emb is None:
                results.append(QualityScore(0.0, {"technical": 0.0}, {}, self.spec.name, report,
                                            prompt_info, negative_info))
                continue
            cosines = {"prompt": float(emb @ prompt_emb)}
            parts = {"alignment": clip_score(cosines["prompt"])}
            if negative_emb is not None:
                cosines["negative"] = float(emb @ negative_emb)
                parts["negative"] = clip_score(cosines["negative"])
            if rating is not None:
                parts["aesthetic"] = float(rating)
            value, used = self.weights.combine(parts)
            parts["technical"] = 1.0
            results.append(QualityScore(value, parts, used, self.spec.name, report, prompt_info,
                                        negative_info, cosines))
        return results

    async def similarities(
        self, images: Sequence[ImageInput], prompts: Sequence[str]
    ) -> npt.NDArray[np.float32]:
        """Cosine similarity of every image with every prompt, ``[len(images), len(prompts)]``.

        Each image is encoded once. Rows of images that fail the technical checks are NaN.
        """
        enc = await self._ready()
        texts, embedded = await asyncio.gather(enc.embed_texts(list(prompts)), enc.embed_images(images, self.limits))
        text_matrix = torch.stack([emb for _, emb in texts])
        out = np.full((len(images), len(prompts)), np.nan, dtype=np.float32)
        for row, (_, emb, _) in enumerate(embedded):
            if emb is not None:
                out[row] = (text_matrix @ emb).numpy()
        return out

    def score_sync(
        self, images: Sequence[ImageInput], prompt: str, *, negative: str | None = None
    ) -> list[QualityScore]:
        """:meth:`score` for code with no event loop of its own (scripts, the CLI)."""
        return asyncio.run(self.score(images, prompt, negative=negative))
