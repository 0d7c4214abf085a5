"""The worker's own small HTTP port: /health, /ready and /metrics for Kubernetes and Prometheus."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llmdispatch.processes import multiprocess_registry

if TYPE_CHECKING:
    from llmdispatch.worker.main import Worker


def create_app(worker: Worker) -> Starlette:
    async def health(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(_: Request) -> Response:
        status = {
            "worker": worker.id,
            "model": worker.settings.model,
            "vllm_healthy": worker.vllm_healthy,
            "accepting": worker.accepting,
            "free_slots": worker.free_slots,
        }
        return JSONResponse(status, status_code=200 if worker.ready else 503)

    # One of several processes (--processes N): every sibling's metrics, summed.
    registry = multiprocess_registry() or REGISTRY

    async def metrics(_: Request) -> Response:
        worker.accounting.refresh()  # this process's state gauges as of now (its siblings': their last probe)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[Route("/health", health), Route("/ready", ready), Route("/metrics", metrics)])


class EmbeddedServer(uvicorn.Server):
    """uvicorn inside our own event loop: signals stay with the worker, not with uvicorn."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
