"""``comfy-orch serve --config FILE``: run the HTTP + WebSocket service until SIGINT/SIGTERM.

On either signal the service drains (``/readyz`` answers 503, workers stop claiming), waits up to
``[server] drain_timeout`` for running jobs, hands the rest back to the queue and closes the store.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import click
from aiohttp import web

from comfy_orchestrator.cli import main
from comfy_orchestrator.service import ServiceSettings, SettingsError, create_app
from comfy_orchestrator.service.access_log import AccessLogger
from comfy_orchestrator.service.app import drain

__all__ = ["serve"]

log = logging.getLogger(__name__)


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The service's TOML settings file.")
@click.option("--host", default=None, help="Override [server] host.")
@click.option("--port", default=None, type=int, help="Override [server] port.")
def serve(config_path: Path, host: str | None, port: int | None) -> None:
    """Serve the job API (HTTP + WebSocket) over the configured backends."""
    try:
        settings = ServiceSettings.load(config_path)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    server = settings.server
    app = create_app(settings)
    asyncio.run(_serve(app, host or server.host, server.port if port is None else port))


async def _serve(app: web.Application, host: str, port: int) -> None:
    """Listen until SIGINT/SIGTERM, drain while still listening (so ``/readyz`` answers 503 and
    in-flight requests are answered), then stop listening and shut down."""
    runner = web.AppRunner(app, access_log=log, access_log_class=AccessLogger, shutdown_timeout=10.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        log.info("serving on http://%s:%d", host, port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("signal received: draining")
        await drain(app)
    finally:
        await runner.cleanup()
