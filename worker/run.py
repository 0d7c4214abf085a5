"""Run a worker until SIGTERM/SIGINT, then drain it gracefully."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal

import uvicorn

from dispatcher.settings import WorkerSettings
from worker.http import EmbeddedServer, create_app
from worker.main import Worker

log = logging.getLogger("dispatcher.worker")


async def serve(settings: WorkerSettings) -> None:
    worker = Worker(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    config = uvicorn.Config(
        create_app(worker), host=settings.http_host, port=settings.http_port, log_level="warning", lifespan="off"
    )
    server = EmbeddedServer(config)
    http = asyncio.create_task(_serve_http(server))
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


async def _serve_http(server: uvicorn.Server) -> None:
    try:
        await server.serve()
    except SystemExit:  # uvicorn exits the process when it cannot bind: we stop in order instead
        log.error("cannot listen on %s:%d (in use?)", server.config.host, server.config.port)
