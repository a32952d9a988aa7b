"""``/v1/jobs``: submit, read, list, cancel and delete a tenant's jobs."""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web

from comfy_orchestrator.errors import GraphValidationError
from comfy_orchestrator.graph import Graph
from comfy_orchestrator.pool import NoCapableBackend
from comfy_orchestrator.service.backends import NoBackendReachable
from comfy_orchestrator.service.errors import ApiError
from comfy_orchestrator.service.inputs import INPUTS, check_image_names, check_inputs
from comfy_orchestrator.service.intake import JobRequest, build_graph, check_limits
from comfy_orchestrator.service.keys import (
    CLIENTS,
    LIFECYCLE,
    NOTIFIER,
    PEERS,
    PIPELINES,
    POOL,
    SETTINGS,
    STORE,
    TEMPLATES,
    TENANT,
)
from comfy_orchestrator.service.pipeline_jobs import check_pipeline
from comfy_orchestrator.store import (
    IdempotencyConflict,
    JobKind,
    JobNotEnded,
    JobNotFound,
    JobRecord,
    JobState,
    QueueFull,
)

__all__ = ["job_json", "routes"]

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

_RETRY_AFTER_S = "5"


def job_json(job: JobRecord, outputs: list[str] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": job.id,
        "kind": job.kind.value,
        "state": job.state.value,
        "labels": dict(job.labels),
        "created": job.created.isoformat(),
        "updated": job.updated.isoformat(),
        "attempts": job.attempts,
        "result": job.result,
        "error": job.error,
    }
    if outputs is not None:
        body["outputs"] = outputs
    return body


async def _read_body(request: web.Request) -> Any:
    limit = request.app[SETTINGS].limits.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, "BodyTooLarge", f"the body is {request.content_length} bytes; at most {limit} are allowed")
    raw = await request.read()  # bounded by the app's client_max_size: 413 past it, whatever the headers say
    try:
        return json.loads(raw)
    except RecursionError:
        raise ApiError(400, "InvalidJSON", "the body nests too deeply") from None


@routes.post("/v1/jobs")
async def submit(request: web.Request) -> web.Response:
    app, tenant = request.app, request[TENANT]
    settings = app[SETTINGS]
    job_request = JobRequest.model_validate(await _read_body(request))
    key = request.headers.get("Idempotency-Key")
    if key is not None and not 1 <= len(key) <= 200:
        raise ApiError(400, "InvalidIdempotencyKey", "Idempotency-Key must be 1 to 200 characters")
    templates = app[TEMPLATES]
    spec = job_request.spec()  # what is kept and compared for idempotency
    if job_request.kind is JobKind.PIPELINE:
        check_pipeline(spec, templates, has_evaluator=app[PIPELINES].evaluators.configured)
        nodes = 0
    else:
        graph = build_graph(job_request.kind, spec, templates)
        check_limits(graph, settings.limits)
        check_image_names(graph)
        await check_inputs(app[INPUTS], tenant, job_request.inputs)
        await _check_runnable(app, graph, input_files=list(job_request.inputs))
        nodes = len(graph)
    notifier = app[NOTIFIER]
    worker = notifier.reserve()  # an idle worker here takes the job in the transaction that creates it
    created = False
    try:
        job, created = await app[STORE].create_job(
            tenant, job_request.kind, spec, idempotency_key=key, labels=job_request.labels,
            max_active=settings.limits.max_queued_per_tenant, claim=None if worker is None else worker.claim,
        )
    except IdempotencyConflict as exc:
        raise ApiError(422, "IdempotencyConflict", str(exc), extra={"job_id": exc.job_id}) from None
    except QueueFull as exc:
        raise ApiError(429, "QueueFull", str(exc), headers={"Retry-After": _RETRY_AFTER_S}) from None
    finally:
        if worker is not None:
            if created:
                worker.deliver(job)
            else:  # not created (an error, or the key's existing job): the worker claims as usual
                worker.decline()
    if created:
        if worker is not None:
            notifier.notify()  # its queued and running events
        else:
            notifier.job_queued()  # wakes one idle worker (here or in a sibling) and the event readers
        log.info("tenant %s: job %s queued (%s, %d nodes)", tenant, job.id, job.kind.value, nodes)
    return web.json_response({"id": job.id, "state": job.state.value}, status=202 if created else 200)


async def _check_runnable(app: web.Application, graph: Graph, *, input_files: list[str] | None = None) -> None:
    """Some backend has what ``graph`` needs, and ComfyUI's validation passes against its /object_info."""
    try:
        await app[CLIENTS].check(graph, app[POOL].backends(), input_files=input_files or ())
    except GraphValidationError as exc:
        raise ApiError(400, "GraphValidationError", exc.summary(),
                       extra={"comfy_error": exc.error, "node_errors": exc.node_errors}) from None
    except NoCapableBackend as exc:
        raise ApiError(400, "NoCapableBackend", str(exc), extra={"missing": exc.missing}) from None
    except NoBackendReachable as exc:
        raise ApiError(503, "NoBackendReachable", str(exc), headers={"Retry-After": _RETRY_AFTER_S}) from None


async def _job_or_404(request: web.Request) -> JobRecord:
    job = await request.app[STORE].get_job(request[TENANT], request.match_info["job_id"])
    if job is None:
        raise ApiError(404, "JobNotFound", f"no job {request.match_info['job_id']!r}")
    return job


@routes.get("/v1/jobs/{job_id}")
async def get_job(request: web.Request) -> web.Response:
    job = await _job_or_404(request)
    outputs = await request.app[STORE].list_outputs(request[TENANT], job.id)
    return web.json_response(job_json(job, [o.name for o in outputs]))


def _states(request: web.Request) -> list[JobState] | None:
    values = [v for raw in request.query.getall("state", []) for v in raw.split(",") if v]
    try:
        return [JobState(v) for v in values] or None
    except ValueError:
        raise ApiError(400, "InvalidRequest", f"state must be among {', '.join(s.value for s in JobState)}") from None


def _labels(request: web.Request) -> dict[str, str] | None:
    labels = {}
    for raw in request.query.getall("label", []):
        key, sep, value = raw.partition(":")
        if not sep or not key:
            raise ApiError(400, "InvalidRequest", f"label filter {raw!r} must be key:value")
        labels[key] = value
    return labels or None


@routes.get("/v1/jobs")
async def list_jobs(request: web.Request) -> web.Response:
    raw_limit = request.query.get("limit", "50")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 1000:
        raise ApiError(400, "InvalidRequest", "limit must be an integer from 1 to 1000")
    page = await request.app[STORE].list_jobs(  # InvalidCursor is a ValueError: 400
        request[TENANT], states=_states(request), labels=_labels(request), limit=int(raw_limit),
        cursor=request.query.get("cursor") or None,
    )
    return web.json_response({"items": [job_json(job) for job in page.items], "next_cursor": page.next_cursor})


async def interrupt(app: web.Application, job_id: str, kind: JobKind) -> bool:
    """Take the prompt(s) of ``job_id`` off their backend, if this process runs them; whether it did."""
    pool = app[POOL]
    if job_id in pool.jobs():
        await pool.cancel(job_id)  # interrupts that prompt only, on its backend
        return True
    if (adopted := app[LIFECYCLE].adopted.get(job_id)) is not None:
        adopted.cancel()  # a prompt a previous process left running: taken off its backend
        return True
    if kind is JobKind.PIPELINE:
        return await pool.cancel_all({"job": job_id}) > 0  # a pipeline's prompts carry its job id
    return False


@routes.post("/v1/jobs/{job_id}/cancel")
async def cancel(request: web.Request) -> web.Response:
    app, tenant = request.app, request[TENANT]
    job = await _job_or_404(request)
    try:
        changed = await app[STORE].cancel_job(tenant, job.id)
    except JobNotFound:  # deleted meanwhile
        raise ApiError(404, "JobNotFound", f"no job {job.id!r}") from None
    if not changed:
        raise ApiError(409, "JobEnded", f"job {job.id} already ended ({job.state.value})")
    app[NOTIFIER].notify()
    if not await interrupt(app, job.id, job.kind) and (peers := app.get(PEERS)) is not None:
        peers.send_now("c", f"{job.id} {job.kind.value}")  # not running here: the sibling that runs it interrupts it
    log.info("tenant %s: job %s cancelled", tenant, job.id)
    cancelled = await _job_or_404(request)
    return web.json_response(job_json(cancelled))


@routes.delete("/v1/jobs/{job_id}")
async def delete(request: web.Request) -> web.Response:
    """An ended job goes with its attempts, events and outputs (204); a queued or running one is
    refused (409: cancel it first)."""
    tenant, job_id = request[TENANT], request.match_info["job_id"]
    try:
        await request.app[STORE].delete_job(tenant, job_id)
    except JobNotFound:
        raise ApiError(404, "JobNotFound", f"no job {job_id!r}") from None
    except JobNotEnded as exc:
        raise ApiError(409, "JobNotEnded", str(exc)) from None
    return web.Response(status=204)
