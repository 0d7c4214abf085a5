"""Issue 20, a new user's first hour: one token database whatever the directory, no ERROR when a worker
starts before any gateway, `up` keeps its demo token, drains on stop and leaves `dispatcher usage`
working without exports, help written for people, `scripts/up.sh` installs the runtime only, and the
module map names every command.

Commands run as a user of their own: the real `dispatcher` CLI in subprocesses, HOME's XDG
directories in tmp (``Up.environment``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from llmdispatch.cli import build_parser
from tests.amqp_audit import AuditProxy
from tests.stack import AMQP_URL, Stack
from tests.test_hardening import Up, up_runs  # noqa: F401 (up_runs is a fixture)

ROOT = Path(__file__).resolve().parents[1]


def dispatcher(env: dict[str, str], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "llmdispatch.cli", *args],
                            env=env, cwd=cwd, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def chat(up: Up, token: str) -> httpx.Response:
    body = {"model": up.model, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
    url = f"http://127.0.0.1:{up.ports['port']}/v1/chat/completions"
    return httpx.post(url, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=30)


# -- 1. the token database does not follow the current directory ----------------------------------


def test_tokens_use_one_database_whatever_the_directory(tmp_path: Path) -> None:
    env = Up.environment(tmp_path)
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    there.mkdir()
    added = dispatcher(env, "tokens", "add", "app", "--priority", "3", cwd=here)
    listed = dispatcher(env, "tokens", "list", cwd=there)
    assert [line.split()[:2] for line in listed.stdout.splitlines()[1:]] == [["app", "3"]]
    database = tmp_path / "xdg-data" / "dispatcher" / "dispatcher.db"
    assert database.exists()
    assert str(database) in added.stderr and str(database) in listed.stderr  # each command says which
    assert not any(here.iterdir()) and not any(there.iterdir())  # no stray dispatcher.db


# -- 2. a worker that announces itself before any gateway listens logs no ERROR -------------------


def _rabbitmqctl(*args: str) -> None:
    proc = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture
def lonely_vhost() -> Iterator[str]:
    """A vhost where nobody listens on the control exchange: guest may declare only that exchange, so the
    worker's consuming side (its model queues, its control queue) never gets set up, deterministically."""
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl not available")
    vhost = "first-hour-" + uuid.uuid4().hex[:8]
    _rabbitmqctl("add_vhost", vhost)
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", r"^dispatcher\.control$", ".*", ".*")
        yield vhost
    finally:
        _rabbitmqctl("delete_vhost", vhost)


def test_announcing_to_nobody_is_not_an_error(tmp_path: Path, lonely_vhost: str) -> None:
    proxy = AuditProxy(urlsplit(AMQP_URL.split(",")[0]).port or 5672).open()
    stack = Stack(tmp_path, amqp_url=proxy.url(vhost=lonely_vhost))
    try:
        stack.start_simulator()
        worker = stack.spawn("worker", "worker", "--model", stack.model, "--vllm-url", stack.simulator_url + "/v1")

        def announcements() -> int:
            return sum(
                1
                for m in proxy.recorded()
                if m.name == "Basic.Publish" and m.fields.get("exchange") == "dispatcher.control"
            )

        # The first announcement when the publishing connection is up, the next one 5 s later: by then
        # the broker's answer to the first (a return, when mandatory) has long been handled.
        deadline = time.monotonic() + 30
        while announcements() < 2 and time.monotonic() < deadline:
            assert worker.alive(), worker.log()[-3000:]
            time.sleep(0.2)
        assert announcements() >= 2, worker.log()[-3000:]
        log = worker.log()
        assert "Basic.Return" not in log and "Unhandled message" not in log, log[-3000:]
        assert " ERROR " not in log, log[-3000:]
    finally:
        for process in stack.processes:  # the vhost goes, with all that is in it
            process.stop()
        proxy.close()


# -- 3, 5, 6. up keeps its demo token; usage finds up's own stream; the banner shows the priority ------


def test_up_keeps_its_demo_token_and_usage_reads_its_stream(tmp_path: Path, up_runs: list[Up]) -> None:  # noqa: F811
    first = Up(tmp_path)
    up_runs.append(first)
    assert first.up.wait(90), first.output[-3000:]
    assert "token 'demo' with priority 5" in first.output
    secret = first.secret()
    assert chat(first, secret).status_code == 200
    first.popen.send_signal(signal.SIGTERM)
    assert first.popen.wait(60) == 0, first.output[-3000:]

    # No exports: `usage` reads the stream `up` wrote to, which is this deployment's own.
    usage = dispatcher(first.env, "usage", "--records", "--since", "1h", cwd=tmp_path)
    records = [json.loads(line) for line in usage.stdout.splitlines()]
    assert [(r["token"], r["model"], r["outcome"]) for r in records] == [("demo", first.model, "ok")]
    assert "stream 'usage-up-" in usage.stderr, usage.stderr

    second = Up(tmp_path)
    up_runs.append(second)
    assert second.up.wait(90), second.output[-3000:]
    assert second.secret() == secret  # shown again, still valid
    assert chat(second, secret).status_code == 200


def test_up_leaves_a_users_demo_token_alone(tmp_path: Path, up_runs: list[Up]) -> None:  # noqa: F811
    mine = dispatcher(Up.environment(tmp_path), "tokens", "add", "demo", "--priority", "2").stdout.splitlines()[-1]
    up = Up(tmp_path)
    up_runs.append(up)
    assert up.up.wait(90), up.output[-3000:]
    assert "token 'demo' with priority 2" in up.output
    assert up.secret() == "$TOKEN" and "did not make" in up.output
    assert chat(up, mine).status_code == 200  # neither deleted nor replaced


# -- 4. stopping up drains: streams finish, or end with an error event when the grace runs out ------


async def _stream(url: str, token: str, body: dict[str, object]) -> tuple[int, list[str], bool, list[object]]:
    """(status, texts, [DONE] seen, error events) of one streamed completion."""
    texts: list[str] = []
    errors: list[object] = []
    done = False
    async with httpx.AsyncClient(timeout=60) as client:
        headers = {"Authorization": f"Bearer {token}"}
        async with client.stream("POST", url, json=body, headers=headers) as response:
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    if "error" in event:
                        errors.append(event["error"])
                    else:
                        texts.extend(choice["text"] for choice in event["choices"])
    return response.status_code, texts, done, errors


async def test_stopping_up_lets_streams_finish_and_ends_the_rest_with_an_error(
    tmp_path: Path,
    up_runs: list[Up],  # noqa: F811
) -> None:
    grace = 10
    up = Up(tmp_path, "--grace", str(grace))
    up_runs.append(up)
    assert await asyncio.to_thread(up.up.wait, 90), up.output[-3000:]
    url = f"http://127.0.0.1:{up.ports['port']}/v1/completions"
    token = up.secret()
    # 10 ms per token: the short one needs about 3 s, the long one 40 s, far beyond the grace.
    body = {"model": up.model, "prompt": "a", "stream": True}
    short = asyncio.create_task(_stream(url, token, {**body, "max_tokens": 300}))
    long = asyncio.create_task(_stream(url, token, {**body, "max_tokens": 4000}))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{up.ports['simulator-port']}") as sim:
        for _ in range(200):  # both streams running in the simulator
            if (await sim.get("/sim/stats")).json()["running"] == 2:
                break
            await asyncio.sleep(0.05)
    up.popen.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    status, texts, done, errors = await short
    assert (status, len(texts), done, errors) == (200, 300, True, []), up.output[-3000:]
    status, texts, _, errors = await long
    assert status == 200 and 0 < len(texts) < 4000
    assert errors and "shutting down" in str(errors[0])  # told, not cut off
    assert await asyncio.to_thread(up.popen.wait, 60) == 0, up.output[-3000:]
    assert time.monotonic() - stopped < grace + 15
    assert not up.leftovers()


# -- 6. help for people ---------------------------------------------------------------------------


def test_help_is_written_for_people(tmp_path: Path) -> None:
    env = {**Up.environment(tmp_path), "COLUMNS": "200"}  # one line per flag
    top = dispatcher(env, "--help").stdout
    assert "``" not in top and "usage" in top and "tokens" in top
    up = dispatcher(env, "up", "--help").stdout
    assert "--backend" in up and "(default: 8080)" in up and "(default: demo-model)" in up
    flags = re.split(r"\n  (?=-)", up.split("options:", 1)[1])[1:]  # one entry per flag, help included
    assert len(flags) > 10 and all(len(entry.split()) > 3 for entry in flags), flags  # each says what it does


# -- 7. scripts/up.sh installs the runtime only --------------------------------------------------


@pytest.mark.slow
def test_up_sh_installs_the_runtime_only(tmp_path: Path) -> None:
    """What scripts/up.sh asks pip for, from pip's installation report, in a fresh virtualenv of a copy
    of the checkout; the virtualenv sees this one's packages (a .pth file), so nothing is downloaded."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, checkout / name)
    for name in ("scripts", "dispatcher", "gateway", "worker", "simulator", "loadtest"):
        shutil.copytree(ROOT / name, checkout / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", checkout / ".venv"], check=True, timeout=60)
    (site,) = (checkout / ".venv" / "lib").glob("python3*/site-packages")
    (site / "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    report = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISPATCHER_", "PIP_", "VIRTUAL_ENV"))}
    env.update(PIP_REPORT=str(report), PATH="/usr/bin:/bin")
    run = subprocess.run(["bash", "scripts/up.sh", "--help"], cwd=checkout, env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0 and "dispatcher up" in run.stdout, run.stdout + run.stderr
    (project,) = [i for i in json.loads(report.read_text())["install"] if i["metadata"]["name"] == "llmdispatch"]
    assert not project.get("requested_extras"), project["requested_extras"]


# -- 9. the module map names every command --------------------------------------------------------


def test_architecture_names_every_command() -> None:
    lines = (ROOT / "docs" / "architecture.md").read_text().splitlines()
    row = next(line for line in lines if line.startswith("| `dispatcher/cli.py`"))
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    missing = [name for name in commands.choices if not re.search(rf"\b{name}\b", row)]
    assert not missing, row
