"""The access log: method, path, status, size and time, never the query string (a browser's
WebSocket carries its token there) nor any header."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

__all__ = ["AccessLogger"]


class AccessLogger(AbstractAccessLogger):
    @property
    def enabled(self) -> bool:  # aiohttp then skips timing and calling ``log`` for each request
        return self.logger.isEnabledFor(logging.INFO)

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info("%s %s %d %s %.1fms", request.method, request.path, response.status,
                         response.body_length, time * 1000)
