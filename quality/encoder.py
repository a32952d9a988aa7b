"""One model's shared encoder: batched image and text encoding, a text-embedding cache, a decode pool.

* A caller's images are decoded on a thread pool (encoded bytes in parallel) and checked there; what
  passes goes to the model's :class:`~quality.batching.DynamicBatcher` as one item of
  ``len(images)`` units (chunks of ``max_batch``), so it meets the model as one batch, merged with
  other callers' but never split. Tensor preprocessing (:mod:`quality.preprocess`) differs by device:
  on a GPU the pictures are stacked into one pinned uint8 tensor per size, checked on a strided
  sample of it, and resized/cropped/normalised with the whole batch on the device, on the batcher's
  thread; on the CPU each picture is resized straight from its own array on the pool (no full-size
  stack copy), the checks read those model-scale images (nearly free), and only what passed is
  cropped, normalised and submitted. Either way the host work of the next caller overlaps the
  encoding of this one. ``preprocess="pil"`` keeps open_clip's own per-image PIL transform.
* Images are encoded through :class:`~quality.tower.FusedImageTower` (open_clip's tower, one fused
  attention call per block) when the tower is a plain open_clip ViT, else through open_clip itself.
* Texts are cleaned of ComfyUI syntax, then looked up in an LRU cache keyed by (model, weights,
  cleaned prompt); only misses reach the model, batched like images.
* All model work runs on the batcher's one worker thread, never on an event loop.

:func:`shared_encoders` holds one encoder per (model, device, precision) for the whole process, so
every evaluator of a model shares its weights and its batches.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image, UnidentifiedImageError

from quality.aesthetic import AestheticHead
from quality.batching import BatchStats, DynamicBatcher, Reservation
from quality.errors import EvaluatorClosed
from quality.models import LoadedModel, ModelCache, Precision, choose_device, shared_model_cache
from quality.preprocess import TensorPreprocess
from quality.prompts import PromptInfo, describe_prompt
from quality.registry import ModelSpec
from quality.technical import (
    DecodedImage,
    TechnicalLimits,
    TechnicalReport,
    decode_and_check,
    decode_rgb_array,
    judge_batch,
    judge_pixels,
    judge_resized,
)
from quality.types import ImageInput

__all__ = [
    "ClipEncoder",
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
    """Images of one caller: a uint8 ``[N, H, W, 3]`` stack (tensor mode on a GPU: resized with the
    batch on the device) or the ``[N, 3, S, S]`` model input (PIL mode, and tensor mode on the CPU)."""

    pixels: torch.Tensor
    head: AestheticHead | None
    model_input: bool = True


@dataclass(frozen=True, slots=True)
class _TextJob:
    text: str


_Job = _ImageJob | _TextJob
#: How images become model input: ``pil`` (open_clip's own transform, per image on the decode pool),
#: ``tensor`` (batched in torch on the model's device, :mod:`quality.preprocess`), ``auto`` (tensor).
PreprocessMode = Literal["auto", "pil", "tensor"]
#: Text job: (embedding ``[D]``, None); image job: (embeddings ``[N, D]``, aesthetic ratings or None).
_Result = tuple[torch.Tensor, list[float] | None]
#: What :meth:`ClipEncoder.embed_images` gives per image: report, embedding, aesthetic rating.
_Embedded = tuple[TechnicalReport, torch.Tensor | None, float | None]


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
        spec = model.spec
        if preprocess == "auto":
            preprocess = "tensor" if spec.resize_mode == "shortest" else "pil"
        self.preprocess_mode: PreprocessMode = preprocess
        self._tensor_preprocess = (
            TensorPreprocess(spec.image_size, spec.mean, spec.std, interpolation=spec.interpolation,
                             resize_mode=spec.resize_mode, device=model.device, dtype=model.dtype)
            if preprocess == "tensor" else None
        )
        self.max_batch = max_batch
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
            stacks = [j.pixels for _, j in images]
            # One encoder's image jobs are all of one kind: raw stacks on a GPU, model input otherwise.
            if self._tensor_preprocess is not None and not images[0][1].model_input:
                pixels = self._tensor_preprocess(stacks)  # one resize per image size, on the device
            else:
                pixels = stacks[0] if len(stacks) == 1 else torch.cat(stacks)
                if self.model.device.type == "cuda":
                    pixels = pixels.pin_memory()
            emb = self.model.encode_images(pixels)
            sizes = [s.shape[0] for s in stacks]
            heads = {id(j.head): j.head for _, j in images if j.head is not None}
            ratings: dict[int, list[float]] = {}
            for head_id, head in heads.items():  # one head call per head, over all its rows
                mine = [k for k, (_, j) in enumerate(images) if id(j.head) == head_id]
                starts = [sum(sizes[:k]) for k in mine]
                rows = [r for k, st in zip(mine, starts, strict=True) for r in range(st, st + sizes[k])]
                values = head(emb[rows]).tolist()
                offset = 0
                for k in mine:
                    ratings[k] = values[offset:offset + sizes[k]]
                    offset += sizes[k]
            start = 0
            for k, (i, _) in enumerate(images):
                results[i] = (emb[start:start + sizes[k]], ratings.get(k))
                start += sizes[k]
        return [r for r in results if r is not None]

    # -- caller side --------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise EvaluatorClosed(f"the encoder of {self.model.spec.name!r} is closed")

    def _prepare_pil(self, image: ImageInput, limits: TechnicalLimits) -> PreparedImage:
        # open_clip's transform; the pixel statistics of the checks come from that model input.
        decoded = decode_and_check(image, limits)
        if decoded.image is None:
            return PreparedImage(TechnicalReport(decoded.failures, 0, 0, 0.0, 0.0), None)
        pixels = self.model.preprocess(decoded.image)
        rgb = (pixels.permute(1, 2, 0).reshape(-1, 3) * self._std + self._mean) * 255.0
        report = judge_pixels(decoded, rgb.numpy(), limits)
        return PreparedImage(report, pixels if report.ok else None)

    def _prepare_chunk(
        self, images: Sequence[ImageInput], limits: TechnicalLimits, head: AestheticHead | None,
        reservation: Reservation[_Job, _Result],
    ) -> list[tuple[TechnicalReport, Future[_Result] | None, int]]:
        """On a pool thread: decode, stack, check, and submit what passed as one item per image size.

        Returns per image (report, future of its item or None when it failed, row in that item).
        """
        submitted = 0
        try:
            out: list[tuple[TechnicalReport, Future[_Result] | None, int] | None] = [None] * len(images)
            if self._tensor_preprocess is None:
                prepared = [self._prepare_pil(im, limits) for im in images]
                ok = [i for i, p in enumerate(prepared) if p.pixels is not None]
                for i, p in enumerate(prepared):
                    out[i] = (p.report, None, 0)
                if ok:
                    stack = torch.stack([p.pixels for p in prepared if p.pixels is not None])
                    whole = reservation.submit(_ImageJob(stack, head), size=len(ok))
                    submitted += len(ok)
                    for row, i in enumerate(ok):
                        out[i] = (prepared[i].report, whole, row)
                return [o for o in out if o is not None]
            if self.model.device.type == "cpu":
                submitted = self._prepare_chunk_cpu(images, limits, head, reservation, out)
                return [o for o in out if o is not None]
            groups: dict[tuple[int, ...], list[tuple[int, DecodedImage, object]]] = {}
            for i, im in enumerate(images):
                decoded, arr = decode_rgb_array(im, limits)
                if arr is None:
                    out[i] = (TechnicalReport(decoded.failures, 0, 0, 0.0, 0.0), None, 0)
                else:
                    groups.setdefault(arr.shape, []).append((i, decoded, arr))
            for members in groups.values():
                stack = self._tensor_preprocess.stack([arr for _, _, arr in members])  # type: ignore[misc]
                reports = judge_batch([d for _, d, _ in members], stack.numpy(), limits)
                passed = [k for k, r in enumerate(reports) if r.ok]
                fut: Future[_Result] | None = None
                if passed:
                    if len(passed) < len(members):
                        stack = stack[passed]
                    fut = reservation.submit(_ImageJob(stack, head, model_input=False), size=len(passed))
                    submitted += len(passed)
                rows = {k: row for row, k in enumerate(passed)}
                for k, ((i, _, _), report) in enumerate(zip(members, reports, strict=True)):
                    out[i] = (report, fut if k in rows else None, rows.get(k, 0))
            return [o for o in out if o is not None]
        finally:
            reservation.release(len(images) - submitted)  # what failed its checks will not come

    def _prepare_chunk_cpu(
        self, images: Sequence[ImageInput], limits: TechnicalLimits, head: AestheticHead | None,
        reservation: Reservation[_Job, _Result],
        out: list[tuple[TechnicalReport, Future[_Result] | None, int] | None],
    ) -> int:
        """Tensor mode on the CPU: each picture resized from its own array (no full-size stack copy),
        the checks read from those small images, and only what passed is cropped, normalised and
        submitted as the model's input. Fills ``out``; returns how many units it submitted."""
        assert self._tensor_preprocess is not None
        rows: list[tuple[int, DecodedImage, torch.Tensor]] = []
        for i, im in enumerate(images):
            decoded, arr = decode_rgb_array(im, limits)
            if arr is None:
                out[i] = (TechnicalReport(decoded.failures, 0, 0, 0.0, 0.0), None, 0)
            else:
                rows.append((i, decoded, self._tensor_preprocess.resize_one(arr)))
        reports = judge_resized([d for _, d, _ in rows], [r for _, _, r in rows], limits)
        passed = [k for k, r in enumerate(reports) if r.ok]
        fut: Future[_Result] | None = None
        if passed:
            pixels = self._tensor_preprocess.crop_normalise([rows[k][2] for k in passed])
            fut = reservation.submit(_ImageJob(pixels, head), size=len(passed))
        row_of = {k: row for row, k in enumerate(passed)}
        for k, ((i, _, _), report) in enumerate(zip(rows, reports, strict=True)):
            out[i] = (report, fut if k in row_of else None, row_of.get(k, 0))
        return len(passed)

    async def embed_image(
        self, image: ImageInput, limits: TechnicalLimits, head: AestheticHead | None = None
    ) -> _Embedded:
        """(report, embedding or None when the checks failed, aesthetic rating or None)."""
        return (await self.embed_images([image], limits, head))[0]

    async def embed_images(
        self, images: Sequence[ImageInput], limits: TechnicalLimits, head: AestheticHead | None = None
    ) -> list[_Embedded]:
        """Checked and embedded images, in order; a caller's images reach the model as one batch
        (chunks of ``max_batch``)."""
        self._check_open()
        if not images:
            return []
        loop = asyncio.get_running_loop()
        items = list(images)
        with self._batcher.reserve(len(items)) as reservation:
            encoded = [i for i, im in enumerate(items) if isinstance(im, bytes | bytearray | memoryview)]
            if len(encoded) > 1:  # decode files in parallel; the rest is one vectorised pass per chunk
                decoded = await asyncio.gather(*(loop.run_in_executor(self._pool, _decode_bytes, items[i])
                                                 for i in encoded))
                for i, im in zip(encoded, decoded, strict=True):
                    items[i] = im
            step = self.max_batch
            chunks = await asyncio.gather(*(
                loop.run_in_executor(self._pool, self._prepare_chunk, items[k:k + step], limits, head,
                                     reservation)
                for k in range(0, len(items), step)))
        flat = [entry for chunk in chunks for entry in chunk]
        waiting = {id(fut): fut for _, fut, _ in flat if fut is not None}
        done = dict(zip(waiting, await asyncio.gather(*(asyncio.wrap_future(f) for f in waiting.values())),
                        strict=True))
        result: list[_Embedded] = []
        for report, fut, row in flat:
            if fut is None:
                result.append((report, None, None))
                continue
            emb, ratings = done[id(fut)]
            result.append((report, emb[row], None if ratings is None else ratings[row]))
        return result

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
        mode = preprocess if preprocess != "auto" else ("tensor" if spec.resize_mode == "shortest" else "pil")
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


def _decode_bytes(data: ImageInput) -> ImageInput:
    """Encoded bytes as an RGB PIL image, or as they were when undecodable (the checks say so)."""
    try:
        with Image.open(io.BytesIO(data)) as opened:  # type: ignore[arg-type]
            opened.load()
            return opened.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError):
        return data


@functools.cache
def shared_encoders() -> SharedEncoders:
    """The process-wide encoders (created on first use, never at import)."""
    return SharedEncoders()
