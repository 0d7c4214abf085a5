"""A private 3-node RabbitMQ cluster on local ports, for failover tests.

Each node is a tests/rabbit_node.py node (own node name, AMQP and distribution ports, mnesia and
log directories, no plugins) and all share one Erlang cookie. The first node boots alone; the others
then boot in parallel and join it as they boot: their peer discovery (classic config) names only the
first node. That avoids a second boot (``stop_app; join_cluster; start_app`` afterwards, the fallback
if a node still ends up alone: 42 s for the cluster on a loaded 2-core box). Booting all three at once
is faster but races: a node joining the first one while it still boots makes it fail
("incompatible_feature_flags ... not active yet", RabbitMQ 3.10).
``stop(i)``/``start(i)`` stop and restart one node; ``close()`` stops them all and removes their
directories. The machine's broker is never touched.
"""

from __future__ import annotations

import concurrent.futures
import secrets
import time
import uuid
from pathlib import Path

from tests.rabbit_node import RabbitNode, available

__all__ = ["RabbitCluster", "available", "members"]


def members(node: RabbitNode) -> str:
    """The cluster members a node recorded (mnesia's ``cluster_nodes.config``: reading it takes
    microseconds, ``rabbitmqctl`` takes seconds just to start)."""
    path = node.base / "mnesia" / node.name / "cluster_nodes.config"
    return path.read_text() if path.exists() else ""


class RabbitCluster:
    def __init__(self, base: Path, size: int = 3) -> None:
        cookie = secrets.token_hex(16)
        tag = uuid.uuid4().hex[:6]
        names = [f"dispatcher-c{tag}-{i}@localhost" for i in range(size)]
        discovery = (
            "cluster_formation.peer_discovery_backend = classic_config\n"
            f"cluster_formation.classic_config.nodes.1 = {names[0]}\n"
            # Wait for the first node as long as it may take to boot (0.25 s x 240).
            "cluster_formation.discovery_retry_limit = 240\n"
            "cluster_formation.discovery_retry_interval = 250\n"
            "cluster_formation.randomized_startup_delay_range.min = 0\n"
            "cluster_formation.randomized_startup_delay_range.max = 1\n"
        )
        self.nodes = [
            RabbitNode(base, name=name, cookie=cookie, config=discovery if i else "") for i, name in enumerate(names)
        ]
        self.boot_seconds = 0.0  # the whole cluster, from nothing to joined and accepting connections

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """Every node, comma-separated: DISPATCHER_AMQP_URL for failover."""
        return ",".join(self.urls)

    def start(self, i: int | None = None) -> float:
        """Boot all nodes and cluster them, or (``i``) start one stopped node again: it rejoins from its
        own data. Returns the seconds it took."""
        if i is not None:
            return self.nodes[i].start()
        started = time.monotonic()
        try:
            first = self.nodes[0]
            first.start()
            with concurrent.futures.ThreadPoolExecutor(len(self.nodes)) as pool:
                list(pool.map(lambda node: node.start(), self.nodes[1:]))
                alone = [node for node in self.nodes[1:] if first.name not in members(node)]
                if alone:
                    list(pool.map(lambda node: self._join(node, first), alone))
                    self._check_members()
        except BaseException:
            self.close()
            raise
        self.boot_seconds = time.monotonic() - started
        return self.boot_seconds

    def _join(self, node: RabbitNode, seed: RabbitNode) -> None:
        node.ctl("stop_app", table=False)
        node.ctl("join_cluster", seed.name, table=False)
        node.ctl("start_app", table=False)
        node.ctl("await_startup", table=False)

    def _running(self) -> str:
        """The cluster's running nodes as the first node sees them (an Erlang list, as text)."""
        rows = self.nodes[0].ctl("eval", "rabbit_nodes:all_running().", table=False)
        return " ".join(" ".join(row) for row in rows)

    def _check_members(self) -> None:
        running = self._running()
        missing = [node.name for node in self.nodes if node.name not in running]
        if missing:
            raise RuntimeError(f"nodes not in the cluster: {missing} (running: {running})")

    def index_of(self, port: int) -> int:
        """The node listening on AMQP ``port``."""
        return next(i for i, node in enumerate(self.nodes) if node.port == port)

    def stop(self, i: int) -> None:
        """Stop node ``i`` cleanly (SIGTERM), as a rolling upgrade or a drained host does."""
        self.nodes[i].stop()

    def kill(self, i: int) -> None:
        self.nodes[i].kill()

    def close(self, *, discard: bool = False) -> None:
        """Stop every node and remove its files; ``discard``: SIGKILL, nothing in it is worth a clean stop."""
        with concurrent.futures.ThreadPoolExecutor(len(self.nodes)) as pool:
            if discard:
                list(pool.map(lambda node: node.kill(), self.nodes))
            list(pool.map(lambda node: node.close(), self.nodes))
