"""Where the command line keeps local state, independent of the current directory.

- the default token database: ``$XDG_DATA_HOME/dispatcher/dispatcher.db`` (``~/.local/share``), so that
  ``dispatcher tokens`` run from any directory sees the tokens ``dispatcher up`` serves;
- what ``dispatcher up`` started with (``$XDG_STATE_HOME/dispatcher/up.json``, ``~/.local/state``):
  its usage stream, so ``dispatcher usage`` needs no exports, and the demo token's secret, so a
  restart shows the same one. The file holds secrets: it is written with mode 0600.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import os
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path


def data_dir() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "dispatcher"


def state_dir() -> Path:
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "dispatcher"


def default_database_url() -> str:
    return f"sqlite+aiosqlite:///{data_dir() / 'dispatcher.db'}"


def describe_database(url: str) -> str:
    """The database for people: a SQLite file's absolute path, else the URL without its password."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return f"SQLite file {Path(parsed.database or '').resolve()}" if parsed.database else "in-memory SQLite"
    return parsed.render_as_string(hide_password=True)


def prepare_database(url: str) -> None:
    """Create the directory of a SQLite file (the default one lives in a directory that may not exist yet)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)


def up_stream_name() -> str:
    """The usage stream of this user's ``dispatcher up``: its own, not the broker's shared ``usage``."""
    scope = hashlib.sha256(str(data_dir()).encode()).hexdigest()[:8]
    return f"usage-up-{getpass.getuser()}-{scope}"


def stream_url_from_amqp(amqp_url: str, port: int = 5552) -> str:
    """The stream endpoint of the broker an AMQP URL names (same host, credentials and vhost)."""
    parts = urllib.parse.urlsplit(amqp_url.split(",")[0].strip())
    credentials = f"{parts.username or 'guest'}:{parts.password or 'guest'}@"
    return f"rabbitmq-stream://{credentials}{parts.hostname or '127.0.0.1'}:{port}{parts.path or '/'}"


@dataclass
class UpState:
    """What the last ``dispatcher up`` ran with."""

    usage_stream_url: str = ""
    usage_stream_name: str = ""
    demo_secret: str = ""

    @staticmethod
    def path() -> Path:
        return state_dir() / "up.json"

    @classmethod
    def load(cls) -> UpState:
        with contextlib.suppress(OSError, ValueError, TypeError):
            raw = json.loads(cls.path().read_text())
            return cls(**{k: str(v) for k, v in raw.items() if k in cls.__dataclass_fields__})
        return cls()

    def save(self) -> None:
        path = self.path()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(asdict(self), fh, indent=2)
        tmp.replace(path)
