"""Run a worker until SIGTERM/SIGINT, then drain it gracefully; or several (``--processes N``)."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import sys

import uvicorn

from llmdispatch import processes
from llmdispatch.processes import metrics_directory, port_free, reuse_port_socket, split
from llmdispatch.settings import WorkerSettings
from llmdispatch.worker.http import EmbeddedServer, create_app
from llmdispatch.worker.main import Worker

log = logging.getLogger("dispatcher.worker")


async def serve(settings: WorkerSettings, *, reuse_port: bool = False) -> None:
    worker = Worker(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    config = uvicorn.Config(
        create_app(worker), host=settings.http_host, port=settings.http_port, log_level="warning", lifespan="off"
    )
    server = EmbeddedServer(config)
    sockets = [reuse_port_socket(settings.http_host, settings.http_port)] if reuse_port else None
    http = asyncio.create_task(_serve_http(server, sockets))
    await asyncio.sleep(0)  # let uvicorn try to bind before anything else starts
    await worker.start()
    # What exists now (modules, settings, connections) lives as long as the process: keep it out of
    # the collector's full passes, which otherwise walk it all again and again under load.
    gc.freeze()
    http.add_done_callback(lambda _: stop.set())  # uvicorn gave up (port taken): stop as well
    await stop.wait()
    if http.done() and not server.should_exit:
        await worker.stop()
        raise SystemExit(f"the worker's port {settings.http_host}:{settings.http_port} is not available")
    log.info("stopping: finishing %d running requests (up to %.0fs)", len(worker.jobs), settings.shutdown_grace)
    await worker.drain(settings.shutdown_grace)
    await worker.stop()
    server.should_exit = True
    await http


async def _serve_http(server: uvicorn.Server, sockets: list[socket.socket] | None) -> None:
    try:
        await server.serve(sockets=sockets)
    except SystemExit:  # uvicorn exits the process when it cannot bind: we stop in order instead
        log.error("cannot listen on %s:%d (in use?)", server.config.host, server.config.port)


def supervise(settings: WorkerSettings) -> int:
    """``--processes N``: N workers beside the same server, as one. Each takes its share of
    ``max_concurrency`` and of the priority headroom (24 and 8 over two: 12 and 4 each), so vLLM sees
    no more sequences than one worker would send; they share the HTTP port, and any of them answers
    /metrics with the sum of all."""
    count = max(1, min(settings.processes, settings.max_concurrency))
    if not port_free(settings.http_host, settings.http_port):
        return 1
    with metrics_directory("dispatcher-worker-metrics-") as metrics_dir:
        # What the supervisor was told on its command line, the children get from their environment.
        env = {
            **os.environ,
            "PROMETHEUS_MULTIPROC_DIR": metrics_dir,
            "DISPATCHER_MODEL": settings.model,
            "DISPATCHER_VLLM_URL": settings.vllm_url,
            "DISPATCHER_BACKEND": settings.backend,
            "DISPATCHER_VLLM_PRIORITY": str(settings.vllm_priority).lower(),
            "DISPATCHER_WORKER_HOST": settings.http_host,
            "DISPATCHER_WORKER_PORT": str(settings.http_port),
            "DISPATCHER_RESERVED_SLOTS": "0",  # its share of the headroom is on each child's command line
        }
        child = [sys.executable, "-m", "llmdispatch.cli", "worker", "--reuse-port", "--processes", "1"]
        shares = zip(split(settings.max_concurrency, count), split(settings.headroom, count), strict=True)
        commands = [
            [*child, "--max-concurrency", str(concurrency), "--priority-headroom", str(headroom)]
            for concurrency, headroom in shares
        ]
        return processes.supervise("worker", commands, env, metrics_dir)
