"""Several processes of one service, run as one: ``dispatcher gateway --workers N`` and
``dispatcher worker --processes N``.

Each child is a whole service (its own event loop and AMQP connections) listening on a port it shares
with its siblings (SO_REUSEPORT: the kernel spreads connections over them). The children write their
metrics to a directory of the supervisor's (prometheus_client's multiprocess mode), so that whoever
reads it serves their sum. Signals are passed on, so every child drains as a single process would; a
child that dies later is replaced, one that dies at start stops them all (restarting would only loop).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger("dispatcher.processes")

START_GRACE = 5.0  # s: a child that exits sooner crashed at start


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A listening socket that other processes can bind too: the kernel spreads connections over them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def port_free(host: str, port: int) -> bool:
    """Whether the children will be able to listen there (checked once, in the supervisor)."""
    try:
        reuse_port_socket(host, port).close()
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", host, port, exc)
        return False
    return True


def split(total: int, parts: int) -> list[int]:
    """``total`` shared as evenly as possible: split(10, 3) == [4, 3, 3]."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


@contextlib.contextmanager
def metrics_directory(prefix: str) -> Iterator[str]:
    """A directory for the children's metrics files, removed when they are all gone."""
    path = tempfile.mkdtemp(prefix=prefix)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# Loaded here, not in the forked child: between fork and exec only a bare C call is safe.
_LIBC = ctypes.CDLL(None) if sys.platform == "linux" else None


def die_with_parent() -> None:
    """In a child, before exec: get SIGTERM when its parent dies (Linux), so none is left orphaned."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def supervise(name: str, commands: list[list[str]], env: dict[str, str], metrics_dir: str) -> int:
    """Run one child per command until SIGTERM/SIGINT; returns their exit code.

    ``env`` must carry ``PROMETHEUS_MULTIPROC_DIR=metrics_dir``: a dead child's live gauges are
    removed from it.
    """

    def spawn(command: list[str]) -> subprocess.Popen[bytes]:
        # A session of its own: a terminal's Ctrl-C reaches the supervisor only, which passes it on once.
        return subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=die_with_parent)

    children = {spawn(command): (command, time.monotonic()) for command in commands}
    log.info("%s: %d processes", name, len(children))
    stopping: list[int] = []

    def on_signal(sig: int, _: FrameType | None) -> None:
        stopping.append(sig)
        for child in children:
            if child.poll() is None:
                child.send_signal(sig)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = 0
    while children:
        time.sleep(0.2)
        for child, (command, started) in list(children.items()):
            if child.poll() is None:
                continue
            del children[child]
            _forget(metrics_dir, child.pid)
            if stopping:
                code = code or (child.returncode if child.returncode > 0 else 0)
            elif time.monotonic() - started < START_GRACE:
                log.error("a %s process exited at start (code %s): stopping", name, child.returncode)
                code = 1
                on_signal(signal.SIGTERM, None)
            else:
                log.warning("a %s process exited (code %s): starting another", name, child.returncode)
                children[spawn(command)] = (command, time.monotonic())
    return code


def _forget(metrics_dir: str, pid: int) -> None:
    from prometheus_client.multiprocess import mark_process_dead

    mark_process_dead(pid, metrics_dir)


def summed_registry(metrics_dir: str) -> CollectorRegistry:
    """The metrics of every process writing to ``metrics_dir``, summed (gauges by their mode)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=metrics_dir)
    return registry


def multiprocess_registry() -> CollectorRegistry | None:
    """In a child of ``supervise``: its siblings' metrics and its own, summed; else None."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return summed_registry(path) if path else None
