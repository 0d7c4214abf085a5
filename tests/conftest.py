from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.stack import Stack


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
def stack(session_tmp: Path) -> Iterator[Stack]:
    """One simulator, one worker and one gateway (SQLite tokens, Redis cache) for the session."""
    stack = Stack(session_tmp, env={"DISPATCHER_MAX_BODY_BYTES": str(1024 * 1024)})
    try:
        stack.serve(max_num_seqs=16, max_concurrency=16, token="tests")
        yield stack
    finally:
        stack.close()


@pytest.fixture
def make_stack(tmp_path: Path) -> Iterator[type[Stack]]:
    """Build your own stack (closed after the test)."""
    stacks: list[Stack] = []

    def factory(**kwargs: object) -> Stack:
        stack = Stack(tmp_path, **kwargs)  # type: ignore[arg-type]
        stacks.append(stack)
        return stack

    yield factory  # type: ignore[misc]
    for stack in stacks:
        stack.close()


async def gather(*aws: object) -> list[object]:
    return await asyncio.gather(*aws)  # type: ignore[arg-type]
