"""The HTTP + WebSocket service: jobs in a durable store, run on a pool of ComfyUI backends.

    create_app        the aiohttp application (one lifespan: store, pool, reconciliation, workers)
    ServiceSettings   frozen settings, ``ServiceSettings.load("service.toml")``
    SettingsError     a settings file that does not fit (the field is named)

Routes (every ``/v1`` route needs ``Authorization: Bearer <token>``; errors are JSON
``{"error": {"type", "message"}}``)::

    POST /v1/jobs                          {"graph": {...}} | {"template": name, "params": {...}}
                                           | {"pipeline": {...spec...}}, "labels", "inputs": {file: id}
    POST /v1/inputs                        an image body (PNG/JPEG/WebP), or {"url": ...} (allow-listed)
    GET  /v1/jobs?state=&label=k:v&limit=&cursor=
    GET  /v1/jobs/{id}
    POST /v1/jobs/{id}/cancel
    GET  /v1/jobs/{id}/outputs/{name}      streamed; ETag = sha256
    GET  /v1/runs/{id}, /v1/runs/{id}/grid.png   a pipeline job: images with model, seed, score; the grid
    GET  /v1/backends                      health, load, capabilities ([managed] ones with pid and restarts)
    GET  /v1/templates                     the templates template jobs bind, with their slots
    WS   /v1/events?after=SEQ&job=ID       replay, then follow (``?token=`` for browsers)
    GET  /healthz, /readyz, /metrics, /openapi.json, /dashboard   (no token)
"""

from comfy_orchestrator.service.app import create_app
from comfy_orchestrator.service.settings import ServiceSettings, SettingsError

__all__ = ["ServiceSettings", "SettingsError", "create_app"]
