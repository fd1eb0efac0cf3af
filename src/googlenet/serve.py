"""`googlenet serve`: a local demo server (FastAPI + uvicorn, the `serve` extra).

GET /          a page to drop or upload an image: top-5, Grad-CAM overlay, branch usage
POST /predict  multipart field `file` -> the object `googlenet predict --json` prints
POST /explain  the same, plus the Grad-CAM overlay (PNG data URI) and branch usage
GET /health    {"status": "ok"}

Requests that arrive together are batched into one forward pass: the first waits up to
`batch_window_ms` for others (at most `max_batch`). All model work runs on one worker thread,
so forward hooks (Grad-CAM, branch usage) never see another request's forward pass. Bad
uploads get a 4xx JSON {"error": ...}: not an image 415, over the byte limit (--max-mb) 413,
a broken file or one over the decoder's pixel or aspect limit (transforms.MAX_PIXELS,
MAX_ASPECT: the same as for files) 400.
"""

import asyncio
import base64
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from importlib import resources
from typing import Any

import torch
from torch import Tensor

from googlenet.errors import UserError

DEFAULT_MAX_BYTES = 20 * 1024 * 1024  # an upload's own cap (--max-mb), checked before decoding


class UploadError(Exception):
    """A bad upload: answered with `status` and {"error": message}."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def decode_upload(data: bytes, name: str) -> Tensor:
    """Uploaded bytes -> uint8 3 x H x W RGB through the one decoder (transforms.decode_image:
    the same pixels and limits as files). UploadError 415 for a non-image, 400 for an empty
    or broken file or one over the pixel or aspect limit."""
    from googlenet.transforms import ImageError, image_tensor

    if not data:
        raise UploadError(400, f"{name}: empty upload")
    try:
        return image_tensor(data, name)
    except ImageError as e:
        raise UploadError(415 if e.kind == "not an image" else 400, str(e)) from None


class Batcher:
    """Collects single inputs into batches: the first request of a batch waits up to
    `window_s` for more (at most `max_batch`), then one forward pass answers them all."""

    def __init__(
        self,
        run: Callable[[Tensor], Tensor],
        executor: ThreadPoolExecutor,
        window_s: float = 0.005,
        max_batch: int = 32,
    ) -> None:
        self.run, self.executor = run, executor
        self.window_s, self.max_batch = window_s, max(1, max_batch)
        self.queue: asyncio.Queue[tuple[Tensor, asyncio.Future[Tensor]]] | None = None
        self.task: asyncio.Task[None] | None = None
        self.batches = 0  # forward passes run (for tests and the load test)
        self.items = 0  # inputs answered

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with suppress(asyncio.CancelledError):
                await self.task

    async def submit(self, x: Tensor) -> Tensor:
        assert self.queue is not None, "Batcher.start() first"
        fut: asyncio.Future[Tensor] = asyncio.get_running_loop().create_future()
        await self.queue.put((x, fut))
        return await fut

    async def _loop(self) -> None:
        assert self.queue is not None
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            deadline = loop.time() + self.window_s
            while len(items) < self.max_batch:
                if not self.queue.empty():
                    items.append(self.queue.get_nowait())
                    continue
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), left))
                except TimeoutError:
                    break
            batch = torch.stack([x for x, _ in items])
            try:
                out = await loop.run_in_executor(self.executor, self.run, batch)
            except Exception as e:  # answer every waiting request, keep serving
                for _, fut in items:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            self.batches += 1
            self.items += len(items)
            for (_, fut), row in zip(items, out, strict=True):
                if not fut.done():
                    fut.set_result(row)


def page_html() -> str:
    return resources.files("googlenet").joinpath("static/serve.html").read_text(encoding="utf-8")


def _install_error_handlers(app: Any, max_bytes: int) -> None:
    """Every error answered as {"error": one line} with its status."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(UploadError)
    async def _upload_error(_req: Request, e: UploadError) -> JSONResponse:
        return error(e.status, str(e))

    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, e: RequestValidationError) -> JSONResponse:
        fields = ", ".join(".".join(map(str, err.get("loc", ()))) for err in e.errors())
        return error(
            400, f"bad request: expected a multipart form with an image in 'file' ({fields})"
        )

    @app.exception_handler(HTTPException)
    async def _http(_req: Request, e: HTTPException) -> JSONResponse:
        return error(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _crash(_req: Request, e: Exception) -> JSONResponse:
        return error(500, f"internal error: {type(e).__name__}: {e}")

    @app.middleware("http")
    async def _limit(request: Request, call_next: Any) -> Any:
        # Refuse an announced oversized body before reading it (multipart adds < 64 KB).
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_bytes + 65536:
            return error(413, f"upload of {int(length):,} bytes is over the {max_bytes:,} limit")
        return await call_next(request)


def _explain_extras(predictor: Any, x: Tensor, index: int) -> dict[str, Any]:
    """Grad-CAM for class `index` and the branch usage of one preprocessed image (run on the
    model's thread)."""
    from googlenet.insight.branches import BRANCHES, branch_energy
    from googlenet.insight.gradcam import DEFAULT_BLOCK, denormalize, gradcam
    from googlenet.insight.plots import overlay, png_bytes

    model, pp = predictor.model, predictor.preprocess
    cam = gradcam(model, x.unsqueeze(0), index)[0]
    rgb = overlay(denormalize(x, pp.mean, pp.std), cam, min_side=224)
    usage = branch_energy(model, x.unsqueeze(0))
    return {
        "gradcam": "data:image/png;base64," + base64.b64encode(png_bytes(rgb)).decode("ascii"),
        "gradcam_block": DEFAULT_BLOCK,
        "branch_usage": {
            b: dict(zip(BRANCHES, map(float, s[0]), strict=True)) for b, s in usage.shares().items()
        },
    }


def create_app(
    predictor: Any,
    max_bytes: int = DEFAULT_MAX_BYTES,
    batch_window_ms: float = 5.0,
    max_batch: int = 32,
    top_k: int = 5,
) -> Any:
    """The FastAPI app serving `predictor` (a googlenet.load() Predictor)."""
    try:
        from fastapi import FastAPI
    except ImportError as e:
        raise UserError(
            f"googlenet serve needs the serve extra ({e.name} is missing): "
            "pip install 'googlenet[serve]'"
        ) from None
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="googlenet-model")
    batcher = Batcher(predictor.predict_tensor, executor, batch_window_ms / 1000, max_batch)

    @asynccontextmanager
    async def lifespan(_app: Any):
        batcher.start()
        yield
        await batcher.stop()
        executor.shutdown(wait=False)

    app = FastAPI(title="googlenet", lifespan=lifespan)
    app.state.batcher = batcher
    _install_error_handlers(app, max_bytes)
    _add_routes(app, predictor, batcher, executor, max_bytes, top_k)
    return app


async def _read_upload(request: Any, predictor: Any, max_bytes: int) -> tuple[Tensor, str]:
    """The preprocessed image in the multipart field `file`, and its name."""
    form = await request.form(max_files=1, max_fields=8)
    try:
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise UploadError(400, "expected a multipart form with an image in 'file'")
        name = upload.filename or "upload"
        data = await upload.read(max_bytes + 1)
    finally:
        await form.close()
    if len(data) > max_bytes:
        raise UploadError(413, f"{name}: over the {max_bytes:,}-byte limit")
    img = await asyncio.get_running_loop().run_in_executor(None, decode_upload, data, name)
    return predictor.preprocess(img), name


def _add_routes(
    app: Any,
    predictor: Any,
    batcher: Batcher,
    executor: ThreadPoolExecutor,
    max_bytes: int,
    top_k: int,
) -> None:
    from fastapi import Request
    from fastapi.responses import HTMLResponse

    page = page_html()

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/predict")
    async def predict(request: Request) -> dict[str, Any]:
        x, name = await _read_upload(request, predictor, max_bytes)
        probs = await batcher.submit(x)
        return predictor.to_prediction(probs, top_k, name).to_dict()

    @app.post("/explain")
    async def explain(request: Request) -> dict[str, Any]:
        x, name = await _read_upload(request, predictor, max_bytes)
        probs = await batcher.submit(x)
        pred = predictor.to_prediction(probs, top_k, name)
        loop = asyncio.get_running_loop()
        extra = await loop.run_in_executor(executor, _explain_extras, predictor, x, pred.index)
        return {"prediction": pred.to_dict(), **extra}


def serve(
    checkpoint: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    **app_kw: Any,
) -> None:
    """Load a checkpoint and serve it until interrupted."""
    from googlenet.infer.inference import load

    app = create_app(load(checkpoint), **app_kw)
    try:
        import uvicorn
    except ImportError:
        raise UserError("googlenet serve needs uvicorn: pip install 'googlenet[serve]'") from None
    uvicorn.run(app, host=host, port=port, log_level=log_level)
