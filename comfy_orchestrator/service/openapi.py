"""``GET /openapi.json``: the service described as an OpenAPI 3.1 document, written by hand.

It is kept next to the routes it describes (``jobs``, ``outputs``, ``events``, ``health``,
``metrics``, ``dashboard``) and checked against the running service by schemathesis in the tests
(``tests/service/test_openapi.py``): every answer is documented, and every JSON body matches its
schema. Every error body is ``{"error": {"type", "message", ...}}``. Routes under ``/v1`` need a
bearer token; ``/healthz``, ``/readyz``, ``/metrics``, the dashboard and this document do not.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from comfy_orchestrator.service.dashboard import ASSETS
from comfy_orchestrator.service.state import Phase
from comfy_orchestrator.store import JobKind, JobState

__all__ = ["openapi_document", "routes"]

routes = web.RouteTableDef()

_JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": schema}}}


_ERRORS = {
    400: "The request is malformed (body, parameters, graph or template); `error.type` says how.",
    401: "No valid bearer token.",
    403: "Refused by policy: URL inputs are disabled, or the URL's host or address is not allowed.",
    404: "No such job or output for this tenant.",
    409: "The job already ended.",
    413: "The body, the graph's node count or its pixel count is over the limit.",
    415: "The Content-Type is not one this route takes.",
    422: "The Idempotency-Key was used before with another body.",
    429: "The tenant's queue is full; retry after `Retry-After` seconds.",
    503: "No backend can be reached now; retry after `Retry-After` seconds.",
}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(code): {"$ref": f"#/components/responses/E{code}"} for code in codes}


def _error_responses() -> dict[str, Any]:
    return {f"E{code}": _json(_ref("Error"), text) for code, text in _ERRORS.items()}


def _schemas() -> dict[str, Any]:
    nullable_object: dict[str, Any] = {"type": ["object", "null"], "additionalProperties": True}
    job_properties: dict[str, Any] = {
        "id": {"type": "string"},
        "kind": {"type": "string", "enum": [k.value for k in JobKind]},
        "state": {"type": "string", "enum": [s.value for s in JobState]},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "created": {"type": "string", "format": "date-time"},
        "updated": {"type": "string", "format": "date-time"},
        "attempts": {"type": "integer", "minimum": 0},
        "result": nullable_object,
        "error": nullable_object,
        "outputs": {"type": "array", "items": {"type": "string"},
                    "description": "Output names, for `GET /v1/jobs/{job_id}/outputs/{name}` (single job only)."},
    }
    return {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {"error": {
                "type": "object",
                "required": ["type", "message"],
                "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
                "additionalProperties": True,
            }},
        },
        "Status": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}},
        "JobRequest": {
            "type": "object",
            "description": "Exactly one of `graph` (an API-format graph), `template` (with `params`) or "
                           "`pipeline` (a pipeline spec: `{name, steps: [...]}`, as `PipelineSpec` reads it).",
            "additionalProperties": False,
            "properties": {
                "graph": {"type": "object", "additionalProperties": {"type": "object"}},
                "template": {"type": "string", "minLength": 1, "maxLength": 200},
                "params": {"type": "object", "additionalProperties": True},
                "pipeline": {"type": "object", "additionalProperties": True},
                "labels": {"type": "object", "maxProperties": 32,
                           "propertyNames": {"pattern": "^[A-Za-z0-9_][A-Za-z0-9_.\\-]{0,63}$"},
                           "additionalProperties": {"type": "string", "maxLength": 256}},
                "inputs": {"type": "object", "maxProperties": 32,
                           "propertyNames": {"pattern": "^[A-Za-z0-9_][A-Za-z0-9_. \\-]{0,127}$"},
                           "description": "File name used by the graph's LoadImage → input id from "
                                          "`POST /v1/inputs` (not with `pipeline`).",
                           "additionalProperties": {"type": "string", "pattern": "^[0-9a-f]{64}$"}},
            },
        },
        "Input": {
            "type": "object",
            "required": ["id", "size", "content_type", "width", "height"],
            "properties": {
                "id": {"type": "string", "pattern": "^[0-9a-f]{64}$", "description": "The content's SHA-256."},
                "size": {"type": "integer", "minimum": 0},
                "content_type": {"type": "string", "enum": ["image/png", "image/jpeg", "image/webp"]},
                "width": {"type": "integer", "minimum": 1},
                "height": {"type": "integer", "minimum": 1},
            },
        },
        "UrlInput": {
            "type": "object", "required": ["url"], "additionalProperties": False,
            "properties": {"url": {"type": "string", "minLength": 1, "maxLength": 2048}},
        },
        "Accepted": {
            "type": "object",
            "required": ["id", "state"],
            "properties": {"id": {"type": "string"}, "state": job_properties["state"]},
        },
        "Job": {"type": "object", "required": [k for k in job_properties if k != "outputs"],
                "properties": job_properties},
        "JobPage": {
            "type": "object",
            "required": ["items", "next_cursor"],
            "properties": {"items": {"type": "array", "items": _ref("Job")},
                           "next_cursor": {"type": ["string", "null"]}},
        },
        "Backend": {
            "type": "object",
            "required": ["name", "healthy", "draining", "breaker", "in_flight", "max_in_flight"],
            "properties": {
                "name": {"type": "string"},
                "healthy": {"type": "boolean"},
                "draining": {"type": "boolean"},
                "breaker": {"type": "string"},
                "in_flight": {"type": "integer", "description": "Prompts on it now, from every service process."},
                "max_in_flight": {"type": "integer", "description": "Its slots, all processes together."},
                "in_flight_here": {"type": "integer", "description": "This process's prompts on it."},
                "max_in_flight_here": {"type": "integer", "description": "This process's share of the slots."},
                "node_classes": {"type": "integer", "minimum": 0, "description": "How many node classes it has."},
                "models": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "string"}}},
                "last_model": {"type": ["string", "null"]},
                "last_error": {"type": ["string", "null"]},
                "success_rate": {"type": ["number", "null"]},
                "managed": {
                    "type": ["object", "null"],
                    "description": "A local ComfyUI the service runs itself ([managed]); null for a configured one.",
                    "properties": {"state": {"enum": ["starting", "running", "backoff", "stopped"]},
                                   "device": {"type": ["string", "null"]}, "pid": {"type": ["integer", "null"]},
                                   "url": {"type": ["string", "null"]}, "restarts": {"type": "integer"},
                                   "last_exit": {"type": ["integer", "null"]}},
                },
            },
        },
        "TemplateList": {
            "type": "object",
            "required": ["items"],
            "properties": {"items": {"type": "array", "items": {
                "type": "object",
                "required": ["name", "description", "slots"],
                "properties": {
                    "name": {"type": "string"},
                    "description": {"type": "string"},
                    "slots": {"type": "object", "additionalProperties": {
                        "type": "object", "required": ["type"],
                        "properties": {"default": {}, "type": {"type": "string"}}}},
                },
            }}},
        },
        "Run": {
            "type": "object",
            "required": ["id", "state", "pipeline", "cells", "steps", "grid"],
            "properties": {
                "id": {"type": "string"}, "state": job_properties["state"], "pipeline": {"type": "string"},
                "cells": {"type": "array", "items": {"type": "object", "properties": {
                    "step": {"type": ["string", "null"]}, "model": {"type": ["string", "null"]},
                    "prompt": {"type": ["string", "null"]}, "seed": {"type": ["integer", "null"]},
                    "score": {"type": ["number", "null"]}, "score_parts": {"type": "object"},
                    "output": {"type": ["string", "null"]}}}},
                "steps": {"type": "array", "items": {"type": "object", "required": ["name", "state"]}},
                "grid": {"type": ["string", "null"], "description": "The grid image's path, once the run succeeded."},
                "stats": nullable_object,
                "error": nullable_object,
            },
        },
        "Event": {
            "type": "object",
            "required": ["seq", "job_id", "type", "data", "at"],
            "properties": {"seq": {"type": "integer"}, "job_id": {"type": "string"}, "type": {"type": "string"},
                           "data": {"type": "object"}, "at": {"type": "string", "format": "date-time"}},
        },
    }


def _job_id() -> dict[str, Any]:
    return {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}


def _run_id() -> dict[str, Any]:
    return {"name": "run_id", "in": "path", "required": True, "schema": {"type": "string"}}


def _paths() -> dict[str, Any]:
    status = _ref("Status")
    public: list[Any] = []
    return {
        "/healthz": {"get": {"operationId": "healthz", "summary": "The process answers.", "security": public,
                             "responses": {"200": _json({
                                 "type": "object", "required": ["status", "pid", "process"],
                                 "properties": {"status": {"type": "string"}, "pid": {"type": "integer"},
                                                "process": {"type": "string", "pattern": r"^\d+/\d+$",
                                                            "description": "Which service process answered "
                                                                           "(index/count)."}}},
                                 "Alive.")}}},
        "/readyz": {"get": {
            "operationId": "readyz", "summary": "Ready for jobs (503 while starting or draining).", "security": public,
            "responses": {"200": _json(status, "Ready."),
                          "503": _json({**status, "properties": {"status": {
                              "type": "string", "enum": [p.value for p in Phase]}}}, "Starting or draining.")}}},
        "/metrics": {"get": {
            "operationId": "metrics", "summary": "Prometheus metrics (no tenant data; no token needed).",
            "security": public,
            "responses": {"200": {"description": "The Prometheus text format.",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/openapi.json": {"get": {"operationId": "openapi", "summary": "This document.", "security": public,
                                  "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1.")}}},
        "/": {"get": {"operationId": "root", "summary": "Redirects to the dashboard.", "security": public,
                      "responses": {"302": {"description": "To `/dashboard`.",
                                            "headers": {"Location": {"schema": {"type": "string"}}}}}}},
        "/dashboard": {"get": {
            "operationId": "dashboard", "security": public,
            "summary": "The dashboard page (no token needed to load it; it asks for one for `/v1`).",
            "responses": {"200": {"description": "The page.",
                                  "content": {"text/html": {"schema": {"type": "string"}}}}}}},
        "/dashboard/{asset}": {"get": {
            "operationId": "dashboardAsset", "summary": "The dashboard's script and style sheet.", "security": public,
            "parameters": [{"name": "asset", "in": "path", "required": True,
                            "schema": {"type": "string", "enum": sorted(ASSETS)}}],
            "responses": {"200": {"description": "The asset.",
                                  "content": {"text/javascript": {"schema": {"type": "string"}},
                                              "text/css": {"schema": {"type": "string"}}}},
                          "404": _json(_ref("Error"), "No such asset.")}}},
        "/v1/backends": {"get": {
            "operationId": "listBackends", "summary": "Each backend's health, capabilities and load.",
            "responses": {"200": _json({"type": "object", "required": ["items"],
                                        "properties": {"items": {"type": "array", "items": _ref("Backend")}}},
                                       "The backends."), **_errors(401)}}},
        "/v1/jobs": {
            "post": {
                "operationId": "submitJob",
                "summary": "Validate a graph, template or pipeline job and queue it.",
                "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                                "schema": {"type": "string", "minLength": 1, "maxLength": 200}}],
                "requestBody": {"required": True, "content": {_JSON: {
                    "schema": _ref("JobRequest"),
                    "example": {"template": "cpu_model_free_ops", "labels": {"run": "example"}},
                }}},
                "responses": {"200": _json(_ref("Accepted"), "The job this Idempotency-Key made before."),
                              "202": _json(_ref("Accepted"), "Queued."),
                              **_errors(400, 401, 413, 422, 429, 503)},
            },
            "get": {
                "operationId": "listJobs",
                "summary": "The tenant's jobs, newest first, paged by cursor.",
                "parameters": [
                    {"name": "state", "in": "query", "style": "form", "explode": True,
                     "schema": {"type": "array", "items": {"type": "string", "enum": [s.value for s in JobState]}}},
                    {"name": "label", "in": "query", "style": "form", "explode": True, "description": "key:value",
                     "schema": {"type": "array", "items": {"type": "string", "pattern": "^[^:]+:.*$"}}},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {"200": _json(_ref("JobPage"), "A page of jobs."), **_errors(400, 401)},
            },
        },
        "/v1/inputs": {"post": {
            "operationId": "createInput",
            "summary": "Store an input image (the body, or fetched from an allow-listed URL); the same bytes give "
                       "the same id.",
            "requestBody": {"required": True, "content": {
                **{kind: {"schema": {"type": "string", "format": "binary"}}
                   for kind in ("image/png", "image/jpeg", "image/webp")},
                _JSON: {"schema": _ref("UrlInput")},
            }},
            "responses": {"201": _json(_ref("Input"), "Stored."), **_errors(400, 401, 403, 413, 415)}}},
        "/v1/jobs/{job_id}": {
            "get": {
                "operationId": "getJob", "summary": "One job, with its output names.", "parameters": [_job_id()],
                "responses": {"200": _json(_ref("Job"), "The job."), **_errors(401, 404)}},
            "delete": {
                "operationId": "deleteJob",
                "summary": "Delete an ended job with its attempts, events and outputs (an output file stays while "
                           "another job names the same content). A queued or running job is refused: cancel it first.",
                "parameters": [_job_id()],
                "responses": {"204": {"description": "Deleted."}, **_errors(401, 404, 409)}},
        },
        "/v1/jobs/{job_id}/cancel": {"post": {
            "operationId": "cancelJob", "summary": "Cancel a queued or running job.", "parameters": [_job_id()],
            "responses": {"200": _json(_ref("Job"), "The cancelled job."), **_errors(401, 404, 409)}}},
        "/v1/jobs/{job_id}/outputs/{name}": {"get": {
            "operationId": "getOutput",
            "summary": "An output file (`<node id>/<file name>`, as the job lists it), with an ETag.",
            "parameters": [_job_id(), {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
                           {"name": "If-None-Match", "in": "header", "schema": {"type": "string"}}],
            "responses": {"200": {"description": "The file's bytes.",
                                  "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}}},
                          "304": {"description": "Not modified (the ETag matched)."},
                          **_errors(400, 401, 404)}}},
        "/v1/templates": {"get": {
            "operationId": "listTemplates", "summary": "The templates that template jobs bind, with their slots.",
            "responses": {"200": _json(_ref("TemplateList"), "The templates, by name."), **_errors(401)}}},
        "/v1/runs/{run_id}": {"get": {
            "operationId": "getRun", "summary": "A pipeline job as a run: its images with model, seed and score.",
            "parameters": [_run_id()],
            "responses": {"200": _json(_ref("Run"), "The run."), **_errors(401, 404)}}},
        "/v1/runs/{run_id}/grid.png": {"get": {
            "operationId": "getRunGrid", "summary": "The run's grid: every image, with its model, seed and score.",
            "parameters": [_run_id(), {"name": "If-None-Match", "in": "header", "schema": {"type": "string"}}],
            "responses": {"200": {"description": "A PNG.", "content": {"image/png": {"schema": {
                "type": "string", "format": "binary"}}}},
                          "304": {"description": "Not modified (the ETag matched)."},
                          **_errors(401, 404)}}},
        "/v1/events": {"get": {
            "operationId": "events",
            "summary": "WebSocket: the tenant's events (`Event` as JSON messages), replayed after `after`, then "
                       "followed. Browsers may pass the token as `?token=`.",
            "parameters": [
                {"name": "after", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                {"name": "job", "in": "query", "style": "form", "explode": True,
                 "schema": {"type": "array", "items": {"type": "string"}}},
                {"name": "token", "in": "query", "schema": {"type": "string"}},
            ],
            "responses": {"101": {"description": "Switching to the WebSocket protocol; each message is an Event."},
                          **_errors(400, 401)}}},
    }


def openapi_document() -> dict[str, Any]:
    """The document, built fresh on each call (nothing is kept at import)."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "comfy_orchestrator", "version": "1",
                 "description": "Jobs on a pool of ComfyUI backends: submit, follow, fetch outputs."},
        "security": [{"bearer": []}],
        "paths": _paths(),
        "components": {
            "schemas": _schemas(),
            "responses": _error_responses(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())
