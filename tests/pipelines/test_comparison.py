"""Comparison runs: the manifest, resumption after a cancelled run, failed cells, the contact sheet,
pandas, the progress bar and events."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from PIL import Image

from comfy_orchestrator.graph import Template
from comfy_orchestrator.pipelines import (
    ComparisonRun,
    ComparisonSpec,
    DiskCache,
    EventKind,
    PipelineEvent,
    PipelineSpecError,
    comparison,
)
from comfy_orchestrator.testing import sampler_succeeds
from tests.pipelines.conftest import DREAM, SD15, SMALL, Cluster, StartCluster, broken_node
from tests.pipelines.judge import ShapeJudge

PROMPTS = ["a red circle", "a blue square"]


def grid(**changes: object) -> ComparisonSpec:
    fields: dict[str, object] = {"name": "shapes", "template": "sd15_txt2img", "models": [SD15, DREAM],
                                 "prompts": PROMPTS, "seeds": [1, 2, 3], "params": {**SMALL, "steps": 10}}
    fields.update(changes)
    return ComparisonSpec.model_validate(fields)


async def test_every_cell_is_recorded_in_the_manifest(
    cluster: Cluster, templates: dict[str, Template], tmp_path: Path, judge: ShapeJudge
) -> None:
    run = ComparisonRun(tmp_path / "cmp", grid(), templates=templates)
    stats = await run.run(cluster.pool, evaluator=judge, progress=False)
    assert stats.completed == 12
    assert cluster.prompts_run() == 12

    manifest = json.loads(run.manifest_path.read_text())
    assert manifest["spec"]["models"] == [SD15, DREAM]
    assert len(manifest["cells"]) == 12
    for record in run.cells:
        assert record.status == "done"
        assert record.job_id
        assert record.attempts == 1
        assert record.backend == ("a" if record.model == SD15 else "b")
        assert record.elapsed_s
        assert record.execution_s is not None
        assert record.queued_s is not None
        assert (run.directory / record.outputs[0]).is_file()
        assert record.lineage["step"] == "cells"
        assert record.lineage["template"] == "sd15_txt2img"
        assert len(record.lineage["graph_hash"]) == 64
        assert record.lineage["parents"] == []
        wanted = 1.0 if sampler_succeeds(record.seed or 0, record.model or "", 10) else 0.0
        assert record.score == wanted
        assert record.parts == {"colour": wanted, "shape": wanted}


async def test_a_cancelled_run_resumes_with_only_the_missing_cells(
    start_cluster: StartCluster, templates: dict[str, Template], tmp_path: Path
) -> None:
    cluster = await start_cluster({"a": [SD15], "b": [DREAM]}, step_delay=0.02)
    run = ComparisonRun(tmp_path / "cmp", grid(), templates=templates)
    done = asyncio.Event()
    finished: list[str] = []

    def on_event(event: PipelineEvent) -> None:
        if event.kind is EventKind.DONE and event.cell:
            finished.append(event.cell)
            if len(finished) == 4:
                done.set()

    task = asyncio.create_task(run.run(cluster.pool, on_event=on_event, progress=False))
    await done.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.1)  # let the cancelled prompts leave the servers
    recorded = {r.id for r in run.cells if r.ok}
    assert 3 <= len(recorded) < 12  # the 4th may have been cancelled between its images and its record

    reopened = ComparisonRun(tmp_path / "cmp", templates=templates)  # from the manifest alone
    assert reopened.spec == run.spec
    assert {r.id for r in reopened.cells if r.ok} == recorded
    before = cluster.prompts_run()
    events: list[PipelineEvent] = []
    stats = await reopened.run(cluster.pool, on_event=events.append, progress=False)
    assert stats.completed + stats.skipped == 12 - len(recorded)  # skipped: saved, not yet recorded
    assert stats.completed == cluster.prompts_run() - before
    assert {e.cell for e in events if e.kind is EventKind.DONE}.isdisjoint(recorded)
    assert all(r.ok for r in reopened.cells)


async def test_failed_cells_run_again_and_new_axes_only_add_cells(
    start_cluster: StartCluster, templates: dict[str, Template], tmp_path: Path
) -> None:
    cluster = await start_cluster({"a": [SD15, DREAM]})
    cluster.servers["a"].faults.execution_error = broken_node()
    run = ComparisonRun(tmp_path / "cmp", grid(prompts=PROMPTS[:1]), templates=templates)
    first = await run.run(cluster.pool, progress=False)
    assert (first.completed, first.failed) == (5, 1)
    (failed,) = [r for r in run.cells if r.status == "failed"]
    assert failed.error is not None
    assert "sigma out of range" in failed.error
    assert failed.outputs == []

    again = await run.run(cluster.pool, progress=False)
    assert (again.completed, again.failed) == (1, 0)
    assert cluster.prompts_run() == 7

    wider = ComparisonRun(tmp_path / "cmp", grid(prompts=PROMPTS[:1], seeds=[1, 2, 3, 4]), templates=templates)
    assert len(wider.pending()) == 2
    assert (await wider.run(cluster.pool, progress=False)).completed == 2
    assert cluster.prompts_run() == 9


async def test_a_shared_cache_makes_a_second_comparison_free(
    cluster: Cluster, templates: dict[str, Template], tmp_path: Path
) -> None:
    cache = DiskCache(tmp_path / "cache")
    await ComparisonRun(tmp_path / "one", grid(), templates=templates).run(cluster.pool, cache=cache, progress=False)
    stats = await ComparisonRun(tmp_path / "two", grid(), templates=templates).run(
        cluster.pool, cache=cache, progress=False)
    assert stats.cached == 12
    assert cluster.prompts_run() == 12


async def test_contact_sheet_rows_are_models_and_columns_prompts_and_seeds(
    cluster: Cluster, templates: dict[str, Template], tmp_path: Path, judge: ShapeJudge
) -> None:
    run = ComparisonRun(tmp_path / "cmp", grid(), templates=templates)
    await run.run(cluster.pool, evaluator=judge, progress=False)
    sheet = run.contact_sheet(thumb=64)
    sheet.save(tmp_path / "sheet.png")

    assert sheet.mode == "RGB"
    assert sheet.width > 6 * 64
    assert sheet.height > 2 * 64
    # one thumbnail per cell: find the first cell's image pixel for pixel in the grid
    first = run.cells[0]
    with Image.open(run.directory / first.outputs[0]) as opened:
        image = opened.convert("RGB")
    row_heights = (sheet.height - 1) // 2
    assert any(
        sheet.crop((x, y, x + 64, y + 64)).tobytes() == image.tobytes()
        for x in range(0, sheet.width - 64) for y in range(0, row_heights)
        if sheet.getpixel((x, y)) == image.getpixel((0, 0))
    )
    empty = ComparisonRun(tmp_path / "empty", grid(), templates=templates).contact_sheet(thumb=32)
    assert empty.size[0] < sheet.size[0]  # all grey, still a grid


async def test_to_pandas_has_a_row_per_cell(
    cluster: Cluster, templates: dict[str, Template], tmp_path: Path, judge: ShapeJudge
) -> None:
    run = ComparisonRun(tmp_path / "cmp", grid(grid={"cfg": [4.0, 8.0]}, seeds=[1]), templates=templates)
    await run.run(cluster.pool, evaluator=judge, progress=False)
    frame = run.to_pandas()
    assert len(frame) == 8
    for column in ("id", "model", "prompt", "seed", "param.cfg", "status", "job_id", "backend", "score",
                   "part.colour", "part.shape", "execution_s", "output", "lineage"):
        assert column in frame.columns
    assert frame.groupby("model")["score"].count().to_dict() == {SD15: 4, DREAM: 4}
    assert sorted(frame["param.cfg"].unique()) == [4.0, 8.0]


async def test_progress_bar_and_events(
    cluster: Cluster, templates: dict[str, Template], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = ComparisonRun(tmp_path / "cmp", grid(models=[SD15], prompts=PROMPTS[:1]), templates=templates)
    events: list[PipelineEvent] = []
    await run.run(cluster.pool, on_event=events.append, progress=True)
    err = capsys.readouterr().err
    assert "shapes" in err
    assert "3/3" in err
    assert "cell" in err
    cells = {r.id for r in run.cells}
    assert {e.cell for e in events if e.kind is EventKind.DONE} == cells
    assert {e.backend for e in events if e.kind is EventKind.DISPATCHED} == {"a"}


def test_a_bad_grid_is_refused_before_any_work(templates: dict[str, Template], tmp_path: Path) -> None:
    with pytest.raises(PipelineSpecError, match="has no slot 'sampler_nam'"):
        ComparisonRun(tmp_path / "x", grid(grid={"sampler_nam": ["euler"]}), templates=templates)
    with pytest.raises(FileNotFoundError, match="no comparison in"):
        ComparisonRun(tmp_path / "nothing", templates=templates)


async def test_cells_run_without_an_evaluator_are_scored_later_with_no_gpu_work(
    cluster: Cluster, templates: dict[str, Template], tmp_path: Path, judge: ShapeJudge
) -> None:
    spec = grid(models=[SD15], prompts=[], params={**SMALL, "steps": 10, "prompt": "a red circle"})
    run = ComparisonRun(tmp_path / "cmp", spec, templates=templates)
    await run.run(cluster.pool, progress=False)
    assert all(r.ok and r.score is None for r in run.cells)

    stats = await run.run(cluster.pool, evaluator=judge, progress=False)
    assert stats.total == 0
    assert cluster.prompts_run() == 3
    assert judge.images == 3
    assert [r.score for r in run.cells] == [
        1.0 if sampler_succeeds(seed, SD15, 10) else 0.0 for seed in (1, 2, 3)]


async def test_the_manifest_is_not_rewritten_per_cell(
    cluster: Cluster, templates: dict[str, Template], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rewrites: list[Path] = []
    write = comparison.write_atomically

    def counted(path: Path, text: str) -> None:
        rewrites.append(path)
        write(path, text)

    monkeypatch.setattr(comparison, "write_atomically", counted)
    run = ComparisonRun(tmp_path / "cmp", grid(), templates=templates)
    await run.run(cluster.pool, progress=False)
    # a whole rewrite per finished cell is quadratic in the grid: a run writes it a fixed number of times
    assert len(rewrites) <= 2
    assert len(json.loads(run.manifest_path.read_text())["cells"]) == 12
    assert not run.journal_path.exists()  # folded into the manifest at the end of the run


async def test_a_run_that_dies_before_its_last_manifest_write_loses_no_finished_cell(
    cluster: Cluster, templates: dict[str, Template], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write = comparison.write_atomically
    writes = 0

    class Died(Exception):
        """The process ends here: nothing after it runs."""

    def dies_after_the_first(path: Path, text: str) -> None:
        nonlocal writes
        writes += 1
        if writes > 1:
            raise Died
        write(path, text)

    monkeypatch.setattr(comparison, "write_atomically", dies_after_the_first)
    run = ComparisonRun(tmp_path / "cmp", grid(), templates=templates)
    with pytest.raises(Died):
        await run.run(cluster.pool, progress=False)
    assert all(r.ok for r in run.cells)
    monkeypatch.undo()
    json.loads(run.manifest_path.read_text())  # still whole, valid JSON
    with run.journal_path.open("a", encoding="utf-8") as journal:
        journal.write('{"id": "0123456789abcdef", "mod')  # and a line torn by the crash

    reopened = ComparisonRun(tmp_path / "cmp", templates=templates)
    assert {r.id for r in reopened.cells if r.ok} == {r.id for r in run.cells} == set(reopened.records)
    before = cluster.prompts_run()
    stats = await reopened.run(cluster.pool, progress=False)
    assert (stats.total, cluster.prompts_run()) == (0, before)
    assert len(json.loads(reopened.manifest_path.read_text())["cells"]) == 12
    assert not reopened.journal_path.exists()


def test_a_journal_line_that_is_not_the_torn_last_one_is_reported(
    templates: dict[str, Template], tmp_path: Path
) -> None:
    run = ComparisonRun(tmp_path / "cmp", grid(), templates=templates)
    run.manifest_path.parent.mkdir(parents=True)
    run.manifest_path.write_text(json.dumps(run.manifest()))
    run.journal_path.write_text("not json\n{}\n")
    with pytest.raises(PipelineSpecError, match="line 1"):
        ComparisonRun(tmp_path / "cmp", templates=templates)
