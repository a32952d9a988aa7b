"""``comfy-orch submit | status | watch | cancel``: jobs on a running service (``comfy-orch serve``).

The service's address and token come from ``--url`` / ``--token`` or ``COMFY_ORCH_URL`` /
``COMFY_ORCH_TOKEN``. Progress goes to stderr (a live bar per job, from the event socket); what a
script wants (job ids, states, saved paths) goes to stdout. Every failure is one line on stderr
and an exit code:

    2 rejected (bad graph, template or parameters)   3 service unreachable, busy or failing
    4 the job failed      5 timed out      6 the job was cancelled
    7 the token was refused      8 no such job or output      9 conflict (job already ended,
    idempotency key reused with another body)
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from comfy_orchestrator.cli import main
from comfy_orchestrator.cli.run_command import (
    EXIT_BACKEND,
    EXIT_CANCELLED,
    EXIT_EXECUTION,
    EXIT_GRAPH,
    EXIT_TIMEOUT,
    bind_graph,
    parse_assignment,
)
from comfy_orchestrator.errors import ComfyOrchestratorError, GraphError
from comfy_orchestrator.pipelines import PipelineSpec
from comfy_orchestrator.remote import (
    Conflict,
    JobInfo,
    NotFound,
    Rejected,
    RetryLater,
    ServiceClient,
    ServiceError,
    ServiceEvent,
    ServiceTimeout,
    ServiceUnreachable,
    Unauthorized,
)
from comfy_orchestrator.store import JobState

__all__ = ["cancel", "status", "submit", "watch"]

EXIT_AUTH, EXIT_NOT_FOUND, EXIT_CONFLICT = 7, 8, 9
_EXIT_OF_STATE = {JobState.FAILED: EXIT_EXECUTION, JobState.CANCELLED: EXIT_CANCELLED}

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


def _service_options(f: F) -> F:
    f = click.option("--token", envvar="COMFY_ORCH_TOKEN", metavar="TOKEN",
                     help="Bearer token (default: $COMFY_ORCH_TOKEN).")(f)
    f = click.option("--url", envvar="COMFY_ORCH_URL", metavar="URL",
                     help="The service, e.g. http://127.0.0.1:8080 (default: $COMFY_ORCH_URL).")(f)
    return f


def _fail(console: Console, message: str, code: int) -> NoReturn:
    console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True, markup=True)
    sys.exit(code)


def _call(console: Console, url: str | None, token: str | None,
          action: Callable[[ServiceClient], Awaitable[T]]) -> T:
    """Run ``action`` with a client of the service; every error becomes one line and an exit code."""
    if not url:
        _fail(console, "no service address: give --url or set COMFY_ORCH_URL", EXIT_GRAPH)
    if not token:
        _fail(console, "no token: give --token or set COMFY_ORCH_TOKEN", EXIT_GRAPH)

    async def go() -> T:
        async with ServiceClient(url, token) as client:
            return await action(client)

    try:
        return asyncio.run(go())
    except Unauthorized:
        _fail(console, f"the service at {url} refused the token (401)", EXIT_AUTH)
    except NotFound as exc:
        _fail(console, exc.message, EXIT_NOT_FOUND)
    except Conflict as exc:
        _fail(console, exc.message, EXIT_CONFLICT)
    except Rejected as exc:
        _fail(console, f"rejected ({exc.type}): {exc.message}", EXIT_GRAPH)
    except RetryLater as exc:
        after = f"; retry after {exc.retry_after:g} s" if exc.retry_after is not None else ""
        _fail(console, f"the service is busy ({exc.type}): {exc.message}{after}", EXIT_BACKEND)
    except ServiceError as exc:
        _fail(console, f"the service answered {exc.status} ({exc.type}): {exc.message}", EXIT_BACKEND)
    except ServiceTimeout as exc:
        _fail(console, f"timed out: {exc}", EXIT_TIMEOUT)
    except ServiceUnreachable as exc:
        _fail(console, f"service unreachable: {exc} — is `comfy-orch serve` running at {url}?", EXIT_BACKEND)
    except GraphError as exc:
        _fail(console, f"graph error: {exc}", EXIT_GRAPH)
    except ComfyOrchestratorError as exc:
        _fail(console, f"error: {exc}", EXIT_BACKEND)
    except KeyboardInterrupt:
        _fail(console, "interrupted (the jobs go on; `comfy-orch cancel JOB` stops one)", 130)


class _JobsView:
    """A live progress bar per job, fed from its events; knows when every job has ended."""

    def __init__(self, progress: Progress, jobs: Iterable[JobInfo]) -> None:
        self.progress = progress
        self.tasks: dict[str, TaskID] = {}
        self.states: dict[str, JobState] = {}
        for job in jobs:
            self.tasks[job.id] = progress.add_task(self._label(job.id, job.state.value), total=1.0)
            self.states[job.id] = job.state

    @staticmethod
    def _label(job_id: str, what: str) -> str:
        return f"{job_id[:12]} {what}"

    def ended(self) -> bool:
        return all(state.final for state in self.states.values())

    def __call__(self, event: ServiceEvent) -> None:
        task = self.tasks.get(event.job_id)
        if task is None:
            return
        kind = event.type.removeprefix("job.")
        if event.final:
            self.states[event.job_id] = JobState(kind)
            self.progress.update(task, completed=1.0, description=self._label(event.job_id, kind))
        elif kind == "progress":
            node = event.data.get("node")
            self.progress.update(task, completed=event.fraction or 0.0,
                                 description=self._label(event.job_id, f"node {node}" if node else "running"))
        elif kind == "attempt":
            backend = event.data.get("backend", "?")
            self.progress.update(task, completed=0.0, description=self._label(event.job_id, f"on {backend}"))
        elif kind in ("queued", "running", "retried", "cached"):
            self.progress.update(task, description=self._label(event.job_id, kind))


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("[bold]{task.description:<36}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                    TimeElapsedColumn(), console=console, transient=True)


async def _watch(client: ServiceClient, jobs: list[JobInfo], console: Console) -> list[JobInfo]:
    """Follow ``jobs`` until each has ended; the jobs as they ended."""
    with _progress(console) as progress:
        view = _JobsView(progress, jobs)
        if not view.ended():
            stream = client.events(after=0, jobs=[job.id for job in jobs])
            try:
                async for event in stream:
                    view(event)
                    if view.ended():
                        break
            finally:
                await stream.aclose()
    return [await client.job(job.id) for job in jobs]


def _output_path(out: Path, job_id: str, name: str) -> Path:
    node, _, filename = name.rpartition("/")
    return out / f"{job_id[:8]}_{node}_{filename}" if node else out / f"{job_id[:8]}_{filename}"


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise click.BadParameter(f"{text!r}: expected KEY=VALUE, e.g. run=nightly")
    return key.strip(), value


def _request(target: str, assignments: list[tuple[str, Any]]) -> dict[str, Any]:
    """A pipeline spec (``.yaml``/``.yml``, or JSON with ``steps``) is sent as it is; a graph or
    template file is bound here (slots, or ``Title.input``); any other name is a template the service
    knows, with the assignments as its parameters."""
    path = Path(target)
    if not path.is_file():
        if target.endswith((".json", ".yaml", ".yml")):
            raise GraphError(f"{target}: no such file")
        return {"template": target, "params": dict(assignments)}
    if path.suffix.lower() in (".yaml", ".yml"):
        return _pipeline(target, PipelineSpec.load(path), assignments)
    try:
        raw = json.loads(path.read_text())
    except ValueError as exc:
        raise GraphError(f"{path} is not JSON: {exc}") from None
    if isinstance(raw, dict) and isinstance(raw.get("steps"), list):  # a pipeline spec in JSON
        return _pipeline(target, PipelineSpec.from_dict(raw, source=str(path)), assignments)
    graph, _name = bind_graph(raw, assignments)
    return {"graph": graph.to_dict()}


def _pipeline(target: str, spec: PipelineSpec, assignments: list[tuple[str, Any]]) -> dict[str, Any]:
    if assignments:
        raise GraphError(f"{target} is a pipeline spec: --set applies to graphs and templates")
    return {"pipeline": spec.model_dump(mode="json", exclude_defaults=True)}


@main.command()
@click.argument("target", metavar="GRAPH_OR_TEMPLATE")
@click.option("--set", "assignments", multiple=True, metavar="NAME=VALUE",
              help="A template slot (seed=3, prompt='…') or 'Node Title.input=value'. Repeatable.")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="A label for the job. Repeatable.")
@click.option("--key", "idempotency_key", metavar="KEY", help="Idempotency key: the same key and body give one job.")
@click.option("--wait", "wait_for", is_flag=True, help="Follow the job with a live progress bar until it ends.")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Save the outputs here (implies --wait).")
@_service_options
def submit(target: str, assignments: tuple[str, ...], labels: tuple[str, ...], idempotency_key: str | None,
           wait_for: bool, out: Path | None, url: str | None, token: str | None) -> None:
    """Submit a job: a graph or template FILE (bound here), a pipeline spec FILE (.yaml, or .json with
    steps), or the NAME of a service-side template.

    Prints the job id; with --wait (or --out) follows the job, then exits 0 if it succeeded."""
    console = Console(stderr=True)
    parsed = [parse_assignment(a) for a in assignments]
    label_map = dict(_label(text) for text in labels)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)

    async def action(client: ServiceClient) -> tuple[JobInfo, list[Path]]:
        body = _request(target, parsed)
        job = await client.submit(body.get("graph"), template=body.get("template"), params=body.get("params"),
                                  pipeline=body.get("pipeline"), labels=label_map, idempotency_key=idempotency_key)
        click.echo(job.id)
        if not (wait_for or out is not None):
            return job, []
        [job] = await _watch(client, [job], console)
        written = []
        if out is not None and job.state is JobState.SUCCEEDED:
            for name in job.outputs:
                written.append(await client.save(job.id, name, _output_path(out, job.id, name)))
        return job, written

    job, written = _call(console, url, token, action)
    for path in written:
        click.echo(str(path))
    if wait_for or out is not None:
        _report_end(console, job)


def _report_end(console: Console, job: JobInfo) -> None:
    if job.state is JobState.SUCCEEDED:
        console.print(f"job {job.id} succeeded ({len(job.outputs)} outputs)", highlight=False)
        return
    reason = (job.error or {}).get("message") if job.error else None
    _fail(console, f"job {job.id} {job.state.value}" + (f": {reason}" if reason else ""),
          _EXIT_OF_STATE.get(job.state, EXIT_EXECUTION))


@main.command()
@click.argument("job_id", metavar="JOB")
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON.")
@_service_options
def status(job_id: str, as_json: bool, url: str | None, token: str | None) -> None:
    """Show a job: its state, labels, attempts, outputs and error."""
    console = Console(stderr=True)
    job = _call(console, url, token, lambda client: client.job(job_id))
    if as_json:
        click.echo(json.dumps({
            "id": job.id, "kind": job.kind.value, "state": job.state.value, "labels": dict(job.labels),
            "created": job.created.isoformat(), "updated": job.updated.isoformat(), "attempts": job.attempts,
            "outputs": list(job.outputs), "result": job.result, "error": job.error}, indent=2))
        return
    click.echo(f"{job.id}  {job.state.value}")
    click.echo(f"  kind      {job.kind.value}   attempts {job.attempts}")
    click.echo(f"  created   {job.created.isoformat()}   updated {job.updated.isoformat()}")
    if job.labels:
        click.echo("  labels    " + ", ".join(f"{k}={v}" for k, v in sorted(job.labels.items())))
    for name in job.outputs:
        click.echo(f"  output    {name}")
    if job.error:
        click.echo(f"  error     {job.error.get('type', '')}: {job.error.get('message', '')}")


@main.command()
@click.argument("job_ids", metavar="[JOB]...", nargs=-1)
@_service_options
def watch(job_ids: tuple[str, ...], url: str | None, token: str | None) -> None:
    """Follow jobs (default: every queued or running one) with a live progress bar each, until they end.

    Prints each job's final state; exits 4 if one failed, 6 if one was cancelled."""
    console = Console(stderr=True)

    async def action(client: ServiceClient) -> list[JobInfo]:
        if job_ids:
            jobs = [await client.job(job_id) for job_id in job_ids]
        else:
            jobs = [job async for job in client.jobs(state=[JobState.QUEUED, JobState.RUNNING])]
        return await _watch(client, jobs, console) if jobs else []

    ended = _call(console, url, token, action)
    if not ended:
        console.print("no queued or running jobs", highlight=False)
    for job in ended:
        click.echo(f"{job.id}  {job.state.value}")
    codes = {_EXIT_OF_STATE.get(job.state, EXIT_EXECUTION) for job in ended if job.state is not JobState.SUCCEEDED}
    if codes:
        sys.exit(min(codes))


@main.command()
@click.argument("job_id", metavar="JOB")
@_service_options
def cancel(job_id: str, url: str | None, token: str | None) -> None:
    """Cancel a job (its prompt is interrupted on its backend if it runs)."""
    console = Console(stderr=True)
    job = _call(console, url, token, lambda client: client.cancel(job_id))
    click.echo(f"{job.id}  {job.state.value}")


@main.command()
@click.argument("job_id", metavar="JOB")
@_service_options
def delete(job_id: str, url: str | None, token: str | None) -> None:
    """Delete an ended job with its events and output files (a running one: cancel it first)."""
    console = Console(stderr=True)
    _call(console, url, token, lambda client: client.delete(job_id))
    click.echo(f"{job_id}  deleted")
