"""A private RabbitMQ node for broker-restart tests, on its own ports, data and log directories.

The machine's broker (rabbit@localhost, 5672) is never touched: this node has its own node name,
AMQP and distribution ports, mnesia directory, config, plugins file (no plugins, so nothing takes
15672 or 5552) and its own Erlang cookie in its own HOME. ``stop()`` ends it; ``close()`` also
kills the whole process group and removes nothing but what it created.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

RABBITMQ_BIN = Path(os.environ.get("DISPATCHER_TEST_RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def available() -> bool:
    return (RABBITMQ_BIN / "rabbitmq-server").exists()


class RabbitNode:
    """One node; ``name`` and ``cookie`` let several of them form a cluster (tests/rabbit_cluster.py)."""

    def __init__(self, base: Path, *, name: str | None = None, cookie: str | None = None, config: str = "") -> None:
        self.base = base / f"rabbit-{uuid.uuid4().hex[:8]}"
        self.name = name or f"dispatcher-test-{uuid.uuid4().hex[:8]}@localhost"
        self.port = _free_port()
        self.dist_port = _free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        self._process: subprocess.Popen[bytes] | None = None
        self.boot_seconds: list[float] = []
        home = self.base / "home"
        home.mkdir(parents=True)
        cookie_file = home / ".erlang.cookie"
        cookie_file.write_text(cookie or secrets.token_hex(16))
        cookie_file.chmod(0o400)
        (self.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
            "loopback_users.guest = true\n"
            "vm_memory_high_watermark.relative = 0.2\n"
            "disk_free_limit.absolute = 50MB\n" + config
        )
        (self.base / "enabled_plugins").write_text("[].\n")
        (self.base / "rabbitmq-env.conf").write_text("")
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))},
            "HOME": str(home),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(self.base / "rabbitmq-env.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.base / "advanced.config"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 60.0) -> float:
        """Boot the node; returns how long it took until it accepted AMQP connections."""
        started = time.monotonic()
        log = (self.base / "server.out").open("ab")
        self._process = subprocess.Popen(
            [str(RABBITMQ_BIN / "rabbitmq-server")],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.base,  # crash dumps (erl_crash.dump, MnesiaCore.*) land here, not in the caller's directory
            start_new_session=True,  # its own process group: close() kills beam, epmd children and all
        )
        while time.monotonic() - started < timeout:
            if self._process.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited: {self.log_tail()}")
            if _port_open(self.port):
                elapsed = time.monotonic() - started
                self.boot_seconds.append(elapsed)
                return elapsed
            time.sleep(0.1)
        self.close()
        raise TimeoutError(f"RabbitMQ node {self.name} did not listen on {self.port}: {self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the node the way an operator's restart would (SIGTERM: a clean broker shutdown)."""
        if self._process is None:
            return
        if self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGTERM)
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._wait_port_closed()

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()

    def restart(self, down_for: float = 0.0) -> float:
        self.stop()
        time.sleep(down_for)
        return self.start()

    def close(self) -> None:
        try:
            self.stop(timeout=15)
        finally:
            self.kill()
            shutil.rmtree(self.base, ignore_errors=True)

    def _wait_port_closed(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while _port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.1)

    def ctl(self, *args: str, table: bool = True) -> list[list[str]]:
        """``rabbitmqctl`` against this node; rows of tab-separated fields (``table=False``: commands
        such as ``stop_app`` that take no ``--no-table-headers``)."""
        headers = ["--no-table-headers"] if table else []
        result = subprocess.run(
            [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.name, "-q", *args, *headers],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return [line.split("\t") for line in result.stdout.splitlines() if line.strip()]

    def log_tail(self, chars: int = 2000) -> str:
        path = self.base / "server.out"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""
