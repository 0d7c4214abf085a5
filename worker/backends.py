"""One small adapter per kind of OpenAI-compatible inference server the worker can sit beside.

Each adapter knows the server's metric names for running and waiting requests and for KV-cache use, what
its health endpoint means (ready, still loading, or down), whether it takes a request ``priority``, and how
to get exact token usage from it. The worker asks ``await backend.probe()`` for health and a normalised
``Load``; a server without load metrics (``generic``) gives ``load=None`` and the worker then pulls up to
``--max-concurrency``.

| kind     | running / waiting gauges                                  | KV-cache use              | priority |
|----------|-----------------------------------------------------------|---------------------------|----------|
| vllm     | vllm:num_requests_running / vllm:num_requests_waiting     | vllm:kv_cache_usage_perc  | opt-in   |
| sglang   | sglang:num_running_reqs / sglang:num_queue_reqs           | sglang:token_usage        | opt-in   |
| llamacpp | llamacpp:requests_processing / llamacpp:requests_deferred | llamacpp:kv_cache_usage_ratio | no   |
| generic  | none                                                      | none                      | no       |

The prompt of a request cut short (no usage from the server) is counted by the server itself where it
can tell (``count_prompt``: vLLM's ``POST /tokenize``, llama-server's ``/apply-template`` + ``/tokenize``),
else estimated (SGLang, generic).
"""

from __future__ import annotations

import asyncio
import enum
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import httpx2  # the openai SDK's own httpx

from llmdispatch.wire import clamp_priority, vllm_priority

KINDS = ("vllm", "sglang", "llamacpp", "generic", "auto")

# One sample line of the Prometheus text format: name, optional labels, value (timestamps are not used).
_SAMPLE = re.compile(rb"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})?[ \t]+(\S+)", re.MULTILINE)
_PREFIX = re.compile(rb"^(vllm|sglang|llamacpp):", re.MULTILINE)


class State(enum.Enum):
    HEALTHY = "healthy"
    LOADING = "loading"  # up, but its model is not loaded yet: wait, do not fail requests
    DOWN = "down"  # unreachable or failing


@dataclass(frozen=True, slots=True)
class Load:
    """The server's own view of its load (sums over label sets, e.g. ranks)."""

    running: float
    waiting: float
    kv_usage: float | None = None  # 0..1, None if the server does not say


@dataclass(frozen=True, slots=True)
class Probe:
    state: State
    load: Load | None = None  # None: no load metrics (pull up to --max-concurrency)
    detail: str = ""  # why it is not healthy, for logs

    @property
    def healthy(self) -> bool:
        return self.state is State.HEALTHY

    @property
    def loading(self) -> bool:
        return self.state is State.LOADING


def parse_gauges(text: bytes, names: set[str]) -> dict[str, float]:
    """The samples of ``names`` in a Prometheus text body, summed over label sets."""
    out: dict[str, float] = {}
    for raw_name, raw_value in _SAMPLE.findall(text):
        name = raw_name.decode()
        if name not in names:
            continue
        try:
            value = float(raw_value)
        except ValueError:
            continue
        if value != value:  # NaN: the server does not know yet
            continue
        out[name] = out.get(name, 0.0) + value
    return out


def _client(timeout: float) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(timeout=httpx2.Timeout(timeout))


class Backend:
    """The vLLM-shaped defaults; subclasses change what differs."""

    kind: ClassVar[str] = "generic"
    running_metrics: ClassVar[tuple[str, ...]] = ()
    waiting_metrics: ClassVar[tuple[str, ...]] = ()
    kv_metrics: ClassVar[tuple[str, ...]] = ()  # the first one present wins (old and new names)
    # Takes stream_options.include_usage (a last chunk with choices [] and the exact usage).
    stream_usage: ClassVar[bool] = True
    # Takes stream_options.continuous_usage_stats (usage in every chunk: exact counts even for a stream cut
    # short). Bytes are forwarded unchanged, so only ask for it when the client did.
    continuous_usage: ClassVar[bool] = False
    # Takes a request "priority" field at all (the worker's priority setting must also be on).
    supports_priority: ClassVar[bool] = False
    # Statuses of the health endpoint that mean "up, model still loading".
    loading_statuses: ClassVar[frozenset[int]] = frozenset()
    # No /health at all (404/405): the model list answering is the best readiness sign there is.
    models_fallback: ClassVar[bool] = False
    # Seconds a health check may take (None: the client's timeout).
    health_timeout: ClassVar[float | None] = None

    def __init__(self, root_url: str, *, priority: bool = False, timeout: float = 2.0) -> None:
        # /health and /metrics live beside /v1, not under it.
        self.root_url = root_url.rstrip("/").removesuffix("/v1")
        self.priority = priority
        self._http = _client(timeout)
        self._metric_names = {*self.running_metrics, *self.waiting_metrics, *self.kv_metrics}

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- requests ------------------------------------------------------------------------------

    @property
    def accepts_priority(self) -> bool:
        """Whether requests carry a ``priority`` field to this server."""
        return self.supports_priority and self.priority

    def priority_value(self, priority: int) -> int | None:
        """The server's ``priority`` value for our priority (0..10, higher first), or None: send none."""
        return None

    def prepare(self, body: dict[str, Any], priority: int, *, stream: bool) -> bool:
        """Add what the worker needs to a request body, in place; returns whether the client asked for usage.

        Streams always ask for usage (to account for it); a usage-only chunk the client did not ask for is
        dropped again (``events.inspect(event).usage_only``). Priority goes only to servers that take it; a
        ``priority`` the client sent is replaced by the token's, or removed.
        """
        wants_usage = True
        if stream:
            options = body.get("stream_options")
            options = options if isinstance(options, dict) else {}
            wants_usage = bool(options.get("include_usage"))
            if self.stream_usage:
                body["stream_options"] = {**options, "include_usage": True}
        value = self.priority_value(priority)
        if value is not None:
            body["priority"] = value
        else:  # the scheduling priority is the token's, never the client's own choice
            body.pop("priority", None)
        return wants_usage

    async def count_prompt(self, endpoint: str, body: dict[str, Any], timeout: float) -> int | None:
        """The server's own count of a request's prompt tokens (for a request cut short, which got no
        usage), or None: it cannot tell (no tokenizer endpoint, an error, slower than ``timeout``)."""
        return None

    async def _post_json(self, path: str, payload: dict[str, Any], timeout: float) -> Any:
        """POST to the server's root; its JSON answer, or None on any failure."""
        try:
            response = await self._http.post(self.root_url + path, json=payload, timeout=timeout)
            return response.json() if response.status_code == 200 else None
        except (httpx2.HTTPError, ValueError):
            return None

    # -- probing -------------------------------------------------------------------------------

    async def probe(self) -> Probe:
        """Health first; the load only from a healthy server."""
        state, detail = await self.health()
        if state is not State.HEALTHY:
            return Probe(state, None, detail)
        return Probe(State.HEALTHY, await self.load())

    async def health(self) -> tuple[State, str]:
        try:
            if self.health_timeout is None:
                response = await self._http.get(self.root_url + "/health")
            else:
                response = await self._http.get(self.root_url + "/health", timeout=self.health_timeout)
        except httpx2.HTTPError as exc:
            return State.DOWN, f"unreachable ({type(exc).__name__})"
        if response.status_code == 200:
            return State.HEALTHY, ""
        if response.status_code in self.loading_statuses:
            return State.LOADING, f"/health answered {response.status_code} (loading)"
        if self.models_fallback and response.status_code in (404, 405):
            try:
                response = await self._http.get(self.root_url + "/v1/models")
            except httpx2.HTTPError as exc:
                return State.DOWN, f"unreachable ({type(exc).__name__})"
            if response.status_code == 200:
                return State.HEALTHY, ""
            return State.DOWN, f"no /health, and /v1/models answered {response.status_code}"
        return State.DOWN, f"/health answered {response.status_code}"

    async def load(self) -> Load | None:
        if not self.running_metrics:
            return None
        try:
            response = await self._http.get(self.root_url + "/metrics")
        except httpx2.HTTPError:
            return None
        if response.status_code != 200:
            return None  # e.g. llama-server started without --metrics
        gauges = parse_gauges(response.content, self._metric_names)
        running = [gauges[n] for n in self.running_metrics if n in gauges]
        waiting = [gauges[n] for n in self.waiting_metrics if n in gauges]
        if not running and not waiting:
            return None
        kv = next((gauges[n] for n in self.kv_metrics if n in gauges), None)
        return Load(running=sum(running), waiting=sum(waiting), kv_usage=kv)


class VLLMBackend(Backend):
    kind = "vllm"
    running_metrics = ("vllm:num_requests_running",)
    waiting_metrics = ("vllm:num_requests_waiting",)
    kv_metrics = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")  # the old name, removed since
    continuous_usage = True
    supports_priority = True  # needs vLLM started with --scheduling-policy priority

    def priority_value(self, priority: int) -> int | None:
        return vllm_priority(priority) if self.priority else None  # lower = earlier there

    async def count_prompt(self, endpoint: str, body: dict[str, Any], timeout: float) -> int | None:
        # POST /tokenize takes a chat request's messages (and tools: both go through the chat
        # template, with the generation prompt by default) or a completion's prompt string, and
        # answers {"count": n, "max_model_len": ..., "tokens": [...]}.
        payload: dict[str, Any] = {"model": body.get("model")}
        if endpoint == "chat/completions" and isinstance(body.get("messages"), list):
            payload["messages"] = body["messages"]
            if body.get("tools"):
                payload["tools"] = body["tools"]
        elif endpoint == "completions" and isinstance(body.get("prompt"), str):
            payload["prompt"] = body["prompt"]
        else:
            return None
        answer = await self._post_json("/tokenize", payload, timeout)
        count = answer.get("count") if isinstance(answer, dict) else None
        return count if isinstance(count, int) else None


class SGLangBackend(Backend):
    kind = "sglang"
    running_metrics = ("sglang:num_running_reqs",)
    waiting_metrics = ("sglang:num_queue_reqs",)
    kv_metrics = ("sglang:token_usage",)  # share of the KV token pool in use
    supports_priority = True  # needs SGLang started with --enable-priority-scheduling
    # /health is /health_generate there: 503 while starting (and when unhealthy or shutting down), else it
    # runs a one-token generation when idle and answers after about a second.
    loading_statuses = frozenset({503})
    health_timeout = 5.0

    def priority_value(self, priority: int) -> int | None:
        # SGLang's default order is "higher value first", like ours (unless --schedule-low-priority-values-first).
        return clamp_priority(priority) if self.priority else None


class LlamaCppBackend(Backend):
    kind = "llamacpp"
    running_metrics = ("llamacpp:requests_processing",)
    waiting_metrics = ("llamacpp:requests_deferred",)
    kv_metrics = ("llamacpp:kv_cache_usage_ratio",)  # only in some versions
    loading_statuses = frozenset({503})  # {"error": {"code": 503, "message": "Loading model", ...}}

    async def count_prompt(self, endpoint: str, body: dict[str, Any], timeout: float) -> int | None:
        # POST /apply-template {"messages"} -> {"prompt"} (the chat template applied), then
        # POST /tokenize {"content"} -> {"tokens": [...]}; both share the one time bound.
        loop_time = asyncio.get_running_loop().time
        deadline = loop_time() + timeout
        prompt = body.get("prompt")
        if endpoint == "chat/completions" and isinstance(body.get("messages"), list):
            applied = await self._post_json("/apply-template", {"messages": body["messages"]}, timeout)
            prompt = applied.get("prompt") if isinstance(applied, dict) else None
        elif endpoint != "completions":
            return None
        left = deadline - loop_time()
        if not isinstance(prompt, str) or left <= 0:
            return None
        answer = await self._post_json("/tokenize", {"content": prompt, "add_special": True}, left)
        tokens = answer.get("tokens") if isinstance(answer, dict) else None
        return len(tokens) if isinstance(tokens, list) else None


class GenericBackend(Backend):
    """Any OpenAI-compatible server: no load signal, no priority; usage through include_usage."""

    kind = "generic"
    loading_statuses = frozenset({503})
    models_fallback = True


BACKENDS: dict[str, type[Backend]] = {b.kind: b for b in (VLLMBackend, SGLangBackend, LlamaCppBackend, GenericBackend)}


async def detect(root_url: str, *, timeout: float = 2.0) -> type[Backend] | None:
    """The adapter for the server at ``root_url``, from its /metrics names; None if it cannot tell yet
    (unreachable or still loading). A server without recognised metrics is ``generic``, except
    llama-server without ``--metrics``, recognised by its /props."""
    root = root_url.rstrip("/").removesuffix("/v1")
    async with _client(timeout) as http:
        try:
            response = await http.get(root + "/metrics")
            if response.status_code == 200:
                found = _PREFIX.search(response.content)
                if found:
                    return BACKENDS[found.group(1).decode()]
            elif response.status_code == 503:
                return None
            props = await http.get(root + "/props")
        except httpx2.HTTPError:
            return None
    if props.status_code == 200 and b"default_generation_settings" in props.content:
        return LlamaCppBackend
    if props.status_code == 503:
        return None
    return GenericBackend


class AutoBackend(Backend):
    """``--backend auto``: detects the kind on the first healthy probe, then behaves as that adapter.

    Until then it reports health with the generic semantics (503 = loading) and no load, and sends no
    priority.
    """

    kind = "auto"
    loading_statuses = frozenset({503})
    models_fallback = True

    def __init__(self, root_url: str, *, priority: bool = False, timeout: float = 2.0) -> None:
        super().__init__(root_url, priority=priority, timeout=timeout)
        self._timeout = timeout
        self.detected: Backend | None = None

    async def aclose(self) -> None:
        if self.detected is not None:
            await self.detected.aclose()
        await super().aclose()

    @property
    def accepts_priority(self) -> bool:
        return self.detected is not None and self.detected.accepts_priority

    @property
    def continuous_usage(self) -> bool:  # type: ignore[override]
        return self.detected is not None and self.detected.continuous_usage

    def priority_value(self, priority: int) -> int | None:
        return None if self.detected is None else self.detected.priority_value(priority)

    def prepare(self, body: dict[str, Any], priority: int, *, stream: bool) -> bool:
        if self.detected is not None:
            return self.detected.prepare(body, priority, stream=stream)
        return super().prepare(body, priority, stream=stream)

    async def count_prompt(self, endpoint: str, body: dict[str, Any], timeout: float) -> int | None:
        if self.detected is None:
            return None
        return await self.detected.count_prompt(endpoint, body, timeout)

    async def probe(self) -> Probe:
        if self.detected is not None:
            return await self.detected.probe()
        state, detail = await self.health()
        if state is not State.HEALTHY:
            return Probe(state, None, detail)
        found = await detect(self.root_url, timeout=self._timeout)
        if found is None:
            return Probe(State.LOADING, None, "detecting the server kind")
        self.detected = found(self.root_url, priority=self.priority, timeout=self._timeout)
        return await self.detected.probe()


def make_backend(kind: str, base_url: str, *, priority: bool = False, timeout: float = 2.0) -> Backend:
    """The adapter named by ``--backend`` (vllm | sglang | llamacpp | generic | auto) for the server at
    ``base_url`` (with or without its ``/v1``)."""
    if kind == "auto":
        return AutoBackend(base_url, priority=priority, timeout=timeout)
    try:
        cls = BACKENDS[kind]
    except KeyError:
        raise ValueError(f"unknown backend {kind!r}: choose one of {', '.join(KINDS)}") from None
    return cls(base_url, priority=priority, timeout=timeout)
