"""The installed distribution: one import namespace, nothing that could shadow another package."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
NAMESPACE = "llmdispatch"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
        check=True,
        timeout=300,
    )
    (built,) = out.glob("*.whl")
    return built


def test_the_wheel_holds_one_top_level_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/")[0] for name in archive.namelist()}
        entry_points = archive.read(next(n for n in archive.namelist() if n.endswith("entry_points.txt"))).decode()
    assert tops == {NAMESPACE, f"{NAMESPACE}-{PYPROJECT['project']['version']}.dist-info"}
    assert f"dispatcher = {NAMESPACE}.cli:main" in entry_points


@pytest.mark.slow
def test_installing_the_wheel_adds_one_package_and_the_command(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    (site,) = venv.glob("lib/python3*/site-packages")
    before = set(p.name for p in site.iterdir())
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", str(wheel)]
    subprocess.run(pip, check=True, timeout=300)
    added = {p.name for p in site.iterdir()} - before
    assert {name for name in added if not name.endswith(".dist-info")} == {NAMESPACE}
    assert (venv / "bin" / "dispatcher").exists()


def test_the_distribution_and_namespace_are_ours() -> None:
    assert PYPROJECT["project"]["name"] == NAMESPACE  # "dispatcher" is another project's name on PyPI
    package_dir = PYPROJECT["tool"]["setuptools"]["package-dir"]
    assert all(name == NAMESPACE or name.startswith(NAMESPACE + ".") for name in package_dir)


def test_every_runtime_dependency_is_used() -> None:
    """A declared dependency is imported by the code, or is a driver or extension loaded by name."""
    loaded_by_name = {"aiosqlite", "uvloop", "hiredis"}  # SQLAlchemy's SQLite driver; uvicorn's loop; redis' parser
    import_names = {
        "aio-pika": "aio_pika",
        "sse-starlette": "sse_starlette",
        "prometheus-client": "prometheus_client",
        "pyyaml": "yaml",
        "sqlalchemy": "sqlalchemy",
        "redis": "redis",
    }
    source = "\n".join(
        path.read_text()
        for folder in ("dispatcher", "gateway", "worker", "simulator")
        for path in (ROOT / folder).rglob("*.py")
    )
    unused = []
    for requirement in PYPROJECT["project"]["dependencies"]:
        name = re.split(r"[\[<>=;! ]", requirement, maxsplit=1)[0].lower()
        if name in loaded_by_name:
            continue
        module = import_names.get(name, name.replace("-", "_"))
        if not re.search(rf"^\s*(import|from) {module}\b", source, flags=re.M):
            unused.append(name)
    assert not unused, f"declared but never imported: {unused}"
