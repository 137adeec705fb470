"""The page and its API, as one Starlette app behind the Guard (pipeline.app.guard).

    GET    /                                   the page (with ?token=T the first time: it sets the cookie)
    GET    /static/FILE                        its JavaScript and CSS (served by this process: no CDN)
    GET    /api/project                        the project: settings, classes with counts, advice, trash size
    POST   /api/classes                        {"name": N}: add a class
    POST   /api/classes/{name}/rename          {"to": M}
    DELETE /api/classes/{name}                 its images go to the trash
    GET    /api/classes/{name}/samples         the image names
    GET    /api/classes/{name}/samples/{file}  a thumbnail (?full=1: the image itself)
    DELETE /api/classes/{name}/samples/{file}  to the trash
    POST   /api/classes/{name}/upload?filename=F   the body: an image or a zip of images
    GET    /api/trash                          the trashed images
    GET    /api/trash/{name}/{file}            a trashed image's thumbnail
    POST   /api/trash/restore                  {"class": N, "name": F}
    WS     /api/capture?class=N                one burst: binary JPEG frames in, {"saved": n} out
    ...and the loop's routes (train, evaluate, live, export): pipeline.app.loop_routes
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from pipeline.app.files import MAX_FRAME_BYTES, MAX_UPLOAD_BYTES, AppError
from pipeline.app.guard import Guard
from pipeline.app.loop_routes import loop_routes
from pipeline.app.outcome import LiveModel
from pipeline.app.project import Project
from pipeline.app.training import Options, Trainer
from pipeline.common.errors import UserError

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
NO_STORE = {"cache-control": "no-store"}


@dataclass
class Settings:
    """What the page shows about the server (and #2's training uses): from ServeConfig."""

    backbone: str = "alexnet"
    weights: str = "pretrained"
    seed: int = 0
    host: str = "127.0.0.1"
    port: int = 8765
    precision: str = "auto"  # the live classifier's (run_webcam.py --precision)
    extract: dict = field(default_factory=dict)  # overrides of ExtractConfig's defaults (tests: small inputs)
    head: dict = field(default_factory=dict)  # overrides of HeadConfig's defaults (tests: few epochs)


async def body_of(request: Request, limit: int) -> bytes:
    """The request body, refused (413) past ``limit`` bytes without reading it all."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise AppError(f"the upload is {int(declared) / 2**20:,.1f} MiB, over the {limit / 2**20:g} MiB allowed", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise AppError(f"the upload is over the {limit / 2**20:g} MiB allowed", 413)
        chunks.append(chunk)
    return b"".join(chunks)


async def json_of(request: Request, *keys: str) -> list[str]:
    """The string fields ``keys`` of a small JSON body; one line naming what is missing."""
    try:
        data = json.loads(await body_of(request, 64 * 1024))
    except ValueError:
        raise AppError("the request body is not JSON", 400) from None
    values = [data.get(key) if isinstance(data, dict) else None for key in keys]
    if not all(isinstance(v, str) for v in values):
        raise AppError(f"the request needs {', '.join(repr(k) for k in keys)} as text", 400)
    return values


class Api:
    """The routes' handlers over one project: each checks what it takes through the project's methods."""

    def __init__(self, project: Project, settings: Settings):
        self.project, self.settings = project, settings

    def page(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers=NO_STORE)

    async def info(self, request: Request) -> Response:
        summary = await run_in_threadpool(self.project.summary)
        return JSONResponse({"project": str(self.project.root), "images": str(self.project.images),
                             **vars(self.settings), **summary}, headers=NO_STORE)

    async def add_class(self, request: Request) -> Response:
        (name,) = await json_of(request, "name")
        await run_in_threadpool(self.project.add_class, name)
        return JSONResponse({"added": name}, status_code=201)

    async def rename_class(self, request: Request) -> Response:
        (to,) = await json_of(request, "to")
        await run_in_threadpool(self.project.rename_class, request.path_params["name"], to)
        return JSONResponse({"renamed": to})

    async def remove_class(self, request: Request) -> Response:
        moved = await run_in_threadpool(self.project.remove_class, request.path_params["name"])
        return JSONResponse({"removed": request.path_params["name"], "to_trash": moved})

    async def samples(self, request: Request) -> Response:
        names = await run_in_threadpool(self.project.samples, request.path_params["name"])
        return JSONResponse({"class": request.path_params["name"], "samples": names}, headers=NO_STORE)

    async def sample(self, request: Request) -> Response:
        params = request.path_params
        path = await run_in_threadpool(self.project.sample_path, params["name"], params["file"])
        return await self.image(request, path)

    async def trashed(self, request: Request) -> Response:
        params = request.path_params
        path = await run_in_threadpool(partial(self.project.sample_path, trash=True), params["name"], params["file"])
        return await self.image(request, path)

    async def image(self, request: Request, path: Path) -> Response:
        if request.query_params.get("full"):
            return FileResponse(path)
        data = await run_in_threadpool(self.project.thumbnail, path)
        return Response(data, media_type="image/jpeg" if data[:2] == b"\xff\xd8" else "application/octet-stream",
                        headers={"cache-control": "private, max-age=3600"})

    async def delete_sample(self, request: Request) -> Response:
        params = request.path_params
        name = await run_in_threadpool(self.project.delete_sample, params["name"], params["file"])
        return JSONResponse({"trashed": name})

    async def upload(self, request: Request) -> Response:
        data = await body_of(request, MAX_UPLOAD_BYTES)
        result = await run_in_threadpool(self.project.upload, request.path_params["name"],
                                         request.query_params.get("filename", ""), data)
        return JSONResponse(result, status_code=201)

    async def trash(self, request: Request) -> Response:
        return JSONResponse({"items": await run_in_threadpool(self.project.trash_items)}, headers=NO_STORE)

    async def restore(self, request: Request) -> Response:
        name, file = await json_of(request, "class", "name")
        restored = await run_in_threadpool(self.project.restore, name, file)
        return JSONResponse({"restored": restored, "class": name})

    async def capture(self, websocket: WebSocket) -> None:
        await capture_burst(self.project, websocket)


def build_app(project: Project, token: str, settings: Settings) -> Guard:
    """The app over ``project``, every route behind the token, Host and Origin checks."""
    api = Api(project, settings)
    live = LiveModel(project.root, settings.precision)
    trainer = Trainer(project.root, Options(settings.backbone, settings.weights, settings.seed, settings.extract,
                                            settings.head), on_done=live.warm)
    routes = [
        Route("/", api.page),
        Route("/api/project", api.info),
        Route("/api/classes", api.add_class, methods=["POST"]),
        Route("/api/classes/{name}/rename", api.rename_class, methods=["POST"]),
        Route("/api/classes/{name}", api.remove_class, methods=["DELETE"]),
        Route("/api/classes/{name}/samples", api.samples),
        Route("/api/classes/{name}/samples/{file}", api.sample),
        Route("/api/classes/{name}/samples/{file}", api.delete_sample, methods=["DELETE"]),
        Route("/api/classes/{name}/upload", api.upload, methods=["POST"]),
        Route("/api/trash", api.trash),
        Route("/api/trash/restore", api.restore, methods=["POST"]),
        Route("/api/trash/{name}/{file}", api.trashed),
        WebSocketRoute("/api/capture", api.capture),
        *loop_routes(project.root, trainer, live),
        Mount("/static", StaticFiles(directory=STATIC)),
    ]
    app = Starlette(routes=routes, exception_handlers={UserError: refusal, OSError: disk_problem})
    return Guard(app, token=token, host=settings.host, port=settings.port)


async def refusal(request: Request, err: UserError) -> Response:
    return JSONResponse({"error": str(err)}, status_code=getattr(err, "status", 400))


async def disk_problem(request: Request, err: OSError) -> Response:
    log.warning("%s %s: %s", request.method, request.url.path, err)
    what = "the disk is full" if err.errno == 28 else (err.strerror or str(err))
    return JSONResponse({"error": f"the project folder could not be changed: {what}; nothing was half-written"},
                        status_code=507 if err.errno == 28 else 500)


async def capture_burst(project: Project, websocket: WebSocket) -> None:
    """One hold of the record button: a new burst in the class; each binary message is a JPEG frame, saved as
    --collect saves one, and answered with the count saved so far (or an error, which ends the burst)."""
    name = websocket.query_params.get("class", "")
    try:
        folder, burst = await run_in_threadpool(project.start_burst, name)
    except UserError as err:
        await websocket.close(code=1008, reason=str(err)[:120])
        return
    await websocket.accept()
    await websocket.send_json({"burst": burst, "saved": 0})
    saved, index, left = 0, 0, False
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                left = True
                break
            data = message.get("bytes")
            if data is None:  # text: "end" closes the burst
                break
            if len(data) > MAX_FRAME_BYTES:
                raise AppError(f"a frame of {len(data) / 2**20:.1f} MiB is over the {MAX_FRAME_BYTES // 2**20} MiB "
                               "allowed", 413)
            index = await run_in_threadpool(project.save_frame, folder, burst, index, data) + 1
            saved += 1
            await websocket.send_json({"saved": saved})
    except WebSocketDisconnect:
        left = True
    except (UserError, OSError) as err:
        text = str(err) if isinstance(err, UserError) else f"cannot save a frame: {err.strerror or err}"
        await websocket.send_json({"error": f"{text}; the {saved} frames saved before it are kept"})
        await websocket.close(code=1011)
        return
    log.info("captured %d frames of %s (burst %s)", saved, name, burst)
    if not left:
        await websocket.send_json({"done": saved, "burst": burst})
        await websocket.close()
