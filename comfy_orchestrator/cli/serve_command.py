"""``comfy-orch serve --config FILE``: run the HTTP + WebSocket service until SIGINT/SIGTERM.

On either signal the service drains (``/readyz`` answers 503, workers stop claiming), waits up to
``[server] drain_timeout`` for running jobs, hands the rest back to the queue and closes the store.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click
from aiohttp import web

from comfy_orchestrator.cli import main
from comfy_orchestrator.service import ServiceSettings, SettingsError, create_app
from comfy_orchestrator.service.access_log import AccessLogger

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
    # run_app turns SIGINT and SIGTERM into a graceful shutdown (GracefulExit → on_shutdown → cleanup);
    # the drain itself is bounded by drain_timeout, so the runner's own timeout only covers handlers.
    web.run_app(app, host=host or server.host, port=server.port if port is None else port,
                shutdown_timeout=10.0, handle_signals=True, print=None, access_log=log,
                access_log_class=AccessLogger)
