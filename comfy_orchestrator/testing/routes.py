"""The double's HTTP and WebSocket routes, each served at ``/x`` and ``/api/x`` as ComfyUI does."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import mimetypes
import os
import sys
import time
import uuid
from collections.abc import Mapping
from io import BytesIO
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web
from PIL import Image

from comfy_orchestrator.graph import check_prompt
from comfy_orchestrator.testing.execution import Engine, QueueItem
from comfy_orchestrator.testing.faults import Faults
from comfy_orchestrator.testing.files import Folders, PathNotAllowed
from comfy_orchestrator.testing.sockets import SERVER_FEATURES, SocketHub

__all__ = ["ENGINE", "FAULTS", "FOLDERS", "HUB", "build_app"]

logger = logging.getLogger(__name__)

ENGINE = web.AppKey("engine", Engine)
HUB = web.AppKey("hub", SocketHub)
FOLDERS = web.AppKey("folders", Folders)
FAULTS = web.AppKey("faults", Faults)
ARGV = web.AppKey("argv", list[str])
_SERVER_ERROR = "500 Internal Server Error\n\nServer got itself in trouble"
_MODEL_FOLDERS = ("checkpoints", "configs", "loras", "vae", "text_encoders", "diffusion_models", "clip_vision",
                  "style_models", "embeddings", "diffusers", "vae_approx", "controlnet", "gligen",
                  "upscale_models", "latent_upscale_models", "custom_nodes", "hypernetworks", "photomaker",
                  "classifiers", "model_patches", "audio_encoders")


def _server_error() -> web.Response:
    """What aiohttp answers when a ComfyUI handler raises (malformed JSON, for one)."""
    return web.Response(status=500, text=_SERVER_ERROR)


@web.middleware
async def _faults_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    faults = request.app[FAULTS]
    if faults.latency > 0:
        await asyncio.sleep(faults.latency)
    if faults.take_http_500():
        return _server_error()
    response: web.StreamResponse = await handler(request)
    if faults.response_delay > 0:
        await asyncio.sleep(faults.response_delay)
    return response


async def _json_body(request: web.Request) -> Any:
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _server_error()


async def post_prompt(request: web.Request) -> web.StreamResponse:
    engine, folders = request.app[ENGINE], request.app[FOLDERS]
    data = await _json_body(request)
    if isinstance(data, web.Response) or not isinstance(data, dict):
        return _server_error()
    try:
        if "number" in data:
            number: float = float(data["number"])
        else:
            number = -engine.number if data.get("front") else engine.number
            engine.number += 1
    except (TypeError, ValueError):
        return _server_error()
    if "prompt" not in data:
        error = {"type": "no_prompt", "message": "No prompt provided", "details": "No prompt provided",
                 "extra_info": {}}
        return web.json_response({"error": error, "node_errors": {}}, status=400)
    prompt_id = str(data.get("prompt_id", uuid.uuid4()))

    def file_exists(name: str) -> bool:
        try:
            return folders.annotated(name).is_file()
        except PathNotAllowed:
            return False

    try:
        check = check_prompt(data["prompt"], engine.object_info(),
                             partial_execution_targets=data.get("partial_execution_targets"),
                             file_exists=file_exists)
    except (TypeError, AttributeError, KeyError, ValueError):
        return _server_error()
    extra_data = dict(data.get("extra_data") or {})
    if "client_id" in data:
        extra_data["client_id"] = data["client_id"]
    if not check.ok:
        logger.info("%s: invalid prompt: %s", engine.name, check.error)
        return web.json_response({"error": check.error, "node_errors": check.node_errors}, status=400)
    extra_data["create_time"] = int(time.time() * 1000)
    await engine.put(QueueItem(number, prompt_id, check.prompt, extra_data, list(check.outputs)))
    return web.json_response({"prompt_id": prompt_id, "number": number, "node_errors": check.node_errors})


async def get_prompt(request: web.Request) -> web.StreamResponse:
    return web.json_response(request.app[ENGINE].queue_info())


async def get_queue(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    running = [engine.running.wire()] if engine.running is not None else []
    return web.json_response({"queue_running": running, "queue_pending": [i.wire() for i in engine.queue]})


async def post_queue(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    data = await _json_body(request)
    if isinstance(data, web.Response):
        return data
    if data.get("clear"):
        await engine.wipe_queue()
    for prompt_id in data.get("delete", ()):
        await engine.delete(prompt_id)
    return web.Response()


async def post_interrupt(request: web.Request) -> web.StreamResponse:
    try:
        data = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        data = {}
    request.app[ENGINE].interrupt(data.get("prompt_id") if isinstance(data, dict) else None)
    return web.Response()


async def post_free(request: web.Request) -> web.StreamResponse:
    data = await _json_body(request)
    if isinstance(data, web.Response):
        return data
    request.app[ENGINE].free(bool(data.get("free_memory", False)))
    return web.Response()


async def get_history(request: web.Request) -> web.StreamResponse:
    history = request.app[ENGINE].history
    try:
        max_items = int(request.query["max_items"]) if "max_items" in request.query else None
        offset = int(request.query.get("offset", -1))
    except ValueError:
        return _server_error()
    if offset < 0 and max_items is not None:
        offset = len(history) - max_items
    out: dict[str, Any] = {}
    for index, key in enumerate(history):
        if index >= offset:
            out[key] = history[key]
            if max_items is not None and len(out) >= max_items:
                break
    return web.json_response(out)


async def get_history_item(request: web.Request) -> web.StreamResponse:
    history = request.app[ENGINE].history
    prompt_id = request.match_info["prompt_id"]
    return web.json_response({prompt_id: history[prompt_id]} if prompt_id in history else {})


async def post_history(request: web.Request) -> web.StreamResponse:
    history = request.app[ENGINE].history
    data = await _json_body(request)
    if isinstance(data, web.Response):
        return data
    if data.get("clear"):
        history.clear()
    for prompt_id in data.get("delete", ()):
        history.pop(prompt_id, None)
    return web.Response()


async def get_object_info(request: web.Request) -> web.StreamResponse:
    info = request.app[ENGINE].object_info()
    node_class = request.match_info.get("node_class")
    if node_class is None:
        return web.json_response(info)
    return web.json_response({node_class: info[node_class]} if node_class in info else {})


async def get_system_stats(request: web.Request) -> web.StreamResponse:
    memory = 16 * 1024**3
    system = {"os": os.name, "ram_total": memory, "ram_free": memory, "comfyui_version": "0.3.75",
              "required_frontend_version": "1.32.9", "installed_templates_version": "0.7.25",
              "required_templates_version": "0.7.25", "python_version": sys.version,
              "pytorch_version": "2.9.0+cpu", "embedded_python": False, "argv": request.app[ARGV]}
    device = {"name": "cpu", "type": "cpu", "index": None, "vram_total": memory, "vram_free": memory,
              "torch_vram_total": memory, "torch_vram_free": memory}
    return web.json_response({"system": system, "devices": [device]})


async def get_features(request: web.Request) -> web.StreamResponse:
    return web.json_response(SERVER_FEATURES)


async def get_models(request: web.Request) -> web.StreamResponse:
    folder = request.match_info.get("folder")
    if folder is None:
        return web.json_response(list(_MODEL_FOLDERS))
    if folder not in _MODEL_FOLDERS:
        return web.Response(status=404)
    return web.json_response(list(request.app[ENGINE].models.get(folder, ())))


async def get_empty_list(request: web.Request) -> web.StreamResponse:
    return web.json_response([])


def _render_view(path: Path, preview: str | None, channel: str | None) -> tuple[bytes, str]:
    with Image.open(path) as img:
        if preview is not None:
            parts = preview.split(";")
            fmt = parts[0] if parts[0] in ("webp", "jpeg") and "a" not in (channel or "") else "webp"
            quality = int(parts[-1]) if parts[-1].isdigit() else 90
            out = img.convert("RGB") if fmt == "jpeg" or channel == "rgb" else img
            buffer = BytesIO()
            out.save(buffer, format=fmt, quality=quality)
            return buffer.getvalue(), f"image/{fmt}"
        if channel == "rgb":
            out = img.convert("RGB")
        else:
            alpha = img.getchannel("A") if img.mode == "RGBA" else Image.new("L", img.size, 255)
            out = Image.new("RGBA", img.size)
            out.putalpha(alpha)
        buffer = BytesIO()
        out.save(buffer, format="PNG")
        return buffer.getvalue(), "image/png"


def _locate(folders: Folders, query: Mapping[str, str]) -> Path | int:
    """The file /view serves for ``query``, or the status ComfyUI answers instead."""
    if "filename" not in query:
        return 404
    filename, folder = query["filename"], None
    for kind in ("output", "input", "temp"):
        if filename.endswith(f"[{kind}]"):
            filename, folder = filename[: -len(kind) - 3], folders.by_type(kind)
    if not filename or filename[0] == "/" or ".." in filename:
        return 400
    if folder is None:
        kind = query.get("type", "output")
        folder = folders.by_type(kind) if kind in ("output", "input", "temp") else None
        if folder is None:
            return 400
    base = str(folder.resolve())
    if "subfolder" in query:
        full = os.path.abspath(os.path.join(base, query["subfolder"]))
        if os.path.commonpath((full, base)) != base:
            return 403
        base = full
    path = Path(base) / os.path.basename(filename)
    return path if path.is_file() else 404


async def get_view(request: web.Request) -> web.StreamResponse:
    query = request.query
    path = _locate(request.app[FOLDERS], query)
    if isinstance(path, int):
        return web.Response(status=path)
    disposition = {"Content-Disposition": f'filename="{path.name}"'}
    channel = query.get("channel")
    if "preview" in query or channel in ("rgb", "a"):
        body, content_type = await asyncio.to_thread(_render_view, path, query.get("preview"), channel)
        return web.Response(body=body, content_type=content_type, headers=disposition)
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if content_type in {"text/html", "text/html-sandboxed", "application/xhtml+xml", "text/javascript", "text/css"}:
        content_type = "application/octet-stream"
    return web.FileResponse(path, headers={**disposition, "Content-Type": content_type})


def _store_upload(folder: Path, subfolder: str, filename: str, data: bytes, overwrite: bool) -> str | None:
    target = os.path.join(str(folder.resolve()), os.path.normpath(subfolder))
    path = os.path.abspath(os.path.join(target, filename))
    if os.path.commonpath((str(folder.resolve()), path)) != str(folder.resolve()):
        return None
    os.makedirs(target, exist_ok=True)
    stem, ext = os.path.splitext(filename)
    index = 1
    while not overwrite and os.path.exists(path):
        with open(path, "rb") as existing:
            if hashlib.sha256(existing.read()).digest() == hashlib.sha256(data).digest():
                return filename
        filename = f"{stem} ({index}){ext}"
        path = os.path.join(target, filename)
        index += 1
    with open(path, "wb") as out:
        out.write(data)
    return filename


async def post_upload_image(request: web.Request) -> web.StreamResponse:
    folders = request.app[FOLDERS]
    post = await request.post()
    image = post.get("image")
    kind = post.get("type")
    kind = str(kind) if kind is not None else "input"
    folder = folders.by_type(kind)
    if folder is None:
        return _server_error()  # ComfyUI trips over an unknown type (UnboundLocalError)
    if not isinstance(image, web.FileField):
        return web.Response(status=400)
    if not image.filename:
        return web.Response(status=400)
    subfolder = str(post.get("subfolder", ""))
    overwrite = str(post.get("overwrite")) in ("true", "1")
    data = image.file.read()
    name = await asyncio.to_thread(_store_upload, folder, subfolder, image.filename, data, overwrite)
    if name is None:
        return web.Response(status=400)
    return web.json_response({"name": name, "subfolder": subfolder, "type": kind})


async def websocket(request: web.Request) -> web.StreamResponse:
    engine, hub = request.app[ENGINE], request.app[HUB]
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    sid = request.query.get("clientId", "") or uuid.uuid4().hex
    hub.add(sid, ws, request.transport)
    try:
        await hub.send_json("status", {"status": engine.queue_info(), "sid": sid}, sid)
        running = engine.running
        if running is not None and running.client_id == sid and engine.last_node_id is not None:
            await hub.send_json("executing", {"node": engine.last_node_id}, sid)
        first = True
        async for message in ws:
            if message.type != WSMsgType.TEXT:
                continue
            try:
                data = json.loads(message.data)
            except json.JSONDecodeError:
                logger.warning("%s: invalid JSON from client %s", engine.name, sid)
                continue
            if first and isinstance(data, dict) and data.get("type") == "feature_flags":
                hub.set_feature_flags(sid, dict(data.get("data") or {}))
                await hub.send_json("feature_flags", SERVER_FEATURES, sid)
            first = False
    finally:
        hub.remove(sid, ws)
    return ws


_ROUTES = (
    ("GET", "/ws", websocket), ("POST", "/prompt", post_prompt), ("GET", "/prompt", get_prompt),
    ("GET", "/queue", get_queue), ("POST", "/queue", post_queue), ("POST", "/interrupt", post_interrupt),
    ("POST", "/free", post_free), ("GET", "/history", get_history),
    ("GET", "/history/{prompt_id}", get_history_item), ("POST", "/history", post_history),
    ("GET", "/object_info", get_object_info), ("GET", "/object_info/{node_class}", get_object_info),
    ("GET", "/system_stats", get_system_stats), ("GET", "/features", get_features),
    ("GET", "/models", get_models), ("GET", "/models/{folder}", get_models),
    ("GET", "/embeddings", get_empty_list), ("GET", "/extensions", get_empty_list),
    ("GET", "/view", get_view), ("POST", "/upload/image", post_upload_image),
)


def build_app(engine: Engine, hub: SocketHub, folders: Folders, faults: Faults, argv: list[str]) -> web.Application:
    """One server lifetime's application (a restart builds a new one)."""
    app = web.Application(middlewares=[_faults_middleware], client_max_size=SERVER_FEATURES["max_upload_size"])
    app[ENGINE], app[HUB], app[FOLDERS], app[FAULTS], app[ARGV] = engine, hub, folders, faults, argv
    for method, path, handler in _ROUTES:
        app.router.add_route(method, "/api" + path, handler)
        app.router.add_route(method, path, handler)
    return app
