"""Locust users streaming completions through any OpenAI-compatible deployment.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8080 \\
        --tokens "high=sk-...:1,low=sk-...:3" --max-tokens 128 [--headless -u 50 -r 10 -t 2m]

Options (each also an environment variable, shown in brackets):
  --tokens        token classes "name=secret[:weight],..." [LOADTEST_TOKENS]; users are spread over
                  the classes by weight, so tokens of different priorities compete for the queue
  --model         model name [LOADTEST_MODEL]; default: the first one /v1/models lists
  --max-tokens    max_tokens of each request [LOADTEST_MAX_TOKENS]
  --prompts-file  prompts, one per line [LOADTEST_PROMPTS_FILE]; default: a few built-in ones
  --endpoint      "chat" or "completions" [LOADTEST_ENDPOINT]
  --ignore-eos    ask vLLM for exactly max_tokens tokens [LOADTEST_IGNORE_EOS]

Statistics, per token class (locust's "Type" column says which, "Name" is the class):
  POST    the request itself; its response time is the time to the response headers
  STREAM  the whole answer (response time = total ms, size = tokens)
  TTFT    time to the first generated token (ms)
  ITL     inter-token latency, the mean gap of one answer (ms)
  TPS     generation speed of one answer: the "ms" columns hold tokens per second
At the end the aggregate token rate is printed and written to ``<--csv prefix>_tokens.csv``.
"""

from __future__ import annotations

import itertools
import json
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from locust import HttpUser, events, task
from locust.env import Environment

from llmdispatch.loadtest.sse_client import is_token_event

DEFAULT_PROMPTS = (
    "Explain how a priority queue works, with an example.",
    "Write a short story about a lighthouse keeper.",
    "List ten ideas for a weekend project with a Raspberry Pi.",
    "Summarise the history of the printing press in a few paragraphs.",
    "What are the trade-offs between latency and throughput in a web service?",
)


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--tokens", env_var="LOADTEST_TOKENS", default="", help="name=secret[:weight],...")
    parser.add_argument("--model", env_var="LOADTEST_MODEL", default="", help="model (default: the first listed)")
    parser.add_argument("--max-tokens", env_var="LOADTEST_MAX_TOKENS", type=int, default=128)
    parser.add_argument("--prompts-file", env_var="LOADTEST_PROMPTS_FILE", default="", help="one prompt per line")
    parser.add_argument("--endpoint", env_var="LOADTEST_ENDPOINT", choices=["chat", "completions"], default="chat")
    parser.add_argument("--ignore-eos", env_var="LOADTEST_IGNORE_EOS", action="store_true", default=False)


@dataclass(frozen=True)
class TokenClass:
    name: str
    secret: str
    weight: int = 1


def parse_tokens(spec: str) -> list[TokenClass]:
    """ "high=sk-1:2,low=sk-2" -> classes; a bare secret is one class called "default"."""
    classes = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, rest = item.partition("=")
        if not sep:
            name, rest = "default", item
        secret, _, weight = rest.partition(":")
        classes.append(TokenClass(name, secret, int(weight or 1)))
    return classes or [TokenClass("anonymous", "")]


class _Setup:
    """What every user shares, resolved once per process."""

    lock = threading.Lock()
    classes: list[TokenClass] = []
    turns: itertools.cycle[TokenClass] | None = None
    prompts: list[str] = []
    model = ""
    tokens = 0

    @classmethod
    def next_class(cls, environment: Environment, host: str) -> TokenClass:
        with cls.lock:
            if cls.turns is None:
                options = environment.parsed_options
                cls.classes = parse_tokens(options.tokens if options else "")
                cls.turns = itertools.cycle([c for c in cls.classes for _ in range(c.weight)])
                path = options.prompts_file if options else ""
                lines = Path(path).read_text().splitlines() if path else []
                cls.prompts = [line for line in lines if line.strip()] or list(DEFAULT_PROMPTS)
                cls.model = (options.model if options else "") or _first_model(host, cls.classes[0].secret)
            return next(cls.turns)


def _first_model(host: str, secret: str) -> str:
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    response = requests.get(host.rstrip("/") + "/v1/models", headers=headers, timeout=10)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


class StreamingUser(HttpUser):
    """One application streaming one completion after another with its token class's key."""

    def on_start(self) -> None:
        self.token_class = _Setup.next_class(self.environment, self.host or "")
        if self.token_class.secret:
            self.client.headers["Authorization"] = f"Bearer {self.token_class.secret}"
        options = self.environment.parsed_options
        self.max_tokens = options.max_tokens if options else 128
        self.chat = (options.endpoint if options else "chat") == "chat"
        self.ignore_eos = bool(options and options.ignore_eos)

    def _body(self) -> dict[str, Any]:
        prompt = random.choice(_Setup.prompts)
        body: dict[str, Any] = {"model": _Setup.model, "max_tokens": self.max_tokens, "stream": True}
        if self.chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if self.ignore_eos:
            body["ignore_eos"] = True
        return body

    @task
    def stream(self) -> None:
        name = self.token_class.name
        path = "/v1/chat/completions" if self.chat else "/v1/completions"
        started = time.perf_counter()
        first = last = None
        tokens = 0
        error = ""
        with self.client.post(
            path, data=json.dumps(self._body()), stream=True, catch_response=True, name=name,
            headers={"Content-Type": "application/json"}, timeout=(10, 600),
        ) as response:  # fmt: skip
            if response.status_code != 200:
                error = f"HTTP {response.status_code}: {response.text[:200]}"
            else:
                buffer = b""
                try:
                    for chunk in response.iter_content(chunk_size=None):
                        buffer += chunk
                        *events_, buffer = buffer.split(b"\n\n")
                        now = time.perf_counter()
                        for event in events_:
                            if is_token_event(event):
                                tokens += 1
                                first = first or now
                                last = now
                            elif event.startswith(b'data: {"error"'):
                                error = event[6:300].decode(errors="replace")
                except requests.RequestException as exc:
                    error = f"stream broken: {exc}"
                if not error and tokens == 0:
                    error = "no tokens in the answer"
            if error:
                response.failure(error)
            else:
                response.success()
        total = time.perf_counter() - started
        self._record("STREAM", name, total * 1000, tokens, error)
        if error or first is None or last is None:
            return
        with _Setup.lock:
            _Setup.tokens += tokens
        self._record("TTFT", name, (first - started) * 1000, 0)
        if tokens > 1 and last > first:
            self._record("ITL", name, (last - first) / (tokens - 1) * 1000, 0)
            self._record("TPS", name, (tokens - 1) / (last - first), 0)

    def _record(self, kind: str, name: str, value: float, length: int, error: str = "") -> None:
        self.environment.events.request.fire(
            request_type=kind,
            name=name,
            response_time=value,
            response_length=length,
            exception=RuntimeError(error) if error else None,
            context={},
        )


_started = [0.0]


@events.test_start.add_listener
def _test_start(environment: Environment, **_: Any) -> None:
    _started[0] = time.perf_counter()
    _Setup.tokens = 0


@events.test_stop.add_listener
def _test_stop(environment: Environment, **_: Any) -> None:
    seconds = max(1e-9, time.perf_counter() - _started[0])
    rate = _Setup.tokens / seconds
    print(f"generated tokens: {_Setup.tokens} in {seconds:.1f} s = {rate:.1f} tokens/s", flush=True)
    prefix = environment.parsed_options.csv_prefix if environment.parsed_options else None
    if prefix:
        Path(f"{prefix}_tokens.csv").write_text(
            f"tokens,seconds,tokens_per_s\n{_Setup.tokens},{seconds:.3f},{rate:.3f}\n"
        )
