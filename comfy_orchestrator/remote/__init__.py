"""A small async client of the comfy_orchestrator service (``comfy-orch serve``).

    async with ServiceClient("http://orchestrator:8080", token) as service:
        job = await service.submit(template="sd15_txt2img", params={"prompt": "a red fox"})
        job = await service.wait(job.id, on_event=lambda e: print(e.type, e.fraction))
        await service.save(job.id, job.outputs[0], "fox.png")

It runs on the caller's event loop (so it works in a notebook); errors are ``RemoteError``s
(``comfy_orchestrator.remote.errors`` draws the tree).
"""

from comfy_orchestrator.remote.client import ServiceClient
from comfy_orchestrator.remote.errors import (
    Conflict,
    NotFound,
    Rejected,
    RemoteError,
    RetryLater,
    ServiceError,
    ServiceTimeout,
    ServiceUnreachable,
    Unauthorized,
)
from comfy_orchestrator.remote.records import BackendInfo, JobInfo, ServiceEvent

__all__ = [
    "BackendInfo",
    "Conflict",
    "JobInfo",
    "NotFound",
    "Rejected",
    "RemoteError",
    "RetryLater",
    "ServiceClient",
    "ServiceError",
    "ServiceEvent",
    "ServiceTimeout",
    "ServiceUnreachable",
    "Unauthorized",
]
