"""``comfy-orch demo``: a quality-gated model comparison with a report, on a local CPU ComfyUI by default."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from comfy_orchestrator.cli import main
from comfy_orchestrator.cli.run_command import parse_assignment
from comfy_orchestrator.demo import REAL_BACKENDS_HELP, TINY_WARNING, Demo, DemoError, DemoResult, DemoSettings
from comfy_orchestrator.demo.report import cell_at, column_label, grid_columns, is_winner
from comfy_orchestrator.errors import BackendUnavailable, ComfyOrchestratorError
from comfy_orchestrator.local import LocalComfyUIError
from comfy_orchestrator.pipelines import EventKind, PipelineEvent, PipelineSpecError

EXIT_SETUP, EXIT_BACKEND, EXIT_FAILED = 2, 3, 4
# A job ends in done, failed or skipped (the demo uses no disk cache; a ``cached`` event from the pool
# only says that ComfyUI reused some nodes, and a ``done`` follows it).
_JOB_ENDS = (EventKind.DONE, EventKind.FAILED, EventKind.SKIPPED)


class _ProgressView:
    """One bar per quality-gated model × seed (attempts over its budget) and one for the upscale."""

    def __init__(self, progress: Progress, demo: Demo) -> None:
        self.progress = progress
        s = demo.settings
        self.tasks: dict[str, TaskID] = {}
        for cell in demo.cells:
            label = f"{Path(cell.model).stem} · seed {cell.seed}"
            self.tasks[cell.step] = progress.add_task(label, total=len(s.prompts) * s.max_attempts)
        self.tasks["upscale"] = progress.add_task("upscale winners", total=len(s.prompts))
        self.labels = {step: str(progress.tasks[i].description) for step, i in self.tasks.items()}

    def __call__(self, event: PipelineEvent) -> None:
        task = self.tasks.get(event.step or "")
        if task is None:
            return
        label = self.labels[event.step or ""]
        if event.kind in _JOB_ENDS:
            self.progress.advance(task)
        elif event.kind is EventKind.ESCALATED and event.reason:
            self.progress.update(task, description=f"{label} [dim]({event.reason})")
        elif event.kind is EventKind.STEP_FINISHED:
            total = self.progress.tasks[task].completed  # the gate stopped early: the budget is not spent
            self.progress.update(task, total=max(total, 1), completed=total, description=f"{label} [green]done")


def _grid(result: DemoResult) -> Table:
    manifest = result.manifest
    table = Table(title=f"{manifest['clip']['model']} score (threshold {manifest['threshold']:g})",
                  title_justify="left")
    table.add_column("model")
    columns = grid_columns(manifest)
    for prompt, seed in columns:
        table.add_column(column_label(prompt, seed, manifest["seeds"]), justify="right")
    for model in manifest["models"]:
        row = []
        for prompt, seed in columns:
            cell = cell_at(manifest, model, prompt, seed)
            if cell is None or cell["score"] is None:
                row.append("[red]failed")
                continue
            style = "green" if cell["passed"] else "yellow"
            mark = " ★" if is_winner(manifest, cell) else ""
            row.append(f"[{style}]{cell['score']:.3f}[/] ({len(cell['attempts'])}){mark}")
        table.add_row(Path(model).stem, *row)
    return table


async def _run(demo: Demo, console: Console) -> DemoResult:
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        status = progress.add_task("starting", total=None)

        def stage(message: str) -> None:
            progress.update(status, description=message)

        view: _ProgressView | None = None

        def on_event(event: PipelineEvent) -> None:
            nonlocal view
            if view is None:
                view = _ProgressView(progress, demo)
            view(event)

        result = await demo.run(on_event=on_event, on_stage=stage)
        progress.update(status, description="done", total=1, completed=1)
        return result


@main.command("demo")
@click.option("--out", "-o", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-out"),
              show_default=True, help="Where the report, contact sheet, manifest and images go.")
@click.option("--backend", "-b", "backends", multiple=True, metavar="URL",
              help="A ComfyUI server (repeatable). Default: start a local CPU one with tiny models.")
@click.option("--comfyui-dir", type=click.Path(file_okay=False, path_type=Path),
              help="ComfyUI tree for the local server (default: found automatically).")
@click.option("--template", help="Text-to-image template (default: the tiny one locally, sd15_txt2img remotely).")
@click.option("--model", "models", multiple=True, metavar="FILE",
              help="A model to compare (repeatable); required with --backend.")
@click.option("--model-slot", help="The template slot the model binds to (default: checkpoint, else unet).")
@click.option("--prompt", "prompts", multiple=True, help="A prompt (repeatable; default: two shape captions).")
@click.option("--seeds", type=click.IntRange(1, 16), default=1, show_default=True,
              help="Base seeds per model × prompt (grid columns).")
@click.option("--threshold", type=float,
              help="Quality gate on the CLIP score; a threshold belongs to its CLIP model (tiny-shapes: 1.5).")
@click.option("--max-attempts", type=click.IntRange(1, 20), default=3, show_default=True,
              help="Attempts per cell: the first, then a new seed, more steps, …")
@click.option("--steps", type=click.IntRange(1), help="Sampling steps of a first attempt.")
@click.option("--set", "assignments", multiple=True, metavar="NAME=VALUE",
              help="Another template slot for every image (width=768, negative='…'). Repeatable.")
@click.option("--upscale-template", help="Template for the winners (default: cpu_tiny_upscale / model_upscale).")
@click.option("--upscaler", help="Upscale model file (default: the tiny ×2 locally, the template's remotely).")
@click.option("--clip", default="tiny-shapes", show_default=True, help="Quality registry model that scores.")
@click.option("--clip-weights", type=click.Path(exists=True, path_type=Path),
              help="Local weights for --clip (a file or an open_clip folder), instead of the registry's.")
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Seconds per job.")
def demo_command(out_dir: Path, backends: tuple[str, ...], comfyui_dir: Path | None, template: str | None,
                 models: tuple[str, ...], model_slot: str | None, prompts: tuple[str, ...], seeds: int,
                 threshold: float | None, max_attempts: int, steps: int | None, assignments: tuple[str, ...],
                 upscale_template: str | None, upscaler: str | None, clip: str, clip_weights: Path | None,
                 timeout: float) -> None:
    """Compare models on real ComfyUI: quality-gated cells scored by CLIP, the winners upscaled, a report."""
    console = Console(stderr=True)
    fields: dict[str, Any] = {
        "out_dir": out_dir, "backends": list(backends), "comfyui_dir": comfyui_dir, "template": template,
        "models": list(models), "model_slot": model_slot, "seeds": seeds, "threshold": threshold,
        "max_attempts": max_attempts, "steps": steps, "params": dict(parse_assignment(a) for a in assignments),
        "upscale_template": upscale_template, "upscaler": upscaler, "clip": clip, "clip_weights": clip_weights,
        "timeout": timeout,
    }
    if prompts:
        fields["prompts"] = list(prompts)
    try:
        settings = DemoSettings(**fields)
    except ValidationError as exc:
        raise click.UsageError("; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())) from None
    try:
        demo = Demo(settings)
        if settings.local:
            console.print(f"[yellow]Note:[/] {TINY_WARNING}", highlight=False)
        result = asyncio.run(_run(demo, console))
    except (DemoError, PipelineSpecError) as exc:
        _fail(console, str(exc), EXIT_SETUP)
    except LocalComfyUIError as exc:
        _fail(console, f"local ComfyUI: {exc}", EXIT_BACKEND)
    except BackendUnavailable as exc:
        _fail(console, f"backend unavailable: {exc}", EXIT_BACKEND)
    except ComfyOrchestratorError as exc:  # a local ComfyUI that did not start, a rejected graph…
        _fail(console, f"{type(exc).__name__}: {exc}", EXIT_FAILED)
    console.print(_grid(result))
    if settings.local:
        console.print("\n[yellow]The pictures are noise (tiny random-weight models).[/]", highlight=False)
        click.echo(f"{REAL_BACKENDS_HELP}\n", err=True)  # as written: commands must not be re-wrapped
    click.echo(f"report:        {result.report}")
    click.echo(f"contact sheet: {result.contact_sheet}")
    click.echo(f"manifest:      {result.manifest_path}")
    for path in result.winners:
        click.echo(f"upscaled:      {path}")
    failed = result.manifest["stats"]["failed"]
    if failed:
        console.print(f"[yellow]{failed} job(s) failed: see the attempt history in the report.")
    if not result.winners:
        _fail(console, "no winner was upscaled: every cell or the upscale failed (see the report)", EXIT_FAILED)


def _fail(console: Console, message: str, code: int) -> None:
    console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    sys.exit(code)
