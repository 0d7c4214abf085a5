"""A real Prometheus scraping a real stack: every query of the dashboard returns data, and every series
the alert rules read exists with the labels they match.

The stack (simulator, worker, gateway, usage ledger) runs a 30 s load of streams at a normal and an
express priority, non-streamed requests, errors, clients leaving mid-stream, a rate-limited tenant and a
request for an unknown model; halfway through, the worker is killed and started again. Prometheus
(Debian's package, scripts/install-prometheus.sh) scrapes the gateway and the worker every second on
free ports and evaluates the chart's rules (rendered by helm).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from tests.stack import STREAM_URL, Process, Stack, delete_stream, free_port, run_sync, wait_http
from tests.test_alerts import ENABLED, rendered_rule

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "helm" / "dispatcher" / "dashboards" / "dispatcher.json"
LOAD_SECONDS = 30.0
EXPRESS_PRIORITY = 9  # at or above DISPATCHER_EXPRESS_PRIORITY (8): the express lane


def query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    url = prometheus + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:  # a query Prometheus refuses: say which, and why
        raise AssertionError(f"{expr}: {exc.read().decode()}") from None
    assert answer["status"] == "success", (expr, answer)
    return answer["data"]["result"]


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def selectors(expr: str) -> set[str]:
    """The metric selectors (name and matchers) of a PromQL expression."""
    found = set()
    for match in re.finditer(r"\b(dispatcher[a-z_:0-9]*)(\{[^}]*\})?", expr):
        found.add(match.group(1) + (match.group(2) or ""))
    return found


class Load:
    """Clients of the stack: what each kind of request got, for the report and the assertions."""

    def __init__(self, stack: Stack, tokens: dict[str, str]) -> None:
        self.stack = stack
        self.clients = {
            name: openai.AsyncOpenAI(base_url=stack.gateway_url + "/v1", api_key=key, max_retries=0, timeout=30)
            for name, key in tokens.items()
        }
        self.counts: dict[str, int] = {}

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    async def stream(self, tenant: str, *, max_tokens: int = 30, leave_after: int = 0, **extra: Any) -> None:
        try:
            stream = await self.clients[tenant].chat.completions.create(
                model=extra.pop("model", self.stack.model),
                messages=[{"role": "user", "content": "hello"}],
                max_tokens=max_tokens,
                stream=True,
                **extra,
            )
            chunks = 0
            async for _ in stream:
                chunks += 1
                if leave_after and chunks >= leave_after:
                    await stream.close()  # the client leaves mid-stream
                    self.count("left")
                    return
            self.count("streamed")
        except openai.APIStatusError as exc:
            self.count(f"status {exc.status_code}")
        except openai.APIError as exc:
            self.count(type(exc).__name__)

    async def whole(self, tenant: str) -> None:
        try:
            await self.clients[tenant].chat.completions.create(
                model=self.stack.model, messages=[{"role": "user", "content": "hello"}], max_tokens=10
            )
            self.count("whole")
        except openai.APIError as exc:
            self.count(type(exc).__name__)

    async def round(self) -> None:
        await asyncio.gather(
            *(self.stream("normal") for _ in range(3)),
            self.stream("express"),
            self.whole("normal"),
            self.stream("normal", user="simulate-error-500"),
            self.stream("normal", max_tokens=400, leave_after=3),
            self.stream("limited"),
            self.stream("normal", model="no-such-model"),
        )

    async def close(self) -> None:
        for client in self.clients.values():
            await client.close()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    stream = "test-usage-" + uuid.uuid4().hex[:10]
    stack = Stack(
        tmp_path,
        env={
            "DISPATCHER_USAGE_STREAM_URL": STREAM_URL,
            "DISPATCHER_USAGE_STREAM_NAME": stream,
            "DISPATCHER_USAGE_WAL": str(tmp_path / "usage.wal"),
        },
    )
    try:
        yield stack
    finally:
        stack.close()
        run_sync(lambda: delete_stream(stream))


def start_worker(stack: Stack, port: int) -> Process:
    process = stack.spawn(
        "worker",
        "worker", "--model", stack.model, "--vllm-url", stack.simulator_url + "/v1",
        "--max-concurrency", "6", "--priority-headroom", "2", "--http-port", str(port),
    )  # fmt: skip
    wait_http(f"http://127.0.0.1:{port}/ready")
    return process


def start_prometheus(tmp: Path, targets: list[str], rules: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("no prometheus: run `bash scripts/install-prometheus.sh`")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [{"job_name": "dispatcher", "static_configs": [{"targets": targets}]}],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp / "prometheus.log").open("wb")
    popen = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/-/ready", timeout=30)
    return popen, url


async def test_every_dashboard_query_has_data_and_alerts_read_real_series(stack: Stack, tmp_path: Path) -> None:
    started = time.monotonic()
    rules = tmp_path / "rules.yaml"
    spec = rendered_rule(ENABLED)["spec"]
    rules.write_text(yaml.safe_dump(spec))
    stack.start_simulator(max_num_seqs=16, decode_ms=5)
    worker_port = free_port()
    worker = start_worker(stack, worker_port)
    stack.start_gateway()
    tokens = {
        "normal": stack.add_token("prom-normal", priority=3),
        "express": stack.add_token("prom-express", priority=EXPRESS_PRIORITY),
        "limited": stack.add_token("prom-limited", priority=3, rpm=2),
    }
    gateway = stack.gateway_url.removeprefix("http://")
    prometheus, prom_url = start_prometheus(tmp_path, [gateway, f"127.0.0.1:{worker_port}"], rules)
    load = Load(stack, tokens)
    try:
        load_started, wall_started = time.monotonic(), time.time()
        restarted = False
        while time.monotonic() - load_started < LOAD_SECONDS:
            await load.round()
            if not restarted and time.monotonic() - load_started > LOAD_SECONDS / 2:
                # The worker dies with requests in flight and comes back on the same port.
                ongoing = asyncio.gather(*(load.stream("normal", max_tokens=200) for _ in range(3)))
                await asyncio.sleep(0.5)
                worker.popen.send_signal(signal.SIGKILL)
                worker.popen.wait(10)
                await asyncio.to_thread(start_worker, stack, worker_port)
                await ongoing
                restarted = True
        await asyncio.sleep(3)  # a few more scrapes and rule evaluations
        load_seconds = time.monotonic() - load_started

        dashboard = json.loads(DASHBOARD.read_text())
        substitutions = {"$model": stack.model, "$__rate_interval": "1m", "$ttft_objective": "2.5"}
        empty = []
        exprs = dashboard_exprs(dashboard)
        for expr in exprs:
            for variable, value in substitutions.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, expr
            if not query(prom_url, expr):
                empty.append(expr)
        assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
        models = query(prom_url, "count by (model) (dispatcher_requests_total)")
        assert stack.model in {m["metric"]["model"] for m in models}  # the $model variable's values

        # Alert rules: every expression evaluates, and every series they select exists.
        missing = []
        rule_exprs = [rule["expr"] for group in spec["groups"] for rule in group["rules"]]
        for expr in rule_exprs:
            query(prom_url, expr)
            missing += [s for s in selectors(expr) if not query(prom_url, f"count({s})")]
        assert not missing, f"the alert rules select series that do not exist: {sorted(set(missing))}"

        ended = {r["metric"]["reason"] for r in query(prom_url, "dispatcher_streams_ended_total > 0")}
        lanes = {r["metric"]["lane"] for r in query(prom_url, "dispatcher_queue_wait_seconds_count > 0")}
        print(
            f"\nload {load_seconds:.1f} s: {dict(sorted(load.counts.items()))}; stream end reasons seen: "
            f"{sorted(ended)}; {len(exprs)} dashboard queries, {len(rule_exprs)} rule expressions; "
            f"test {time.monotonic() - started:.1f} s"
        )
        assert {"completed", "client_left", "upstream_error"} <= ended
        assert lanes == {"normal", "express"}
        assert load.counts.get("status 429") and load.counts.get("status 404") and load.counts.get("left")
        if picture := os.environ.get("DISPATCHER_DASHBOARD_PNG"):  # how docs/dashboard.png is made
            sys.path.insert(0, str(DASHBOARD.parents[3] / "grafana"))
            try:
                import snapshot
            finally:
                sys.path.pop(0)
            snapshot.draw(
                prom_url,
                dashboard,
                {**substitutions, "$__rate_interval": "5s"},
                wall_started,
                time.time(),
                Path(picture),
            )
    finally:
        await load.close()
        prometheus.terminate()
        prometheus.wait(10)
