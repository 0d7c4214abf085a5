"""The Litestar application: OpenAI routes, health, and error rendering."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
import uuid
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from litestar import Litestar, Request, Response, get, post
from litestar.datastructures import State
from litestar.exceptions import HTTPException
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from llmdispatch.dependency import redis_dependency
from llmdispatch.errors import APIError, error_body
from llmdispatch.gateway.accounting import RequestRecord
from llmdispatch.gateway.auth import PRIORITY_HEADER, TokenAuthenticator, effective_priority, shared_redis
from llmdispatch.gateway.broker import GatewayBroker
from llmdispatch.gateway.ledger import close_ledger, record_refusal
from llmdispatch.gateway.limits import RateLimiter
from llmdispatch.gateway.metrics_port import MetricsPort
from llmdispatch.gateway.openapi import operation_with_body
from llmdispatch.gateway.relay import ClientWatch, Relay, SSEResponse
from llmdispatch.gateway.requests import check_model, parse_head
from llmdispatch.metrics import UNKNOWN_MODEL, gateway_metrics
from llmdispatch.settings import GatewaySettings
from llmdispatch.tokens import INVALIDATE_CHANNEL, TokenStore
from llmdispatch.wire import H_ENDPOINT, H_ENQUEUED_AT, H_PRIORITY, H_TIMEOUT, H_TOKEN, H_TRACEPARENT, unix_ms

log = logging.getLogger("dispatcher.gateway")

JSON = "application/json"


async def dispatch(request: Request, state: State, endpoint: str) -> Response:
    settings: GatewaySettings = state.settings
    broker: GatewayBroker = state.broker
    # Metrics and the request's log line; rejections are recorded by the APIError handler.
    record = request.state.record = RequestRecord("req-" + uuid.uuid4().hex, endpoint)
    token = await state.auth.authenticate(request.headers.get("authorization"))
    record.token = token.name
    body = await request.body()
    head = parse_head(endpoint, body, max_sequences=settings.max_sequences)
    model = head.model or ""
    record.requested_model = model[:64]  # for the log line; metrics get bounded labels only
    record.model = UNKNOWN_MODEL
    check_model(model)  # before it names a queue
    # A model without a live worker may still have a queue (configured, or scaled to zero): the
    # publish finds out (404 when no queue exists). Until then its metrics label stays bounded.
    known = broker.registry.knows(model)
    priority = effective_priority(token, request.headers.get(PRIORITY_HEADER))
    record.model = model if known else UNKNOWN_MODEL
    record.priority, record.stream = priority, bool(head.stream) and endpoint != "embeddings"

    request_id = record.request_id
    # 429 when one of the token's limits is reached; its worker's billing is charged to request_id.
    admission = await state.limits.admit(token, request_id, stream=record.stream)
    headers: dict[str, object] = {
        H_ENDPOINT: endpoint,
        H_TOKEN: token.name,
        H_PRIORITY: priority,
        H_TIMEOUT: unix_ms(settings.queue_timeout),
        H_ENQUEUED_AT: unix_ms(time.time()),
    }
    if traceparent := request.headers.get("traceparent"):
        headers[H_TRACEPARENT] = traceparent

    streamed = bool(head.stream) and endpoint != "embeddings"
    publish = broker.publish(
        request_id,
        model,
        body,
        priority=priority,
        headers=headers,
        expiration=settings.queue_timeout,
        whole=not streamed,
    )
    watch = ClientWatch(request.receive)  # one watcher for the request's whole life
    streaming = False
    try:
        try:
            # A blocked broker must not hold us.
            inbox = await watch.race(asyncio.ensure_future(publish), timeout=settings.publish_timeout)
        except TimeoutError:
            admission.finish()
            raise APIError(503, "The message broker is not accepting requests right now; retry later.") from None
        except BaseException:
            admission.finish()
            raise
        if inbox is None:  # the client left while we published
            admission.finish()
            return Response(b"", status_code=499)
        record.model = model
        exchange = Relay(
            broker,
            inbox,
            queue_deadline=time.monotonic() + settings.queue_timeout,
            idle_timeout=settings.idle_timeout,
            keepalive_interval=settings.keepalive_interval,
            on_accepted=admission.accepted,
            on_close=[admission.release, record.finished],
        )
        record.published()
        response_headers = {"x-request-id": request_id, **admission.headers}
        if streamed:
            response = await _streamed(watch, exchange, response_headers)
            streaming = isinstance(response, SSEResponse)  # the stream stops the watch when it ends
            return response
        return await _whole(watch, exchange, response_headers)
    finally:
        if not streaming:
            watch.stop()


async def _streamed(watch: ClientWatch, exchange: Relay, headers: dict[str, str]) -> Response:
    try:
        head = asyncio.ensure_future(exchange.head(commit_after=exchange.keepalive_interval))
        result = await watch.race(head)
    except APIError as exc:
        exchange.outcome.status = exc.status  # queue timeout or lost worker: an error, not a cancel
        exchange.close()
        raise
    except BaseException:
        exchange.close()
        raise
    if result is None:  # the client left while its request was queued
        exchange.close()
        return Response(b"", status_code=499)
    status, content_type, frames = result
    if status not in (0, 200):  # vLLM refused it: its status and body, unchanged
        status, body = await exchange.body(frames, status)
        exchange.close()
        return Response(body, status_code=status, media_type=JSON, headers=headers)
    return SSEResponse(exchange, watch, frames, content_type.split(";")[0].strip() or "text/event-stream", headers)


async def _whole(watch: ClientWatch, exchange: Relay, headers: dict[str, str]) -> Response:
    async def answer() -> tuple[int, str, bytes]:
        head_status, content_type, frames = await exchange.head(commit_after=None)
        status, body = await exchange.body(frames, head_status)
        # The status is the one the answer ended with: an error after a 200 HEAD is that error.
        return status, content_type if status == head_status else JSON, body

    try:
        result = await watch.race(asyncio.ensure_future(answer()))
    except APIError as exc:
        exchange.outcome.status = exc.status
        raise
    finally:
        exchange.close()
    if result is None:
        return Response(b"", status_code=499)
    status, content_type, body = result
    return Response(body, status_code=status, media_type=content_type, headers=headers)


@post("/v1/chat/completions", status_code=200, operation_class=operation_with_body("chat/completions"))
async def chat_completions(request: Request, state: State) -> Response:
    return await dispatch(request, state, "chat/completions")


@post("/v1/completions", status_code=200, operation_class=operation_with_body("completions"))
async def completions(request: Request, state: State) -> Response:
    return await dispatch(request, state, "completions")


@post("/v1/embeddings", status_code=200, operation_class=operation_with_body("embeddings"))
async def embeddings(request: Request, state: State) -> Response:
    return await dispatch(request, state, "embeddings")


def _model_card(model: str) -> dict[str, object]:
    return {"id": model, "object": "model", "created": 0, "owned_by": "dispatcher"}


@get("/v1/models")
async def list_models(request: Request, state: State) -> dict[str, object]:
    await state.auth.authenticate(request.headers.get("authorization"))
    return {"object": "list", "data": [_model_card(m) for m in state.broker.registry.models()]}


@get("/v1/models/{model_id:path}")
async def get_model(request: Request, state: State, model_id: str) -> dict[str, object]:
    await state.auth.authenticate(request.headers.get("authorization"))
    model = model_id.lstrip("/")
    if not state.broker.registry.knows(model):
        raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
    return _model_card(model)


@get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@get("/ready")
async def ready(state: State) -> Response:
    if state.get("draining"):
        return Response({"status": "not ready", "reason": "shutting down"}, status_code=503)
    if state.broker.ready:
        return Response({"status": "ready", "models": state.broker.registry.models()})
    return Response({"status": "not ready", "reason": "not connected to the message broker"}, status_code=503)


@get("/metrics", include_in_schema=False)
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def _refused(request: Request, status: int, outcome: str = "rejected") -> dict[str, str]:
    """Record a request that ended in an error response; its x-request-id header (if it had one)."""
    record: RequestRecord | None = request.state.get("record")
    if record is None:
        return {}
    if not record.ended:
        record.rejected(status, outcome)
        record_refusal(record, status, outcome)  # the tenant's ledger lists refused requests too
    return {"x-request-id": record.request_id}


def _api_error(request: Request, exc: APIError) -> Response:
    headers = {**_refused(request, exc.status), **exc.headers}
    return Response(exc.body(), status_code=exc.status, media_type=JSON, headers=headers)


def _http_error(request: Request, exc: HTTPException) -> Response:
    _refused(request, exc.status_code)
    message = exc.detail or "Request failed."
    if exc.status_code == 404:
        message = "Not found. See /v1/models, /v1/chat/completions, /v1/completions and /v1/embeddings."
    elif exc.status_code == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}."
    elif exc.status_code == 413:
        message = "The request body is too large."
    return Response(error_body(exc.status_code, message), status_code=exc.status_code, media_type=JSON)


def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path, exc_info=exc)
    return Response(
        error_body(500, "The server had an error processing your request."),
        status_code=500,
        media_type=JSON,
        headers=_refused(request, 500, "error"),
    )


async def _listen_for_invalidations(client: aioredis.Redis, auth: TokenAuthenticator) -> None:
    """Drop cached tokens the moment `dispatcher tokens` changes them."""
    failing = False
    while True:
        try:
            async with client.pubsub() as pubsub:
                await pubsub.subscribe(INVALIDATE_CHANNEL)
                if failing:  # changes may have been announced while we were not listening
                    log.warning("token invalidation listener: subscribed again")
                    auth.invalidate(keep_known=True)
                    failing = False
                async for message in pubsub.listen():
                    if message["type"] == "message":
                        auth.invalidate(message["data"].decode())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Redis down: caches expire on their own meanwhile (logged once)
            if not failing:
                log.warning("token invalidation listener: %s; retrying every 2s", type(exc).__name__)
            failing = True
            await asyncio.sleep(2)


def create_app(settings: GatewaySettings | None = None) -> Litestar:
    settings = settings or GatewaySettings()
    gateway_metrics()  # registered now, so /metrics lists them before the first request

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        # Every Redis and SQL call is bounded; each dependency has a degraded mode (dispatcher.dependency).
        store = TokenStore(settings.database_url, timeout=settings.sql_timeout)
        redis = shared_redis(settings.redis_url, settings.redis_timeout) if settings.redis_url else None
        redis_health = redis_dependency(redis, settings.redis_timeout) if redis is not None else None
        auth = TokenAuthenticator(store, redis, local_ttl=settings.token_cache_ttl, redis_health=redis_health)
        limits = RateLimiter(
            redis,
            window=settings.rate_limit_window,
            max_queued=settings.max_queued_per_token,
            expiry=settings.queue_timeout + 600,  # a request counts as in flight at most this long
            max_streams=settings.max_streams_per_token,
            health=redis_health,
        )
        broker = GatewayBroker(settings)
        broker.on_billed = limits.billed  # TPM charges what the workers bill, also after the client left
        app.state.update(settings=settings, store=store, auth=auth, broker=broker, limits=limits)
        listener = asyncio.create_task(_listen_for_invalidations(redis, auth)) if redis else None
        metrics_port = MetricsPort(settings.host, settings.metrics_port) if settings.metrics_port > 0 else None
        if metrics_port is not None:
            metrics_port.start()
        await broker.start()
        # What start-up made lives as long as the process: out of the collector's way. And fewer,
        # larger young collections: a stream allocates a little per token, and nearly all of it dies young.
        gc.freeze()
        gc.set_threshold(5_000, 10, 10)
        try:
            yield
        finally:
            if metrics_port is not None:
                metrics_port.stop()
            if listener:
                listener.cancel()
            await broker.stop()
            await close_ledger()  # refusal records not confirmed yet: sent now, not by the next gateway
            await limits.drain()
            await auth.close()
            if redis is not None:
                await redis.aclose()
            await store.close()

    routes = [chat_completions, completions, embeddings, list_models, get_model, health, ready]
    return Litestar(
        # /metrics on the API port only when the metrics port is 0 (see gateway.metrics_port); a negative
        # port: none at all (a process of `--workers N`, whose parent serves them all).
        route_handlers=[*routes, metrics] if settings.metrics_port == 0 else routes,
        lifespan=[lifespan],
        exception_handlers={APIError: _api_error, HTTPException: _http_error, Exception: _internal_error},
        request_max_body_size=settings.max_body_bytes,
        # Logging is set up by dispatcher.logs (text or JSON); Litestar's default config would replace it.
        logging_config=None,
    )
