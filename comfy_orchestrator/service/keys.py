"""Typed application and request state (aliases only: what lives under which key)."""

from __future__ import annotations

import weakref

from aiohttp import web

from comfy_orchestrator.graph import Template
from comfy_orchestrator.pool import Pool
from comfy_orchestrator.service.backends import BackendClients
from comfy_orchestrator.service.feed import EventFeed
from comfy_orchestrator.service.managed import Supervisor
from comfy_orchestrator.service.notifier import Notifier
from comfy_orchestrator.service.peers import PeerBus
from comfy_orchestrator.service.pipeline_jobs import PipelineJobs
from comfy_orchestrator.service.settings import ServiceSettings
from comfy_orchestrator.service.state import Lifecycle
from comfy_orchestrator.store import JobStore

__all__ = [
    "CLIENTS",
    "FEED",
    "LIFECYCLE",
    "MANAGED",
    "NOTIFIER",
    "PEERS",
    "PIPELINES",
    "POOL",
    "SETTINGS",
    "SOCKETS",
    "STORE",
    "TEMPLATES",
    "TENANT",
]

SETTINGS = web.AppKey("settings", ServiceSettings)
STORE = web.AppKey("store", JobStore)
POOL = web.AppKey("pool", Pool)
CLIENTS = web.AppKey("clients", BackendClients)
TEMPLATES = web.AppKey("templates", dict[str, Template])
NOTIFIER = web.AppKey("notifier", Notifier)
FEED = web.AppKey("feed", EventFeed)  # the events this process committed lately, for the event sockets
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
MANAGED = web.AppKey("managed", Supervisor)  # the [managed] local ComfyUI processes (none when not configured)
PIPELINES = web.AppKey("pipelines", PipelineJobs)  # runs pipeline-kind jobs (and owns the evaluator)
SOCKETS = web.AppKey("sockets", weakref.WeakSet[web.WebSocketResponse])
PEERS = web.AppKey("peers", PeerBus)  # the sibling processes (only with [server] processes above 1)

TENANT = web.RequestKey("tenant", str)
