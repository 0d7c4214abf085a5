"""The load-test kit: the locustfile runs headless for 30 s against `dispatcher up` without failures."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from llmdispatch.amqp import delete_model_queue
from llmdispatch.tokens import TokenStore
from tests.stack import AMQP_URL, REDIS_URL, free_port, run_sync

ROOT = Path(__file__).resolve().parent.parent
SECRET = re.compile(r"Bearer (\S+?)'")


@dataclass
class Up:
    url: str
    model: str
    secret: str
    database_url: str


@pytest.fixture
def dispatcher_up(tmp_path: Path) -> Iterator[Up]:
    model = "test-" + uuid.uuid4().hex[:10]
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'tokens.db'}"
    env.update(DISPATCHER_AMQP_URL=AMQP_URL, DISPATCHER_REDIS_URL=REDIS_URL, DISPATCHER_DATABASE_URL=database_url)
    log = tmp_path / "up.log"
    up = subprocess.Popen(
        [
            sys.executable, "-m", "llmdispatch.cli", "up", "--model", model, "--port", str(port),
            "--simulator-port", str(free_port()), "--worker-port", str(free_port()), "--max-concurrency", "32",
        ],
        env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 40
        while not (found := SECRET.search(log.read_text(errors="replace"))):
            assert up.poll() is None, f"dispatcher up exited:\n{log.read_text(errors='replace')}"
            assert time.monotonic() < deadline, f"dispatcher up did not come up:\n{log.read_text(errors='replace')}"
            time.sleep(0.2)
        yield Up(f"http://127.0.0.1:{port}", model, found.group(1), database_url)
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(20)
        except subprocess.TimeoutExpired:
            up.kill()
        run_sync(lambda: delete_model_queue(AMQP_URL, model))


def add_token(database_url: str, name: str, priority: int) -> str:
    async def add() -> str:
        store = TokenStore(database_url)
        try:
            return await store.add(name, priority)
        finally:
            await store.close()

    return run_sync(add)


def test_locust_headless_against_dispatcher_up(dispatcher_up: Up, tmp_path: Path) -> None:
    batch = add_token(dispatcher_up.database_url, "batch", 1)
    env = dict(os.environ)
    env.update(
        LOADTEST_TOKENS=f"interactive={dispatcher_up.secret}:1,batch={batch}:1",
        LOADTEST_MAX_TOKENS="24",  # model discovered through /v1/models
    )
    prefix = tmp_path / "run"
    locust = subprocess.run(
        [
            sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"), "--headless",
            "-u", "10", "-r", "5", "-t", "30s", "--host", dispatcher_up.url, "--csv", str(prefix), "--only-summary",
        ],
        env=env, capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip
    output = locust.stdout + locust.stderr
    assert locust.returncode == 0, output  # locust exits 1 when any request failed
    rows = {(row["Type"], row["Name"]): row for row in csv.DictReader((tmp_path / "run_stats.csv").open())}
    assert int(rows[("", "Aggregated")]["Failure Count"]) == 0, output
    for token_class in ("interactive", "batch"):
        streams = int(rows[("STREAM", token_class)]["Request Count"])
        assert streams > 0, output
        assert int(rows[("TTFT", token_class)]["Request Count"]) == streams
        assert int(rows[("POST", token_class)]["Request Count"]) >= streams
        # Every answer had max_tokens tokens: the STREAM rows' size is tokens per answer.
        assert float(rows[("STREAM", token_class)]["Average Content Size"]) == 24
    tokens = next(csv.DictReader((tmp_path / "run_tokens.csv").open()))
    assert int(tokens["tokens"]) > 0 and float(tokens["tokens_per_s"]) > 0
