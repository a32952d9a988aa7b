"""The ``comfy-orch`` command line. Each command group lives in its own module of this package."""

from __future__ import annotations

import logging

import click

__all__ = ["LOG_FORMAT", "main"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@click.group()
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Orchestrate ComfyUI servers: run graphs, score images, serve jobs."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format=LOG_FORMAT)


def _register() -> None:
    # Imported for their side effect of adding commands to ``main``.
    from comfy_orchestrator.cli import (  # noqa: F401
        demo_command,
        quality_commands,
        run_command,
        serve_command,
        service_commands,
    )


_register()
