"""``GET /v1/templates``: the templates the service binds ``{"template": name, "params": …}`` jobs to,
with each slot's default value — what a client (or the dashboard) needs to fill in a job."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from comfy_orchestrator.graph import Template
from comfy_orchestrator.service.keys import TEMPLATES

__all__ = ["routes", "template_json"]

routes = web.RouteTableDef()


def template_json(template: Template) -> dict[str, Any]:
    defaults = template.defaults
    return {
        "name": template.name,
        "description": template.description,
        "slots": {slot: {"default": defaults.get(slot), "type": template.slot_type(slot).__name__}
                  for slot in template.slots},
    }


@routes.get("/v1/templates")
async def list_templates(request: web.Request) -> web.Response:
    templates = request.app[TEMPLATES]
    return web.json_response({"items": [template_json(templates[name]) for name in sorted(templates)]})
