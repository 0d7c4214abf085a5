"""Issue 13 hardening: private metrics, bounded labels, the token cache under a flood of random tokens,
the tokens CLI (sync --dry-run/--no-revoke, delete), per-tenant cache salts, and `dispatcher up` as a
supervisor. Real processes, Redis and SQL throughout."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client import REGISTRY

from llmdispatch.amqp import delete_model_queue
from llmdispatch.errors import APIError
from llmdispatch.gateway.auth import TokenAuthenticator, shared_redis
from llmdispatch.metrics import gateway_metrics
from llmdispatch.settings import WorkerSettings
from llmdispatch.tokens import TokenStore
from llmdispatch.worker.tenancy import cache_salt, salt_body, salt_key
from tests.stack import AMQP_URL, REDIS_URL, Stack, delete_stream, free_port, run_sync, wait_http
from tests.test_tenancy import fresh_database, run_cli  # noqa: F401 (fresh_database is a fixture)


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


# -- private metrics, bounded labels -------------------------------------------------------------------


def test_metrics_on_their_own_port_without_token_names(make_stack: type[Stack]) -> None:
    stack = make_stack(env={"DISPATCHER_PER_TOKEN_METRICS": "false"})
    stack.start_simulator(decode_ms=2)
    worker = stack.start_worker()
    metrics_port = free_port()
    gateway = stack.start_gateway(env={"DISPATCHER_METRICS_PORT": str(metrics_port)})
    secret = stack.add_token("private-tenant", priority=3)
    auth = {"Authorization": f"Bearer {secret}"}
    body = {"model": stack.model, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
    long_name = "no-such-model-" + "x" * 180  # a possible name (at most 200 characters), served by no one
    with httpx.Client(base_url=stack.gateway_url, headers=auth, timeout=30) as http:
        assert http.post("/v1/chat/completions", json=body).status_code == 200
        unknown = http.post("/v1/chat/completions", json={**body, "model": long_name})
        assert unknown.status_code == 404

    # The API port (what an Ingress routes) has no /metrics; the metrics port has them.
    assert http_get(stack.gateway_url + "/metrics")[0] == 404
    status, text = http_get(f"http://127.0.0.1:{metrics_port}/metrics")
    assert status == 200
    assert f'dispatcher_requests_total{{model="{stack.model}",outcome="ok",token=""}} 1.0' in text
    assert 'dispatcher_requests_total{model="unknown",outcome="rejected",token=""} 1.0' in text
    assert "private-tenant" not in text and long_name[:20] not in text
    worker_text = http_get(worker.url + "/metrics")[1]  # type: ignore[attr-defined]
    assert f'dispatcher_worker_requests_total{{model="{stack.model}",outcome="ok",token=""}} 1.0' in worker_text
    assert "private-tenant" not in worker_text

    # The log line names the model that was asked for, cut to 64 characters; and the tenant.
    deadline = time.monotonic() + 5
    while long_name[:64] not in gateway.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = gateway.log()
    assert long_name[:64] in log and long_name[:65] not in log
    assert "token=private-tenant" in log


def test_gateway_processes_serve_no_metrics_on_the_api_port(make_stack: type[Stack]) -> None:
    """With --workers N the parent serves the sum on the metrics port; the API port has none."""
    stack = make_stack()
    api, metrics = free_port(), free_port()
    env = {"DISPATCHER_METRICS_PORT": str(metrics), "DISPATCHER_GATEWAY_WORKERS": "2"}
    stack.spawn("gateway", "gateway", "--port", str(api), env=env)
    wait_http(f"http://127.0.0.1:{api}/ready")
    wait_http(f"http://127.0.0.1:{metrics}/metrics")
    for _ in range(10):  # whichever process answers
        assert http_get(f"http://127.0.0.1:{api}/metrics")[0] == 404
        assert httpx.post(f"http://127.0.0.1:{api}/v1/chat/completions", json={}, timeout=10).status_code == 401
    text = http_get(f"http://127.0.0.1:{metrics}/metrics")[1]
    assert 'dispatcher_requests_total{model="",outcome="rejected",token=""} 10.0' in text, text[:2000]


def test_metrics_port_taken_stops_the_gateway_with_a_clear_error(make_stack: type[Stack]) -> None:
    stack = make_stack()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        gateway = stack.spawn(
            "gateway", "gateway", "--port", str(free_port()), env={"DISPATCHER_METRICS_PORT": str(port)}
        )
        assert gateway.popen.wait(30) != 0
    assert f"cannot serve /metrics on 127.0.0.1:{port}" in gateway.log()


# -- the token cache under a flood of random tokens ----------------------------------------------------


def lookups(source: str) -> float:
    return REGISTRY.get_sample_value("dispatcher_token_lookups_total", {"source": source}) or 0.0


async def test_random_token_flood_keeps_valid_tokens_and_bounds_sql(tmp_path: Path) -> None:
    gateway_metrics()  # the counters live in this (test) process's registry
    store = TokenStore(f"sqlite+aiosqlite:///{tmp_path / 'flood.db'}")
    redis = shared_redis(REDIS_URL)  # as the gateway makes it
    valid = {f"flood-{i}": await store.add(f"flood-{i}", 5) for i in range(3)}
    rate, flood = 50.0, 5000
    auth = TokenAuthenticator(store, redis, local_ttl=60, max_entries=1000, sql_lookups_per_second=rate)
    try:
        for secret in valid.values():
            await auth.authenticate(f"Bearer {secret}")
        sql_before, refused_before = lookups("sql"), lookups("refused")
        outcomes: dict[int, int] = {}

        async def attempt(secret: str) -> None:
            try:
                await auth.authenticate(f"Bearer {secret}")
                outcomes[200] = outcomes.get(200, 0) + 1
            except APIError as exc:
                outcomes[exc.status] = outcomes.get(exc.status, 0) + 1

        random_tokens = ["sk-" + secrets.token_urlsafe(24) for _ in range(flood)]
        started = time.monotonic()
        for i in range(0, flood, 250):  # 250 at once, like many concurrent clients
            await asyncio.gather(*(attempt(t) for t in random_tokens[i : i + 250]))
        elapsed = time.monotonic() - started
        sql = lookups("sql") - sql_before
        refused = lookups("refused") - refused_before

        # Valid tokens were not pushed out by 5,000 unknown ones (in a cache of 1,000 entries):
        # they are answered from this process's cache, without Redis or SQL.
        cache_before, sql_mid = lookups("cache"), lookups("sql")
        for name, secret in valid.items():
            assert (await auth.authenticate(f"Bearer {secret}")).name == name
        assert lookups("cache") - cache_before == len(valid) and lookups("sql") == sql_mid
        # A token just found unknown is not looked up again for a moment (negative cache, 2 s). The
        # flood may have spent the SQL budget: let it refill, so the first try reaches SQL.
        await asyncio.sleep(1.1)
        unknown = "sk-" + secrets.token_urlsafe(24)
        with pytest.raises(APIError):
            await auth.authenticate(f"Bearer {unknown}")
        negative_before, sql_before_again = lookups("negative_cache"), lookups("sql")
        with pytest.raises(APIError):
            await auth.authenticate(f"Bearer {unknown}")
        assert lookups("negative_cache") - negative_before == 1 and lookups("sql") == sql_before_again
    finally:
        await redis.aclose()  # the flood's Redis entries are negative ones: they expire in 2 s
        await store.close()
    print(
        f"\nrandom-token flood: {flood} random tokens in {elapsed:.2f}s; SQL lookups {sql:.0f} "
        f"(budget {rate:.0f}/s + burst {rate:.0f}), refused with 503 {refused:.0f}; outcomes {outcomes}; "
        f"{len(valid)} valid tokens still cached"
    )
    assert outcomes.get(200, 0) == 0 and sum(outcomes.values()) == flood
    assert sql <= rate + rate * elapsed + 1  # bounded by the budget, not by the flood
    assert sql + refused == flood  # every random token missed Redis, then went to SQL or was refused


# -- tokens CLI ----------------------------------------------------------------------------------------


def test_tokens_sync_dry_run_no_revoke_and_delete(fresh_database: Stack) -> None:  # noqa: F811
    db = fresh_database
    run_cli(db, "add", "old-app", "--priority", "2")
    run_cli(db, "add", "keep-app", "--priority", "4")
    sync_file = db.tmp / f"tokens-{uuid.uuid4().hex[:6]}.yaml"
    sync_file.write_text(
        "tokens:\n"
        "  - name: keep-app\n    token: sk-keep-0001\n    priority: 6\n"
        "  - name: new-app\n    token: sk-new-0002\n    priority: 1\n"
    )

    def statuses() -> dict[str, list[str]]:
        listing = run_cli(db, "list").stdout
        return {line.split()[0]: line.split()[1:] for line in listing.splitlines()[1:]}

    before = statuses()
    dry = run_cli(db, "sync", "--dry-run", str(sync_file)).stdout
    assert "would add new-app" in dry and "would change keep-app" in dry and "would revoke old-app" in dry
    assert "1 added, 1 changed, 1 revoked, 0 unchanged" in dry
    assert statuses() == before  # nothing written

    kept = run_cli(db, "sync", "--no-revoke", str(sync_file)).stdout
    assert "1 added, 1 changed, 0 revoked, 0 unchanged" in kept
    rows = statuses()
    assert rows["old-app"][-1] == "active" and rows["keep-app"][0] == "6" and rows["new-app"][-1] == "active"

    synced = run_cli(db, "sync", str(sync_file)).stdout
    assert "0 added, 0 changed, 1 revoked, 2 unchanged" in synced
    assert statuses()["old-app"][-1] == "revoked"

    # A revoked name cannot be added again until it is deleted.
    assert run_cli(db, "add", "old-app", check=False).returncode != 0
    assert "Deleted token 'old-app'" in run_cli(db, "delete", "old-app").stdout
    assert "old-app" not in statuses()
    run_cli(db, "add", "old-app", "--priority", "3")
    assert statuses()["old-app"][0] == "3" and statuses()["old-app"][-1] == "active"
    missing = run_cli(db, "delete", "nobody", check=False)
    assert missing.returncode != 0 and "no token named 'nobody'" in missing.stderr


def test_a_tokens_table_of_an_older_release_gets_the_new_columns(fresh_database: Stack) -> None:  # noqa: F811
    """A table made before the limits columns existed: the first command adds them (additive migration)."""
    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import create_async_engine

    db = fresh_database

    async def create_old_table() -> None:
        engine = create_async_engine(db.database_url or "")
        try:
            async with engine.begin() as conn:
                await conn.execute(sa.text(
                    "CREATE TABLE dispatcher_tokens (name VARCHAR(128) PRIMARY KEY, token_hash VARCHAR(64) NOT NULL "
                    "UNIQUE, priority INTEGER NOT NULL, revoked BOOLEAN NOT NULL, created_at TIMESTAMP NOT NULL)"
                ))  # fmt: skip
                await conn.execute(sa.text(
                    "INSERT INTO dispatcher_tokens VALUES ('legacy', :h, 4, false, CURRENT_TIMESTAMP)"
                ), {"h": "0" * 64})  # fmt: skip
        finally:
            await engine.dispose()

    run_sync(create_old_table)
    listing = run_cli(db, "list").stdout
    assert listing.splitlines()[1].split() == ["legacy", "4", "-", "-", "-", "active"]
    run_cli(db, "set-limits", "legacy", "--rpm", "60")
    assert run_cli(db, "list").stdout.splitlines()[1].split()[2] == "60"


# -- per-tenant cache salt -----------------------------------------------------------------------------


def test_cache_salt_is_per_tenant_and_keyed() -> None:
    a, b = cache_salt("tenant-a", "key-1"), cache_salt("tenant-b", "key-1")
    assert a == cache_salt("tenant-a", "key-1") and a != b  # stable per tenant, distinct between them
    assert cache_salt("tenant-a", "key-2") != a  # depends on the server secret
    assert len(a) == 64 and int(a, 16) >= 0 and "tenant-a" not in a
    body: dict[str, object] = {"cache_salt": b}  # a tenant cannot borrow another's salt
    salt_body(body, "tenant-a", "key-1")
    assert body["cache_salt"] == a
    off: dict[str, object] = {}
    salt_body(off, "tenant-a", None)
    assert off == {}
    settings = WorkerSettings()
    settings.cache_salt, settings.cache_salt_key = True, ""
    with pytest.raises(ValueError, match="CACHE_SALT_KEY"):
        salt_key(settings)
    settings.cache_salt = False
    assert salt_key(settings) is None


def test_a_body_with_cache_salt_is_served(stack: Stack) -> None:
    """The simulator (like vLLM >= 0.9) accepts the field and does not echo it."""
    body = {
        "model": stack.model,
        "max_tokens": 3,
        "cache_salt": cache_salt("tests", "k"),
        "messages": [{"role": "user", "content": "hi"}],
    }
    response = httpx.post(
        stack.gateway_url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {stack.token}"},
        timeout=30,
    )
    assert response.status_code == 200 and "cache_salt" not in response.text


# -- dispatcher up as a supervisor ---------------------------------------------------------------------


class Up:
    """`dispatcher up` in a process of its own session (like a shell job), its output collected."""

    def __init__(self, tmp: Path, *extra: str) -> None:
        self.model = "test-up-" + uuid.uuid4().hex[:8]
        self.ports = {name: free_port() for name in ("port", "metrics-port", "simulator-port", "worker-port")}
        flags = dict(zip(extra[::2], extra[1::2], strict=True))
        self.ports.update({k.removeprefix("--"): int(v) for k, v in flags.items() if k.endswith("port")})
        self.env = self.environment(tmp)
        args = [arg for name, port in self.ports.items() for arg in (f"--{name}", str(port))]
        args += [arg for flag, value in flags.items() if not flag.endswith("port") for arg in (flag, value)]
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "llmdispatch.cli", "up", "--model", self.model, "--ready-timeout", "40", *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.up = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    @staticmethod
    def environment(tmp: Path) -> dict[str, str]:
        """A user of its own: local state (token database, up.json, usage WAL) under ``tmp``, this code."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DISPATCHER_", "XDG_"))}
        root = str(Path(__file__).resolve().parents[1])
        env.update(DISPATCHER_AMQP_URL=AMQP_URL, PYTHONPATH=root, XDG_DATA_HOME=str(tmp / "xdg-data"),
                   XDG_STATE_HOME=str(tmp / "xdg-state"), XDG_CONFIG_HOME=str(tmp / "xdg-config"))  # fmt: skip
        return env

    def secret(self) -> str:
        """The token of the banner's curl line."""
        match = re.search(r"Bearer (\S+)'", self.output)
        assert match, self.output[-3000:]
        return match.group(1)

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            if line.startswith("Press Ctrl-C to stop"):  # the banner's last line
                self.up.set()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def leftovers(self) -> list[str]:
        """Processes still running that belong to this run (its model name is on their command line)."""
        found = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmdline = proc.info["cmdline"] or []
            if self.model in cmdline and proc.pid != self.popen.pid:
                found.append(" ".join(cmdline))
        return found

    def close(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()
        run_sync(lambda: delete_model_queue(AMQP_URL, self.model))
        state = Path(self.env["XDG_STATE_HOME"]) / "dispatcher" / "up.json"
        name = json.loads(state.read_text()).get("usage_stream_name") if state.exists() else None
        if name:  # the usage stream of this user's `up`
            run_sync(lambda: delete_stream(name))


@pytest.fixture
def up_runs(tmp_path: Path) -> Iterator[list[Up]]:
    runs: list[Up] = []
    yield runs
    for run in runs:
        run.close()


def test_up_fails_fast_naming_the_worker_whose_port_is_taken(tmp_path: Path, up_runs: list[Up]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        up = Up(tmp_path, "--worker-port", str(taken.getsockname()[1]))
        up_runs.append(up)
        code = up.popen.wait(60)
    assert code != 0
    out = up.output
    assert "error: the worker stopped" in out, out[-3000:]
    assert "address already in use" in out.lower().split("error: the worker stopped", 1)[1]  # its last lines
    assert "choose another one with --worker-port" in out  # the flag that moves it
    assert "dispatcher is up" not in out
    assert not up.leftovers()


@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C"])
def test_up_stops_every_child_on_sigterm_and_ctrl_c(tmp_path: Path, up_runs: list[Up], how: str) -> None:
    up = Up(tmp_path)
    up_runs.append(up)
    assert up.up.wait(90), up.output[-3000:]
    children = psutil.Process(up.popen.pid).children(recursive=True)
    assert len(children) >= 3  # simulator, gateway, worker
    api = f"http://127.0.0.1:{up.ports['port']}"
    assert http_get(api + "/health")[0] == 200 and http_get(api + "/metrics")[0] == 404  # metrics kept off it
    for port in (up.ports["metrics-port"], up.ports["worker-port"], up.ports["simulator-port"]):
        assert http_get(f"http://127.0.0.1:{port}/metrics")[0] == 200, port
    if how == "SIGTERM":
        up.popen.send_signal(signal.SIGTERM)
    else:  # a terminal's Ctrl-C signals the whole foreground process group
        os.killpg(up.popen.pid, signal.SIGINT)
    assert up.popen.wait(30) == 0, up.output[-3000:]
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, [p.cmdline() for p in alive]
    assert not up.leftovers()
    assert "Traceback" not in up.output, up.output[-3000:]
