"""Comparison runs: models × prompts × seeds (× parameters) as a resumable object on disk.

::

    run = ComparisonRun("runs/fox", ComparisonSpec(template="sd15_txt2img", models=[a, b],
                                                   prompts=["a red fox"], seeds=[1, 2, 3]))
    await run.run(pool, evaluator=evaluator)   # again after a crash: only missing or failed cells run
    run.contact_sheet().save("runs/fox/sheet.png")
    frame = run.to_pandas()

``<directory>/manifest.json`` holds the spec and one record per cell (job id, backend, model, seed,
timings, score, output paths, lineage); images go to ``images/``. During a run each finished cell is
appended to ``manifest.journal.jsonl`` (one JSON line) and the manifest is rewritten only when the run
starts and ends (rewriting it per cell is quadratic in the grid): after a crash the manifest is still
whole, and opening the run reads the journal over it, so every recorded cell counts.
``ComparisonRun("runs/fox")`` opens an existing run; a spec that adds models, prompts or seeds to
it keeps what was done and runs the new cells only.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from comfy_orchestrator._files import write_atomically
from comfy_orchestrator.graph import Template, content_hash, load_templates
from comfy_orchestrator.pipelines.cache import DiskCache
from comfy_orchestrator.pipelines.cells import MANIFEST_FORMAT, Cell, CellRecord, ComparisonSpec
from comfy_orchestrator.pipelines.checks import template_problems
from comfy_orchestrator.pipelines.errors import PipelineSpecError
from comfy_orchestrator.pipelines.events import Emitter, EventCallback
from comfy_orchestrator.pipelines.jobs import Job, JobPolicy, RunContext, run_job
from comfy_orchestrator.pipelines.results import Artifact, JobOutcome, JobStatus
from comfy_orchestrator.pipelines.spec import PipelineSpec
from comfy_orchestrator.pipelines.stats import RunStats
from comfy_orchestrator.pipelines.steps import binding_of, score_images
from comfy_orchestrator.pipelines.types import Evaluator, PoolLike

__all__ = ["ComparisonRun"]

_MANIFEST = "manifest.json"
_JOURNAL = "manifest.journal.jsonl"


class ComparisonRun:
    """A comparison in ``directory``; pass ``spec`` to create it (or extend it), omit it to reopen."""

    def __init__(self, directory: str | Path, spec: ComparisonSpec | None = None, *,
                 templates: Mapping[str, Template] | None = None) -> None:
        self.directory = Path(directory)
        self.records: dict[str, CellRecord] = {}
        stored = self._load()
        if spec is None and stored is None:
            raise FileNotFoundError(f"no comparison in {self.directory} (no {_MANIFEST}); pass a ComparisonSpec")
        self.spec: ComparisonSpec = spec or stored  # type: ignore[assignment]
        self.templates = templates if templates is not None else load_templates()
        problems = template_problems(PipelineSpec(steps=[self.spec.as_step()]), self.templates)
        if problems:
            raise PipelineSpecError([p.replace("steps[0] 'cells': ", "") for p in problems],
                                    source=f"comparison {self.spec.name!r}")
        self._lock = asyncio.Lock()
        self._writing: asyncio.Future[None] | None = None

    @property
    def manifest_path(self) -> Path:
        return self.directory / _MANIFEST

    @property
    def journal_path(self) -> Path:
        """The cells recorded since the manifest was last written (there only while a run goes on,
        or after one died)."""
        return self.directory / _JOURNAL

    @property
    def cells(self) -> list[CellRecord]:
        """A record per cell of the grid, in order (``missing`` for those not run yet)."""
        return [self.records.get(cell.id) or CellRecord.missing(cell) for cell in self.spec.cells()]

    def pending(self) -> list[Cell]:
        """The cells a run would run: missing or failed."""
        return [cell for cell in self.spec.cells() if not (r := self.records.get(cell.id)) or not r.ok]

    async def run(self, pool: PoolLike, *, evaluator: Evaluator | None = None, on_event: EventCallback | None = None,
                  progress: bool = True, cache: DiskCache | str | Path | None = None) -> RunStats:
        """Run the missing and failed cells (and score done cells that have no score, given an
        ``evaluator``); returns the statistics of what this call did. Cancel it at any time: what
        finished is in the manifest, and the next call resumes."""
        todo = self.pending()
        unscored = [c for c in self.spec.cells() if evaluator is not None and (r := self.records.get(c.id))
                    and r.ok and r.score is None]
        disk = cache if isinstance(cache, DiskCache) else DiskCache(cache or self.directory / ".cache")
        # The spec (maybe extended) and what a crashed run left in the journal, as one manifest.
        await self._write_manifest()
        ctx = RunContext(pool, self.directory, Emitter(on_event), disk, evaluator, {"comparison": self.spec.name})
        total = len(self.spec.cells())
        bar = tqdm(total=total, initial=total - len(todo), desc=self.spec.name, unit="cell", disable=not progress)
        outcomes: list[JobOutcome] = []
        started = time.monotonic()
        try:
            async with asyncio.TaskGroup() as group:
                for cell in todo:
                    group.create_task(self._run_cell(ctx, cell, outcomes, bar))
                for cell in unscored:
                    group.create_task(self._rescore(ctx, cell))
        finally:
            bar.close()
            await self._write_manifest()  # cancelled or not: the journal is folded in
            await ctx.emitter.drain()
        return RunStats.from_outcomes(outcomes, time.monotonic() - started)

    def _job(self, cell: Cell) -> Job:
        spec, template = self.spec, self.templates[self.spec.template]
        params = {**spec.params, **cell.params}
        axes = ((spec.model_slot, cell.model), (spec.prompt_slot, cell.prompt), (spec.seed_slot, cell.seed))
        params.update({slot: value for slot, value in axes if value is not None})
        b = binding_of(spec.as_step(), template, params)
        return Job("cells", template.bind(params), b.model, b.seed, b.prompt, b.negative, params, cell=cell.id,
                   backends=tuple(spec.backends) if spec.backends is not None else None)

    async def _run_cell(self, ctx: RunContext, cell: Cell, outcomes: list[JobOutcome], bar: Any) -> None:
        spec, job = self.spec, self._job(cell)
        # skip_existing: a cell whose images were saved but not yet recorded when a run was cancelled
        # is picked up from images/ instead of running again.
        policy = JobPolicy(retry=spec.retry, timeout=spec.timeout, cache=spec.cache, skip_existing=True)
        outcome = await run_job(ctx, job, policy, folder="images")
        outcomes.append(outcome)
        timings, cached = outcome.timings, outcome.status is JobStatus.CACHED
        record = replace(
            CellRecord.missing(cell), status="done" if outcome.status.ok and not cached else outcome.status.value,
            job_id=outcome.job_id, backend=outcome.backend, elapsed_s=round(outcome.elapsed, 4),
            queued_s=None if timings is None else round(timings.queued_s, 4),
            execution_s=None if timings is None else round(timings.execution_s, 4),
            outputs=[str(a.path.relative_to(self.directory)) for a in outcome.artifacts],
            lineage={"step": "cells", "template": spec.template, "graph_hash": content_hash(job.graph),
                     "key": job.key, "parents": []},
            attempts=len(outcome.attempts), error=outcome.error, finished_at=time.time(),
        )
        if outcome.status.ok and ctx.evaluator is not None:
            record = await self._scored(ctx, record, outcome.artifacts)
        await self._store(record)
        bar.update(1)

    async def _rescore(self, ctx: RunContext, cell: Cell) -> None:
        """Score a cell done in an earlier run without an evaluator (no GPU work)."""
        record, job = self.records[cell.id], self._job(cell)
        artifacts = [Artifact(f"{record.id}/{i}", "cells", self.directory / path, job.key, i, job.model, job.seed,
                              job.prompt, job.negative) for i, path in enumerate(record.outputs)]
        await self._store(await self._scored(ctx, record, artifacts))

    async def _scored(self, ctx: RunContext, record: CellRecord, artifacts: Sequence[Artifact]) -> CellRecord:
        try:
            scored = await score_images(ctx, artifacts)
        except Exception as exc:  # a user's evaluator may raise anything; the cell keeps its image
            return replace(record, error=f"scoring failed: {type(exc).__name__}: {exc}")
        best = max(scored, key=lambda a: a.score or 0.0)
        return replace(record, score=best.score, parts=dict(best.score_parts), error=None)

    # -- the manifest -------------------------------------------------------------------------------------

    def _load(self) -> ComparisonSpec | None:
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise PipelineSpecError([f"unreadable manifest: {exc}"], source=str(self.manifest_path)) from None
        if data.get("format") != MANIFEST_FORMAT:
            raise PipelineSpecError([f"not a comparison manifest (format {data.get('format')!r})"],
                                    source=str(self.manifest_path))
        self.records = {cid: CellRecord(**entry) for cid, entry in data.get("cells", {}).items()}
        self.records.update((r.id, r) for r in self._journal())
        return ComparisonSpec.model_validate(data["spec"])

    def _journal(self) -> list[CellRecord]:
        """The records of the journal, oldest first (a later one of a cell replaces an earlier one)."""
        try:
            text = self.journal_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        # Every line is written whole with its newline: a last one without it is a write a crash cut.
        lines = text.split("\n")[:-1]
        records = []
        for number, line in enumerate(lines, 1):
            try:
                records.append(CellRecord(**json.loads(line)))
            except (ValueError, TypeError) as exc:
                raise PipelineSpecError([f"line {number} is not a cell record: {exc}"],
                                        source=str(self.journal_path)) from None
        return records

    async def _store(self, record: CellRecord) -> None:
        """Record a cell: in memory, and as one line appended to the journal."""
        line = json.dumps(asdict(record), sort_keys=True, default=str) + "\n"
        async with self._lock:
            self.records[record.id] = record
            await self._settle()
            self._writing = asyncio.ensure_future(asyncio.to_thread(_append, self.journal_path, line))
            await asyncio.shield(self._writing)

    async def _write_manifest(self) -> None:
        """Rewrite the manifest with every record, then drop the journal it now holds."""
        async with self._lock:
            await self._settle()
            text = json.dumps(self.manifest(), indent=2, sort_keys=True, default=str)
            self._writing = asyncio.ensure_future(
                asyncio.to_thread(_fold_journal, self.manifest_path, text, self.journal_path))
            await asyncio.wait([self._writing])  # it lands even if we are cancelled meanwhile
            self._writing.result()

    async def _settle(self) -> None:
        """Wait for the write a cancelled ``_store`` left running: one write at a time, in order."""
        if self._writing is not None and not self._writing.done():
            await asyncio.wait([self._writing])

    def manifest(self) -> dict[str, Any]:
        """The manifest as JSON-ready data: spec and every cell record (grid order first)."""
        ordered = {r.id: asdict(r) for r in self.cells if r.status != "missing"}
        extra = {cid: asdict(r) for cid, r in self.records.items() if cid not in ordered}
        return {"format": MANIFEST_FORMAT, "spec": self.spec.model_dump(mode="json"), "cells": {**ordered, **extra},
                "updated_at": time.time()}

    # -- reading it -------------------------------------------------------------------------------------

    def contact_sheet(self, *, thumb: int = 128) -> Any:
        """A ``PIL.Image``: rows are models, columns prompts × seeds (× grid values), the score (or
        the status) under each image."""
        from comfy_orchestrator.pipelines.contact_sheet import SheetCell, render_sheet

        models = list(dict.fromkeys(c.model for c in self.spec.cells()))
        columns = list({replace(c, model=None).id: replace(c, model=None) for c in self.spec.cells()}.values())
        by_id = {r.id: r for r in self.cells}
        grid = []
        for model in models:
            row = []
            for column in columns:
                record = by_id[replace(column, model=model).id]
                path = self.directory / record.outputs[0] if record.outputs else None
                caption = f"{record.score:.3f}" if record.score is not None else record.status
                row.append(SheetCell(path, caption))
            grid.append(row)
        return render_sheet([m or "(template model)" for m in models], [c.column for c in columns], grid,
                            thumb=thumb, title=self.spec.name)

    def to_pandas(self) -> Any:
        """One row per cell: coordinates, status, job id, backend, timings, score and its parts, outputs."""
        try:
            import pandas as pd
        except ImportError as exc:  # pandas is optional
            raise ImportError("to_pandas() needs pandas: pip install pandas") from exc
        rows = []
        for record in self.cells:
            row = asdict(record)
            row.update({f"param.{k}": v for k, v in row.pop("params").items()})
            row.update({f"part.{k}": v for k, v in row.pop("parts").items()})
            row["output"] = record.outputs[0] if record.outputs else None
            rows.append(row)
        return pd.DataFrame(rows)


def _fold_journal(path: Path, text: str, journal: Path) -> None:
    # In this order: a crash between the two leaves a journal that repeats the manifest, harmlessly.
    write_atomically(path, text)
    journal.unlink(missing_ok=True)


def _append(path: Path, line: str) -> None:
    """``line`` at the end of ``path`` (O_APPEND; ``_store`` appends one line at a time)."""
    data = line.encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        while data:
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)
