"""One model's shared encoder: batched image and text encoding, a text-embedding cache, a decode pool.

* Images are decoded, checked and preprocessed on a thread pool, each one handed to the model's
  :class:`~quality.batching.DynamicBatcher` straight from its pool thread as soon as it is ready, so
  decoding overlaps encoding. On CUDA the resize/crop/normalise step runs batched on the GPU instead
  (:mod:`quality.preprocess`); on the CPU it is open_clip's own PIL transform.
* Texts are cleaned of ComfyUI syntax, then looked up in an LRU cache keyed by (model, weights,
  cleaned prompt); only misses reach the model, batched like images.
* All model work runs on the batcher's one worker thread, never on an event loop.

:func:`shared_encoders` holds one encoder per (model, device, precision) for the whole process, so
every evaluator of a model shares its weights and its batches.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import torch

from quality.aesthetic import AestheticHead
from quality.batching import BatchStats, DynamicBatcher, Reservation
from quality.errors import EvaluatorClosed
from quality.models import LoadedModel, ModelCache, Precision, choose_device, shared_model_cache
from quality.preprocess import TensorPreprocess
from quality.prompts import PromptInfo, describe_prompt
from quality.registry import ModelSpec
from quality.technical import (
    TechnicalLimits,
    TechnicalReport,
    check_image,
    decode_and_check,
    judge_pixels,
)
from quality.types import ImageInput

__all__ = [
    "ClipEncoder",
    "PreparedImage",
    "PreprocessMode",
    "SharedEncoders",
    "TextEmbeddingCache",
    "shared_encoders",
]

logger = logging.getLogger(__name__)


class TextEmbeddingCache:
    """A thread-safe LRU of text embeddings keyed by (model name, weights id, cleaned prompt)."""

    def __init__(self, maxsize: int = 1024) -> None:
        self.maxsize = maxsize
        self.hits = 0
        self.misses = 0
        self._data: OrderedDict[tuple[str, str, str], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str, str]) -> torch.Tensor | None:
        with self._lock:
            found = self._data.get(key)
            if found is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return found

    def put(self, key: tuple[str, str, str], value: torch.Tensor) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)


@dataclass(frozen=True, slots=True)
class PreparedImage:
    """An image after the checks: its report, and (when it passed) the model's input tensor, or the
    uint8 ``H×W×3`` image when preprocessing happens with the batch on the device."""

    report: TechnicalReport
    pixels: torch.Tensor | None


@dataclass(frozen=True, slots=True)
class _ImageJob:
    pixels: torch.Tensor
    head: AestheticHead | None


@dataclass(frozen=True, slots=True)
class _TextJob:
    text: str


_Job = _ImageJob | _TextJob
#: How images become model input: ``pil`` (open_clip's own transform, per image on the decode pool),
#: ``tensor`` (batched on the model's device, :mod:`quality.preprocess`), ``auto`` (tensor on CUDA).
PreprocessMode = Literal["auto", "pil", "tensor"]
_Result = tuple[torch.Tensor, float | None]


class ClipEncoder:
    """Batched, cached encoding for one loaded model. Thread-safe; usable from any event loop."""

    def __init__(
        self,
        model: LoadedModel,
        *,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        text_cache: TextEmbeddingCache | None = None,
        decode_workers: int | None = None,
        preprocess: PreprocessMode = "auto",
    ) -> None:
        self.model = model
        if preprocess == "auto":
            preprocess = "tensor" if model.device.type == "cuda" else "pil"
        self.preprocess_mode: PreprocessMode = preprocess
        spec = model.spec
        self._tensor_preprocess = (
            TensorPreprocess(spec.image_size, spec.mean, spec.std, interpolation=spec.interpolation,
                             resize_mode=spec.resize_mode, device=model.device, dtype=model.dtype)
            if preprocess == "tensor" else None
        )
        self.text_cache = text_cache or TextEmbeddingCache()
        self._batcher: DynamicBatcher[_Job, _Result] = DynamicBatcher(
            self._run_batch, max_batch=max_batch, max_wait_ms=max_wait_ms,
            name=f"quality-{model.spec.name}",
        )
        workers = decode_workers or min(8, os.cpu_count() or 2)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"quality-decode-{model.spec.name}")
        self._mean = torch.tensor(model.spec.mean)
        self._std = torch.tensor(model.spec.std)
        self._closed = False

    @property
    def stats(self) -> BatchStats:
        return self._batcher.stats

    @property
    def closed(self) -> bool:
        return self._closed

    # -- model work, on the batcher's thread ------------------------------------------------------

    @torch.inference_mode()
    def _run_batch(self, jobs: Sequence[_Job]) -> list[_Result]:
        results: list[_Result | None] = [None] * len(jobs)
        texts = [(i, j) for i, j in enumerate(jobs) if isinstance(j, _TextJob)]
        images = [(i, j) for i, j in enumerate(jobs) if isinstance(j, _ImageJob)]
        if texts:
            emb = self.model.encode_texts([j.text for _, j in texts])
            for row, (i, _) in enumerate(texts):
                results[i] = (emb[row], None)
        if images:
            if self._tensor_preprocess is not None:
                pixels = self._tensor_preprocess([j.pixels for _, j in images])
            else:
                pixels = torch.stack([j.pixels for _, j in images])
                if self.model.device.type == "cuda":
                    pixels = pixels.pin_memory()
            emb = self.model.encode_images(pixels)
            ratings: dict[int, float] = {}
            heads = {id(j.head): j.head for _, j in images if j.head is not None}
            for head_id, head in heads.items():
                rows = [row for row, (_, j) in enumerate(images) if id(j.head) == head_id]
                values = head(emb[rows]).tolist()
                ratings.update(zip(rows, values, strict=True))
            for row, (i, _) in enumerate(images):
                results[i] = (emb[row], ratings.get(row))
        return [r for r in results if r is not None]

    # -- caller side --------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise EvaluatorClosed(f"the encoder of {self.model.spec.name!r} is closed")

    def prepare(self, image: ImageInput, limits: TechnicalLimits) -> PreparedImage:
        """Decode, check and preprocess one image. Blocking: it runs on the decode pool.

        PIL mode: open_clip's own transform; the pixel statistics of the checks come from that model
        input (un-normalised), at no extra cost. Tensor mode: the checks read a box-reduced copy and
        the image leaves as a uint8 tensor, to be resized with its batch on the model's device.
        """
        if self._tensor_preprocess is not None:
            report, pil = check_image(image, limits)
            if not report.ok or pil is None:
                return PreparedImage(report, None)
            return PreparedImage(report, TensorPreprocess.to_uint8(pil))
        decoded = decode_and_check(image, limits)
        if decoded.image is None:
            return PreparedImage(TechnicalReport(decoded.failures, 0, 0, 0.0, 0.0), None)
        pixels = self.model.preprocess(decoded.image)
        rgb = (pixels.permute(1, 2, 0).reshape(-1, 3) * self._std + self._mean) * 255.0
        report = judge_pixels(decoded, rgb.numpy(), limits)
        return PreparedImage(report, pixels if report.ok else None)

    def _prepare_and_submit(
        self, image: ImageInput, limits: TechnicalLimits, head: AestheticHead | None,
        reservation: Reservation[_Job, _Result],
    ) -> tuple[TechnicalReport, Future[_Result] | None]:
        # On a pool thread: straight on to the batcher, with no trip back through the event loop.
        try:
            prepared = self.prepare(image, limits)
        except BaseException:
            reservation.release()
            raise
        if prepared.pixels is None:
            reservation.release()
            return prepared.report, None
        return prepared.report, reservation.submit(_ImageJob(prepared.pixels, head))

    async def prepare_async(self, image: ImageInput, limits: TechnicalLimits) -> PreparedImage:
        self._check_open()
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.prepare, image, limits)

    async def _embed_one(
        self, image: ImageInput, limits: TechnicalLimits, head: AestheticHead | None,
        reservation: Reservation[_Job, _Result],
    ) -> tuple[TechnicalReport, torch.Tensor | None, float | None]:
        loop = asyncio.get_running_loop()
        report, fut = await loop.run_in_executor(
            self._pool, self._prepare_and_submit, image, limits, head, reservation)
        if fut is None:
            return report, None, None
        emb, rating = await asyncio.wrap_future(fut)
        return report, emb, rating

    async def embed_image(
        self, image: ImageInput, limits: TechnicalLimits, head: AestheticHead | None = None
    ) -> tuple[TechnicalReport, torch.Tensor | None, float | None]:
        """(report, embedding or None when the checks failed, aesthetic rating or None)."""
        return (await self.embed_images([image], limits, head))[0]

    async def embed_images(
        self, images: Sequence[ImageInput], limits: TechnicalLimits, head: AestheticHead | None = None
    ) -> list[tuple[TechnicalReport, torch.Tensor | None, float | None]]:
        """Each image decoded on the pool and batched as soon as it is ready; results in order."""
        self._check_open()
        with self._batcher.reserve(len(images)) as reservation:
            return list(await asyncio.gather(*(self._embed_one(im, limits, head, reservation)
                                               for im in images)))

    def describe(self, prompt: str) -> PromptInfo:
        return describe_prompt(self.model.tokenizer, prompt, self.model.context_length)

    async def embed_texts(self, prompts: Sequence[str]) -> list[tuple[PromptInfo, torch.Tensor]]:
        """Embeddings of ``prompts`` after cleaning, from the cache where possible, in order."""
        self._check_open()
        infos = [self.describe(p) for p in prompts]
        spec, weights = self.model.spec.name, self.model.weights_id
        found: dict[str, torch.Tensor] = {}
        missing: list[str] = []
        for info in infos:
            if info.cleaned in found or info.cleaned in missing:
                continue
            cached = self.text_cache.get((spec, weights, info.cleaned))
            if cached is None:
                missing.append(info.cleaned)
                if info.truncated:
                    logger.info("model %s: prompt cut at %d tokens (it has %d): %.60r…", spec,
                                info.context_length, info.n_tokens, info.cleaned)
            else:
                found[info.cleaned] = cached
        if missing:
            results = await self._batcher.run_many([_TextJob(t) for t in missing])
            for text, (emb, _) in zip(missing, results, strict=True):
                self.text_cache.put((spec, weights, text), emb)
                found[text] = emb
        return [(info, found[info.cleaned]) for info in infos]

    def close(self) -> None:
        """Finish queued work, stop the worker and the decode pool. Later calls raise EvaluatorClosed."""
        if self._closed:
            return
        self._closed = True
        self._batcher.close()
        self._pool.shutdown(wait=True)


class SharedEncoders:
    """One :class:`ClipEncoder` per (model, device, precision, preprocessing); the first caller's
    batching settings win."""

    def __init__(self, models: ModelCache | None = None) -> None:
        self.models = models or shared_model_cache()
        self._lock = threading.Lock()
        self._encoders: dict[tuple[ModelSpec, str, str, str], ClipEncoder] = {}

    def get(
        self,
        spec: ModelSpec,
        *,
        device: str | torch.device | None = None,
        precision: Precision | None = None,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        preprocess: PreprocessMode = "auto",
    ) -> ClipEncoder:
        choice = choose_device(device, precision)
        mode = preprocess if preprocess != "auto" else ("tensor" if choice.device.type == "cuda" else "pil")
        key = (spec, str(choice.device), choice.precision, mode)
        with self._lock:
            enc = self._encoders.get(key)
            if enc is not None and not enc.closed:
                return enc
        loaded = self.models.get(spec, device=choice.device, precision=choice.precision)  # may take seconds
        with self._lock:
            enc = self._encoders.get(key)
            if enc is None or enc.closed:
                enc = ClipEncoder(loaded, max_batch=max_batch, max_wait_ms=max_wait_ms, preprocess=mode)
                self._encoders[key] = enc
            return enc

    def close_all(self) -> None:
        with self._lock:
            encoders = list(self._encoders.values())
            self._encoders.clear()
        for enc in encoders:
            enc.close()


@functools.cache
def shared_encoders() -> SharedEncoders:
    """The process-wide encoders (created on first use, never at import)."""
    return SharedEncoders()
