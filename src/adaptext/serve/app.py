"""The HTTP API of ``adaptext serve`` (FastAPI): classify, list, hot-load/unload, health, metrics, a page.

Errors are JSON ``{"error": "...", "status": N}``: 400 malformed JSON or an adapter that cannot be
loaded, 401 missing/wrong bearer token, 403 admin endpoints without a configured token or a path
outside the allowed directories, 404 unknown adapter or route, 409 name taken, 413 body, text
count or text length over the limit, 415 a body not sent as JSON, 422 a well-formed request of the
wrong shape.
"""

from __future__ import annotations

import contextlib
import hmac
import importlib.resources
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from adaptext.errors import AdaptextError
from adaptext.serve.batcher import Batcher
from adaptext.serve.registry import AdapterExists, AdapterNotFound, PathRefused, Registry

log = logging.getLogger("adaptext.serve")
API_VERSION = "v1"


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20
    max_texts: int = 64
    max_text_chars: int = 10_000


@dataclass
class ServeOptions:
    token: str | None = None
    limits: Limits = field(default_factory=Limits)
    max_batch_rows: int = 64  # model rows per micro-batch: one per text, or one per sliding window
    max_wait_ms: float = 5.0
    batching: bool = True


# ---------------------------------------------------------------------- request and response bodies


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    adapter: str = Field(min_length=1, description="name of a loaded adapter (GET /v1/adapters)")
    texts: list[str] = Field(description="texts to classify, one result each, in order")
    top_k: int = Field(1, ge=1, description="how many best labels to list per text")


class Score(BaseModel):
    label: str
    score: float


class Result(BaseModel):
    """One text's answer. Single-label: label, score, top_k, probabilities (softmax). Multi-label: labels
    (every class at or above its tuned threshold), top_k, probabilities (a sigmoid per class). Regression:
    value, and label (the target's name)."""

    label: str | None = None
    score: float | None = None
    labels: list[str] | None = None
    value: float | None = None
    top_k: list[Score] | None = None
    probabilities: dict[str, float] | None = None


class ClassifyResponse(BaseModel):
    adapter: str
    task: str = Field(description="single-label, multi-label or regression")
    labels: list[str]
    precision: str = Field(description="what computed the answers: fp32, bf16 or fp16 (see adaptext.precision)")
    results: list[Result]


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(min_length=1, description="adapter directory, absolute or relative to an allowed directory")
    name: str | None = Field(None, description="name to serve it under (default: the directory's name)")


# ---------------------------------------------------------------------- errors


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


def _status_of(exc: AdaptextError) -> int:
    for kind, status in ((AdapterNotFound, 404), (PathRefused, 403), (AdapterExists, 409)):
        if isinstance(exc, kind):
            return status
    return 400


def _validation_message(exc: RequestValidationError) -> tuple[int, str]:
    errors = exc.errors()
    for err in errors:
        if err.get("type") == "json_invalid":
            return 400, f"request body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})"
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    if first.get("type") == "model_attributes_type" or where == "body":
        return 422, 'the body must be a JSON object, e.g. {"adapter": "NAME", "texts": ["..."]}'
    return 422, f"{where}: {first.get('msg', 'invalid value')}"


class BodyTooLarge(HTTPException):
    pass


class Guard:
    """Outermost ASGI layer: refuses bodies over the limit and records every request for /metrics."""

    def __init__(self, app: Any, limit: int, metrics: Metrics):
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}
        too_large = f"request body over {self.limit:,} bytes; send fewer or shorter texts per request"

        async def send_and_record(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        length = dict(scope.get("headers") or []).get(b"content-length")
        try:
            if length is not None and int(length) > self.limit:
                await error(413, too_large)(scope, receive, send_and_record)
                return
        except ValueError:
            await error(400, "Content-Length is not a number")(scope, receive, send_and_record)
            return
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(413, too_large)
            return message

        try:
            await self.app(scope, limited_receive, send_and_record)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(scope["method"], endpoint, str(status["code"])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)


class Metrics:
    """Prometheus series of one server (its own registry, so several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("adaptext_requests", "HTTP requests", ["method", "endpoint", "status"], registry=r)
        self.latency = Histogram(
            "adaptext_request_seconds",
            "HTTP request latency",
            ["endpoint"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        sizes = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
        self.batch_rows = Histogram(
            "adaptext_batch_rows", "model rows (texts, or sliding windows) per micro-batch", buckets=sizes, registry=r
        )
        self.batch_texts = Histogram(
            "adaptext_batch_texts", "texts with rows in a micro-batch", buckets=sizes, registry=r
        )
        self.batch_requests = Histogram(
            "adaptext_batch_requests", "requests with rows in a micro-batch", buckets=sizes[:7], registry=r
        )
        self.forward_rows = Histogram("adaptext_forward_rows", "model rows per forward pass", buckets=sizes, registry=r)
        self.texts = Counter("adaptext_texts_classified", "texts classified", ["adapter"], registry=r)
        self.adapters = Gauge("adaptext_adapters_loaded", "adapters loaded", registry=r)

    def batch(self, rows: int, texts: int, requests: int) -> None:
        self.batch_rows.observe(rows)
        self.batch_texts.observe(texts)
        self.batch_requests.observe(requests)


# ---------------------------------------------------------------------- the app


def page_html() -> str:
    return importlib.resources.files("adaptext.serve").joinpath("page.html").read_text(encoding="utf-8")


def create_app(registry: Registry, options: ServeOptions | None = None) -> Any:
    """The ASGI app serving ``registry``'s adapters (loaded already; more can be hot-loaded)."""
    options = options or ServeOptions()
    metrics = Metrics()
    metrics.adapters.set(len(registry.adapters))
    registry.on_forward = metrics.forward_rows.observe
    batcher = Batcher(registry, options.max_batch_rows, options.max_wait_ms, options.batching, metrics.batch)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(
        title="adaptext serve",
        version=API_VERSION,
        description="Text classification with many adapters on one base model.",
        lifespan=lifespan,
    )
    app.state.registry, app.state.batcher, app.state.metrics = registry, batcher, metrics
    _add_error_handlers(app)
    _add_operations(app, registry, batcher, metrics)
    _add_api(app, registry, batcher, metrics, options)
    return Guard(app, options.limits.max_body_bytes, metrics)


def _auth(options: ServeOptions) -> tuple[Callable[[Request], None], Callable[[Request], None]]:
    """The dependencies that guard the API (a bearer token, when --token is set) and the admin endpoints
    (off without a token)."""

    def token_of(request: Request) -> str | None:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        return value.strip() if scheme.lower() == "bearer" and value.strip() else None

    def check_token(request: Request) -> None:
        if options.token is None:
            return
        given = token_of(request)
        if given is None or not hmac.compare_digest(given.encode(), options.token.encode()):
            raise HTTPException(401, "missing or wrong bearer token; send 'Authorization: Bearer TOKEN'")

    def check_admin(request: Request) -> None:
        if options.token is None:
            raise HTTPException(403, "admin endpoints are off: start adaptext serve with --token to enable them")
        check_token(request)

    return check_token, check_admin


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as one JSON object with a one-line message (adaptext.serve.app.error)."""

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
        return error(exc.status_code, str(exc.detail), headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        if "json" not in request.headers.get("content-type", ""):
            return error(415, "send the body as JSON with the header 'Content-Type: application/json'")
        return error(*_validation_message(exc))

    @app.exception_handler(AdaptextError)
    async def _adaptext_error(_: Request, exc: AdaptextError) -> JSONResponse:
        return error(_status_of(exc), str(exc))

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return error(500, f"internal error ({type(exc).__name__}); see the server log")


def _add_operations(app: FastAPI, registry: Registry, batcher: Batcher, metrics: Metrics) -> None:
    """The page, health, readiness and Prometheus endpoints."""

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return page_html()

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"])
    async def readyz() -> JSONResponse:
        """Ready to classify: the batcher runs and at least one adapter is loaded."""
        ready = batcher.running and bool(registry.adapters)
        body = {"ready": ready, "adapters": sorted(registry.adapters)}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["operations"])
    async def prometheus() -> Response:
        """Prometheus text format: request counts and latency per endpoint, rows/texts/requests per micro-batch,
        rows per forward pass, texts per adapter."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _add_api(app: FastAPI, registry: Registry, batcher: Batcher, metrics: Metrics, options: ServeOptions) -> None:
    """Classify, list adapters, and the admin endpoints that hot-load and unload adapters."""
    check_token, check_admin = _auth(options)
    limits = options.limits

    @app.get(f"/{API_VERSION}/adapters", tags=["adapters"], dependencies=[Depends(check_token)])
    async def list_adapters() -> dict[str, Any]:
        """Every loaded adapter (name, base, method, labels, max length, training metrics) and the shared bases."""
        return {"adapters": registry.describe(), "bases": registry.describe_bases()}

    @app.post(
        f"/{API_VERSION}/classify",
        tags=["classify"],
        response_model=ClassifyResponse,
        response_model_exclude_none=True,
        dependencies=[Depends(check_token)],
    )
    async def classify(body: ClassifyRequest) -> dict[str, Any]:
        """Labels and probabilities for each text, from the named adapter."""
        if not body.texts:
            raise HTTPException(422, "texts: give at least one text")
        if len(body.texts) > limits.max_texts:
            raise HTTPException(
                413, f"{len(body.texts)} texts in one request; the limit is {limits.max_texts} (--max-texts)"
            )
        for i, text in enumerate(body.texts):
            if len(text) > limits.max_text_chars:
                raise HTTPException(
                    413,
                    f"text #{i} has {len(text):,} characters; the limit is {limits.max_text_chars:,} (--max-text-chars)",
                )
        adapter = registry.get(body.adapter)
        probs = await batcher.submit(body.adapter, body.texts)
        metrics.texts.labels(body.adapter).inc(len(body.texts))
        return {
            "adapter": adapter.name,
            "task": adapter.task.kind,
            "labels": adapter.class_names,
            "precision": adapter.runner.precision,
            "results": adapter.task.rank(probs, adapter.class_names, body.top_k),
        }

    @app.post(f"/{API_VERSION}/adapters", tags=["admin"], status_code=201, dependencies=[Depends(check_admin)])
    async def load_adapter(body: LoadRequest) -> dict[str, Any]:
        """Hot-load an adapter directory (inside the directories the server was started with)."""
        adapter = await batcher.call(registry.load, body.path, body.name)
        metrics.adapters.set(len(registry.adapters))
        log.info("loaded adapter %s from %s", adapter.name, adapter.folder)
        return adapter.describe()

    @app.delete(f"/{API_VERSION}/adapters/{{name}}", tags=["admin"], dependencies=[Depends(check_admin)])
    async def unload_adapter(name: str) -> dict[str, str]:
        """Unload an adapter; its base model is freed with its last adapter."""
        await batcher.call(registry.unload, name)
        metrics.adapters.set(len(registry.adapters))
        log.info("unloaded adapter %s", name)
        return {"unloaded": name}
