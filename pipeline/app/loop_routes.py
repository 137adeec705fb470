"""The loop's routes: train, watch, cancel, evaluate, live and export (behind the same Guard as the others).

    POST   /api/train                  {"head": "linear", "epochs": N}: start (or, while one runs, see it: started false)
    GET    /api/train                  the training's state (progress, curves, message)
    WS     /api/train/watch            the state, sent each time it changes (every page watching sees one training)
    POST   /api/train/cancel           stop the running training at its next step
    GET    /api/evaluate?split=val     per-class accuracy, the confusion matrix and each cell's images
    WS     /api/live?runtime=torch     JPEG frames in; the newest is classified, stale ones dropped; bars out
                                       ("frame": the number of the frame answered, counted from 1)
    POST   /api/export                 write DIR/export/classifier.onnx and .json (run_webcam.py --export)
    GET    /api/export/classifier.onnx, /api/export/classifier.json   the downloads
    GET    /api/dataset.zip            the ImageFolder as a zip
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from pathlib import Path

from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from pipeline.app.files import MAX_FRAME_BYTES, AppError
from pipeline.app.outcome import EXPORT_NAME, LiveModel, dataset_zip, evaluate, export_onnx
from pipeline.app.training import Trainer
from pipeline.common.errors import UserError

log = logging.getLogger(__name__)
NO_STORE = {"cache-control": "no-store"}
WATCH_POLL_S = 0.1


class Loop:
    """The handlers over one project's trainer and live model."""

    def __init__(self, root: Path, trainer: Trainer, live: LiveModel):
        self.root, self.trainer, self.live = Path(root), trainer, live

    async def train(self, request: Request) -> Response:
        body = await request.body()
        if len(body) > 64 * 1024:
            raise AppError("the request body is over 64 KiB", 413)
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            raise AppError("the request body is not JSON", 400) from None
        data = data if isinstance(data, dict) else {}
        epochs = data.get("epochs")
        if epochs is not None and not isinstance(epochs, int):
            raise AppError("epochs must be a whole number", 400)
        started, state = self.trainer.start(str(data.get("head") or "linear"), epochs)
        return JSONResponse({"started": started, **state}, status_code=202 if started else 200)

    async def state(self, request: Request) -> Response:
        return JSONResponse(self.trainer.snapshot(), headers=NO_STORE)

    async def cancel(self, request: Request) -> Response:
        return JSONResponse({"cancelling": self.trainer.cancel(), **self.trainer.snapshot()})

    async def watch(self, websocket: WebSocket) -> None:
        """Every change of the training's state, until the page leaves (noticed by a reader: a server stopping
        waits for no page)."""
        await websocket.accept()
        left = asyncio.create_task(_until_closed(websocket))
        seen = -1
        try:
            while not left.done():
                state = self.trainer.snapshot()
                if state["version"] != seen:
                    seen = state["version"]
                    await websocket.send_json(state)
                await asyncio.wait([left], timeout=WATCH_POLL_S)
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            left.cancel()

    async def evaluate(self, request: Request) -> Response:
        result = await run_in_threadpool(evaluate, self.root, request.query_params.get("split", "val"))
        return JSONResponse(result, headers=NO_STORE)

    async def export(self, request: Request) -> Response:
        target = await run_in_threadpool(export_onnx, self.root)
        return JSONResponse({"onnx": f"/api/export/{target.name}", "sidecar": f"/api/export/{target.stem}.json",
                             "bytes": target.stat().st_size}, status_code=201)

    async def download(self, request: Request) -> Response:
        name = request.path_params["file"]
        if name not in (EXPORT_NAME, Path(EXPORT_NAME).stem + ".json"):
            raise AppError(f"there is no export {name!r}", 404)
        path = self.root / "export" / name
        if not path.is_file():
            raise AppError("nothing is exported yet: press Export first", 404)
        return FileResponse(path, filename=name, headers=NO_STORE)

    async def dataset(self, request: Request) -> Response:
        path = await run_in_threadpool(dataset_zip, self.root)
        return FileResponse(path, filename="dataset.zip", media_type="application/zip",
                            background=BackgroundTask(path.unlink, missing_ok=True))

    async def live_socket(self, websocket: WebSocket) -> None:
        runtime = websocket.query_params.get("runtime", "torch")
        try:
            await run_in_threadpool(self.live.classifier, runtime)  # opened before the first frame
        except UserError as err:
            await websocket.close(code=1008, reason=str(err)[:120])
            return
        await websocket.accept()
        await LiveSession(self.live, websocket, runtime).run()


class LiveSession:
    """One page's live view: a reader keeps only the newest frame; the classifier takes it when it is free."""

    def __init__(self, live: LiveModel, websocket: WebSocket, runtime: str):
        self.live, self.websocket, self.runtime = live, websocket, runtime
        self.newest: tuple[int, bytes] | None = None  # (its number, counted from 1; the JPEG)
        self.arrived = asyncio.Event()
        self.received = self.dropped = 0
        self.closed = False
        self.times: deque[float] = deque(maxlen=30)

    async def read(self) -> None:
        try:
            while True:
                message = await self.websocket.receive()
                if message["type"] == "websocket.disconnect" or message.get("bytes") is None:
                    break
                if len(message["bytes"]) > MAX_FRAME_BYTES:
                    continue
                self.received += 1
                if self.newest is not None:
                    self.dropped += 1  # stale: a newer frame came before the classifier was free
                self.newest = (self.received, message["bytes"])
                self.arrived.set()
        except (WebSocketDisconnect, RuntimeError):
            pass
        self.closed = True
        self.arrived.set()

    async def run(self) -> None:
        reader = asyncio.create_task(self.read())
        try:
            while True:
                await self.arrived.wait()
                self.arrived.clear()
                if self.closed:
                    break
                taken, self.newest = self.newest, None
                if taken is None:
                    continue
                await self.websocket.send_json({"frame": taken[0], **await self.answer(taken[1])})
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            reader.cancel()

    async def answer(self, frame: bytes) -> dict:
        started = time.perf_counter()
        try:
            probs, names = await run_in_threadpool(self.live.predict, frame, self.runtime)
        except UserError as err:
            return {"error": str(err)}
        now = time.perf_counter()
        self.times.append(now)
        fps = (len(self.times) - 1) / (self.times[-1] - self.times[0]) if len(self.times) > 1 else None
        return {"names": names, "probs": [float(p) for p in probs], "ms": round((now - started) * 1000, 1),
                "fps": fps and round(fps, 2), "received": self.received, "dropped": self.dropped}


async def _until_closed(websocket: WebSocket) -> None:
    """Read (and ignore) what the page sends until it leaves."""
    try:
        while (await websocket.receive())["type"] != "websocket.disconnect":
            pass
    except (WebSocketDisconnect, RuntimeError):
        pass


def loop_routes(root: Path, trainer: Trainer, live: LiveModel) -> list:
    loop = Loop(root, trainer, live)
    return [
        Route("/api/train", loop.train, methods=["POST"]),
        Route("/api/train", loop.state),
        Route("/api/train/cancel", loop.cancel, methods=["POST"]),
        WebSocketRoute("/api/train/watch", loop.watch),
        Route("/api/evaluate", loop.evaluate),
        Route("/api/export", loop.export, methods=["POST"]),
        Route("/api/export/{file}", loop.download),
        Route("/api/dataset.zip", loop.dataset),
        WebSocketRoute("/api/live", loop.live_socket),
    ]
