"""Fair share between tenants of one priority, in virtual time: today's FIFO against VTC candidates.

``python -m llmdispatch.loadtest.fairness_model [--scenario i ii iii iv] [--candidate fifo gate tenantq ticket]``
runs the acceptance scenarios of issue 22 on the simulator's own ``Engine`` (stepped by ``plan_step`` /
``finish_step``, as in ``loadtest/priority_model.py``, whose ``Clock`` and hop latencies it reuses), one
priority level throughout. The candidates differ only in where a request waits and who picks the next one:

- ``fifo``: today. The gateway publishes at once; the model's queue is FIFO within a priority.
- ``gate``: (b) the gateway holds requests back per tenant and publishes the tenant lowest in virtual time
  whenever fewer than ``--window`` of its requests wait in the queue (published, not yet taken).
- ``tenantq``: (a) a queue per tenant; a worker with a free slot takes from the backlogged tenant lowest
  in virtual time (counters exact and shared at once: the ideal of this design), one ``basic.get`` hop.
- ``ticket``: (d) the gateway holds requests back and publishes a *ticket* per request (priority,
  gateway) to the model's queue; a worker with a free slot takes a ticket and claims a request from that
  gateway, which hands over its tenant lowest in virtual time (one round trip worker-gateway).

Virtual time (VTC, Sheng et al., OSDI 2024): a tenant's counter grows by ``(w_p x prompt + w_q x output)
/ weight`` as its requests are admitted (prompt) and as their tokens reach the gateway (output);
``w_p = 1``, ``w_q = 2`` as in the paper's artifact. A tenant that becomes backlogged is lifted to the
smallest counter of the backlogged tenants (``--no-lift`` turns that off, to show why it exists). With
several gateways each keeps its own charges and learns the others' every ``--sync`` seconds.

Not modelled: the broker's CPU per queue or message, failover (see docs/tenancy.md), KV pressure.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llmdispatch.loadtest.priority_load import lengths, percentile
from llmdispatch.loadtest.priority_model import Clock, Latency
from llmdispatch.simulator.engine import Engine, Sequence

CANDIDATES = ("fifo", "gate", "tenantq", "ticket")
W_PROMPT, W_OUTPUT = 1.0, 2.0  # VTC's input and output token prices (the paper's artifact defaults)
GET_HOP = 0.002  # tenantq: the worker's basic.get on the chosen tenant's queue
CLAIM_HOP = 0.0025  # ticket: worker -> gateway (claim) and gateway -> worker (the request), each


@dataclass
class Tenant:
    name: str
    weight: float = 1.0
    gateway: int = 0
    prompt: int = 20
    mean_tokens: int = 32
    distribution: str = "identical"


@dataclass
class Request:
    tenant: Tenant
    prompt: int
    max_tokens: int
    sent_at: float
    gateway: int
    first_token_at: float | None = None
    done_at: float | None = None
    estimate: float = 0.0  # output tokens charged in advance when the request was picked
    then: Callable[[Request], None] | None = None  # the client's next step when the answer has ended


@dataclass
class Worker:
    engine: Engine
    slots: int
    in_use: int = 0
    busy: bool = False
    idle_since: float = 0.0


@dataclass
class Gateway:
    """A gateway's view of virtual time: its own charges, the others' as of the last sync."""

    held: dict[str, deque[Request]] = field(default_factory=lambda: defaultdict(deque))
    own: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    others: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    others_backlogged: set[str] = field(default_factory=set)
    queued: int = 0  # gate: published, not yet taken by a worker
    tickets: int = 0  # ticket: tickets of this gateway in the queue or claimed

    def counter(self, tenant: str) -> float:
        return self.own[tenant] + self.others[tenant]

    def backlogged(self) -> set[str]:
        return {t for t, q in self.held.items() if q} | self.others_backlogged


class FairnessModel(Clock):
    def __init__(self, candidate: str, args: argparse.Namespace, *, slots: list[int], gateways: int = 1) -> None:
        self.start_clock(args.seed, args.jitter)
        self.candidate, self.args, self.latency = candidate, args, Latency()
        self.workers = [
            Worker(
                Engine(
                    n,
                    decode_ms=args.decode_ms,
                    decode_ms_per_seq=args.decode_ms_per_seq,
                    prefill_ms=args.prefill_ms,
                    policy="fcfs",
                    log_size=1,
                ),
                n,
            )
            for n in slots
        ]
        self.gateways = [Gateway() for _ in range(gateways)]
        self.queue: deque[Request | int] = deque()  # the model's queue: requests (fifo, gate) or tickets
        self.tenant_queues: dict[str, deque[Request]] = defaultdict(deque)  # tenantq
        self.truth: dict[str, float] = defaultdict(float)  # every tenant's charged weighted service
        self.served: dict[str, float] = defaultdict(float)  # what it really got, for the measures
        self.typical: dict[str, float] = {}  # per tenant, a moving average of its answers' lengths
        self.tokens: dict[str, list[float]] = defaultdict(list)  # output token times, per tenant
        self.done: list[Request] = []
        self.sent: dict[str, int] = defaultdict(int)
        self.home: dict[str, int] = {}  # tenant -> the gateway its clients are connected to
        self.running: dict[int, Request] = {}
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.idle_while_waiting = [0.0, 0.0]  # slot-seconds idle while requests waited; slot-seconds then
        self.watch: str | None = None  # the tenant whose waiting counts for idle_while_waiting

    # -- clients -------------------------------------------------------------------------------

    def send(self, tenant: Tenant, then: Callable[[Request], None] | None = None) -> None:
        request = Request(
            tenant, tenant.prompt, lengths(tenant.distribution, tenant.mean_tokens, self.rng), self.now, tenant.gateway
        )
        request.then = then
        self.home[tenant.name] = tenant.gateway
        self.sent[tenant.name] += 1
        self.at(self.hop(self.latency.to_queue), lambda: self.arrive(request))

    def closed_loop(self, tenant: Tenant, streams: int, start: float = 0.0, stop: float = math.inf) -> None:
        """``streams`` requests open at once from ``start``; each answer's end sends the next until ``stop``."""

        def again(_: Request) -> None:
            if self.now < stop:
                self.at(self.hop(self.latency.to_client), lambda: self.send(tenant, again))

        for i in range(streams):
            self.at(max(0.0, start - self.now) + i * 0.001, lambda: self.send(tenant, again))

    def periodic(self, tenant: Tenant, interval: float, start: float, stop: float) -> None:
        def tick() -> None:
            self.send(tenant)
            if self.now + interval < stop:
                self.at(interval, tick)

        self.at(start - self.now, tick)

    # -- virtual time --------------------------------------------------------------------------

    def charge(self, request: Request, cost: float) -> None:
        service = cost / request.tenant.weight
        self.truth[request.tenant.name] += service
        self.gateways[request.gateway].own[request.tenant.name] += service

    def committed(self, request: Request) -> Request:
        """Picked: charge the prompt and the tenant's usual answer length now, so that the next picks (before
        any token comes back) see it; the tokens beyond the estimate are charged as they come, the rest
        refunded at the end: what is charged in the end is what the tenant consumed."""
        name = request.tenant.name
        request.estimate = self.typical.get(name, 0.0) if self.args.predict else 0.0
        self.charge(request, W_PROMPT * request.prompt + W_OUTPUT * request.estimate)
        return request

    def lift(self, gw: Gateway, tenant: str) -> None:
        """VTC's lift: a tenant that becomes backlogged starts at the smallest backlogged counter."""
        if not self.args.lift:
            return
        self.refresh()
        others = [gw.counter(t) for t in gw.backlogged() if t != tenant]
        if others and gw.counter(tenant) < min(others):
            gw.own[tenant] += min(others) - gw.counter(tenant)

    def lift_exact(self, tenant: str) -> None:
        others = [self.truth[t] for t, q in self.tenant_queues.items() if q and t != tenant]
        if self.args.lift and others and self.truth[tenant] < min(others):
            self.truth[tenant] = min(others)

    def refresh(self) -> None:
        if len(self.gateways) > 1 and self.args.sync == 0:
            self.sync()  # instantaneous sharing: every decision sees every gateway's charges

    def pick(self, gw: Gateway) -> Request | None:
        self.refresh()
        ready = [(gw.counter(t), q[0].sent_at, t) for t, q in gw.held.items() if q]
        return self.committed(gw.held[min(ready)[2]].popleft()) if ready else None

    def sync(self) -> None:
        """Every gateway learns the others' charges and backlogged tenants (``--sync`` seconds apart)."""
        for i, gw in enumerate(self.gateways):
            gw.others = defaultdict(float)
            gw.others_backlogged = set()
            for j, other in enumerate(self.gateways):
                if i != j:
                    for t, v in other.own.items():
                        gw.others[t] += v
                    gw.others_backlogged |= {t for t, q in other.held.items() if q}
        if len(self.gateways) > 1 and self.args.sync > 0:
            self.at(self.args.sync, self.sync)

    # -- gateway and broker --------------------------------------------------------------------

    def arrive(self, request: Request) -> None:
        gw = self.gateways[request.gateway]
        if self.candidate == "fifo":
            self.queue.append(request)
        elif self.candidate == "tenantq":
            q = self.tenant_queues[request.tenant.name]
            if not q:
                self.lift_exact(request.tenant.name)
            q.append(request)
        else:
            held = gw.held[request.tenant.name]
            if not held:
                self.lift(gw, request.tenant.name)
            held.append(request)
            if self.candidate == "ticket":
                self.reconcile(gw, request.gateway)
            else:
                self.release(gw)
        self.deliver()

    def release(self, gw: Gateway) -> None:
        while gw.queued < self.args.window and (request := self.pick(gw)) is not None:
            gw.queued += 1
            self.queue.append(request)

    def waiting(self, tenant: str) -> bool:
        if self.candidate == "fifo":
            return any(isinstance(r, Request) and r.tenant.name == tenant for r in self.queue)
        if self.candidate == "tenantq":
            return bool(self.tenant_queues[tenant])
        return any(gw.held[tenant] for gw in self.gateways) or any(
            isinstance(r, Request) and r.tenant.name == tenant for r in self.queue
        )

    def deliver(self) -> None:
        for worker in sorted(self.workers, key=lambda w: self.rng.random()):
            while worker.in_use < worker.slots:
                taken = self.take()
                if taken is None:
                    return
                worker.in_use += 1
                delay, request = taken
                self.at(delay, lambda w=worker, r=request: self.started(w, r))

    def take(self) -> tuple[float, Request | int] | None:
        to_vllm = self.hop(self.latency.to_vllm)
        if self.candidate == "tenantq":
            ready = [(self.truth[t], q[0].sent_at, t) for t, q in self.tenant_queues.items() if q]
            if not ready:
                return None
            return to_vllm + self.hop(GET_HOP), self.committed(self.tenant_queues[min(ready)[2]].popleft())
        if not self.queue:
            return None
        item = self.queue.popleft()
        if isinstance(item, int):  # a ticket: the gateway picks when the claim reaches it
            return self.hop(CLAIM_HOP), item
        if self.candidate == "gate":
            gw = self.gateways[item.gateway]
            self.at(self.hop(self.latency.to_client), lambda: self.taken(gw))
        return to_vllm, item

    def taken(self, gw: Gateway) -> None:
        gw.queued -= 1
        self.release(gw)
        self.deliver()

    # -- worker and engine ---------------------------------------------------------------------

    def claim(self, worker: Worker, g: int, forwarded: bool) -> None:
        """A worker's claim for a ticket of gateway ``g`` reaches it: it answers with its tenant lowest in
        virtual time, or forwards the claim once to the gateway whose tenant is lower by its synced view."""
        gw = self.gateways[g]
        if not forwarded:
            gw.tickets -= 1
        self.refresh()
        local = min(((gw.counter(t), q[0].sent_at, t) for t, q in gw.held.items() if q), default=None)
        remote = min(((gw.counter(t), t) for t in gw.others_backlogged), default=None)
        if not forwarded and remote is not None and (local is None or remote[0] < local[0]):
            self.at(self.hop(CLAIM_HOP), lambda: self.claim(worker, self.home[remote[1]], True))
        elif local is not None:
            request = self.committed(gw.held[local[2]].popleft())
            delay = self.hop(CLAIM_HOP) + self.hop(self.latency.to_vllm)
            self.at(delay, lambda: self.started(worker, request))
        else:  # a stale ticket (its request was served through a forwarded claim): the slot is free again
            worker.in_use -= 1
        self.reconcile(gw, g)
        self.deliver()

    def reconcile(self, gw: Gateway, g: int) -> None:
        """One ticket per held request: re-issue those a forwarded claim consumed."""
        while sum(len(q) for q in gw.held.values()) > gw.tickets:
            gw.tickets += 1
            self.queue.append(g)

    def started(self, worker: Worker, item: Request | int) -> None:
        if isinstance(item, int):
            self.claim(worker, item, False)
            return
        request = item
        if self.candidate == "fifo":
            self.committed(request)
        self.served[request.tenant.name] += W_PROMPT * request.prompt / request.tenant.weight
        seq = Sequence(str(next(self._order)), prompt_tokens=request.prompt, max_tokens=request.max_tokens)
        self.running[id(seq)] = request
        worker.engine.enqueue(seq)
        if not worker.busy:
            if self.watch is not None and self.waiting(self.watch):  # the engine sat empty while work waited
                gap = self.now - worker.idle_since
                self.idle_while_waiting[0] += worker.slots * gap
                self.idle_while_waiting[1] += worker.slots * gap
            self.step(worker)

    def step(self, worker: Worker) -> None:
        duration = worker.engine.plan_step()
        worker.busy = duration > 0
        if self.watch is not None and self.waiting(self.watch):
            self.idle_while_waiting[0] += (worker.slots - worker.engine.num_running) * max(duration, 0.001)
            self.idle_while_waiting[1] += worker.slots * max(duration, 0.001)
        if worker.busy:
            self.at(duration, lambda: self.step_done(worker))
        else:
            worker.idle_since = self.now

    def step_done(self, worker: Worker) -> None:
        for seq in worker.engine.finish_step():
            request = self.running[id(seq)]
            at_client = self.now + self.latency.to_client  # a constant shift: rates unchanged
            self.served[request.tenant.name] += W_OUTPUT / request.tenant.weight
            if seq.generated > request.estimate:
                self.charge(request, W_OUTPUT)
            self.tokens[request.tenant.name].append(at_client)
            if seq.generated == 1:
                request.first_token_at = self.now + self.hop(self.latency.to_client)
            if seq.done:
                del self.running[id(seq)]
                if seq.generated < request.estimate:
                    self.charge(request, -W_OUTPUT * (request.estimate - seq.generated))
                name = request.tenant.name
                self.typical[name] = 0.8 * self.typical.get(name, seq.generated) + 0.2 * seq.generated
                request.done_at = at_client
                self.done.append(request)
                if request.then is not None:
                    request.then(request)
                self.at(self.hop(self.latency.next_delivery), lambda: self.slot_freed(worker))
        self.step(worker)

    def slot_freed(self, worker: Worker) -> None:
        worker.in_use -= 1
        self.deliver()

    def sample_every(self, interval: float, until: float) -> None:
        def sample() -> None:
            self.samples.append((self.now, dict(self.served)))
            if self.now + interval <= until:
                self.at(interval, sample)

        self.at(0.0, sample)


# -- measures ----------------------------------------------------------------------------------


def jain(values: list[float]) -> float:
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values)) if any(values) else 0.0


def max_service_difference(samples: list[tuple[float, dict[str, float]]], tenants: list[str]) -> float:
    """sup over t1 < t2 and pairs f, g of |W_f(t1, t2) - W_g(t1, t2)|, on the sampled weighted service."""
    worst = 0.0
    for i, f in enumerate(tenants):
        for g in tenants[i + 1 :]:
            diffs = [s.get(f, 0.0) - s.get(g, 0.0) for _, s in samples]
            worst = max(worst, max(diffs) - min(diffs))
    return worst


def vtc_bound(tenants: list[Tenant], slots: int, max_output: int) -> float:
    """The paper's 2 x max(w_p x L_input, w_q x M), in weighted service (divided by the smallest weight).

    M, the tokens a running batch holds: every slot at its longest prompt + answer (no KV limit here).
    """
    l_input = max(t.prompt for t in tenants)
    m = slots * (l_input + max_output)
    return 2 * max(W_PROMPT * l_input, W_OUTPUT * m) / min(t.weight for t in tenants)


def b_ttft(model: FairnessModel, name: str, start: float) -> list[float]:
    return [
        r.first_token_at - r.sent_at
        for r in model.done
        if r.tenant.name == name and r.sent_at >= start and r.first_token_at is not None
    ]


# -- scenarios ---------------------------------------------------------------------------------


def heavy_and_light(candidate: str, args: argparse.Namespace, a_streams: int) -> dict[str, float]:
    """(i) A keeps ``a_streams`` open, B sends a short request every 0.5 s; 3 slots."""
    model = FairnessModel(candidate, args, slots=[3])
    a = Tenant("A", prompt=100, mean_tokens=64, distribution="longtail")
    b = Tenant("B", prompt=20, mean_tokens=8)
    model.watch = "A"
    warmup, end = 5.0, 5.0 + args.duration_i
    model.closed_loop(a, a_streams)
    model.periodic(b, 0.5, warmup, end)
    model.run(end + 30.0)
    ttfts = b_ttft(model, "B", warmup)
    idle, total = model.idle_while_waiting
    return {
        "b_ttft_p50": percentile(ttfts, 0.5),
        "b_ttft_p99": percentile(ttfts, 0.99),
        "b_done": sum(1 for r in model.done if r.tenant.name == "B"),
        "b_sent": model.sent["B"],
        "idle_while_a_waits": idle / total if total else 0.0,
    }


def backlogged_tenants(n: int = 10) -> list[Tenant]:
    """Weights 1 and 2; answers of mean 16 or 64 tokens (longtail), so counting tokens matters."""
    return [
        Tenant(
            f"t{i}", weight=1.0 + i % 2, prompt=5, mean_tokens=16 if (i // 2) % 2 == 0 else 64, distribution="longtail"
        )
        for i in range(n)
    ]


def shares(
    candidate: str, args: argparse.Namespace, *, gateways: int = 1, workers: int = 1, split: int = 5
) -> dict[str, float]:
    """(ii)/(iv) ten backlogged tenants, 16 slots in all, ``args.duration_ii`` s after a 10 s warm-up.

    With several gateways, tenants 0..split-1 come through gateway 0, the rest through gateway 1
    (clients keep their connections: a tenant sticks to one gateway).
    """
    model = FairnessModel(candidate, args, slots=[16 // workers] * workers, gateways=gateways)
    tenants = backlogged_tenants()
    for i, t in enumerate(tenants):
        t.gateway = 0 if gateways == 1 or i < split else 1
        model.closed_loop(t, 8)
    if gateways > 1:
        model.sync()
    warmup, end = 10.0, 10.0 + args.duration_ii
    model.run(warmup)
    model.sample_every(0.05, end)
    model.run(end)
    tokens = {t.name: sum(1 for x in model.tokens[t.name] if warmup <= x < end) for t in tenants}
    total, weights = sum(tokens.values()), sum(t.weight for t in tenants)
    errors = [abs(tokens[t.name] / (total * t.weight / weights) - 1) for t in tenants]
    names = [t.name for t in tenants]
    base, last = model.samples[0][1], model.samples[-1][1]
    service = {k: last.get(k, 0.0) - base.get(k, 0.0) for k in names}  # weighted: already divided by weight
    mean_service = sum(service.values()) / len(names)
    rebased = [(ts, {k: s.get(k, 0.0) - base.get(k, 0.0) for k in names}) for ts, s in model.samples]
    return {
        "max_share_error": max(errors),
        "max_service_share_error": max(abs(v / mean_service - 1) for v in service.values()),
        "jain": jain([tokens[t.name] / t.weight for t in tenants]),
        "max_service_diff": max_service_difference(rebased, names),
        "vtc_bound": vtc_bound(tenants, 16, 512),
        "tokens_per_s": total / args.duration_ii,
    }


def comeback(candidate: str, args: argparse.Namespace) -> dict[str, float]:
    """(iii) three backlogged tenants; C leaves at 10 s and returns ``args.idle`` s later."""
    model = FairnessModel(candidate, args, slots=[3])
    a, b, c = (Tenant(n, prompt=20, mean_tokens=32) for n in "ABC")
    back = 10.0 + args.idle
    model.closed_loop(a, 10)
    model.closed_loop(b, 10)
    model.closed_loop(c, 10, stop=10.0)
    model.closed_loop(c, 10, start=back)
    model.run(back + 10.0)
    window = [x for n in "ABC" for x in model.tokens[n] if back <= x < back + 10.0]
    c_tokens = sum(1 for x in model.tokens["C"] if back <= x < back + 10.0)
    return {"c_share_first_10s": c_tokens / len(window) if window else 0.0}


def run_scenarios(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for cand in args.candidate:
        row: dict[str, Any] = {"candidate": cand}
        if "i" in args.scenario:
            alone, heavy = heavy_and_light(cand, args, 3), heavy_and_light(cand, args, 30)
            row["i"] = {
                "b_p50_a3": alone["b_ttft_p50"],
                **heavy,
                "b_p50_ratio": heavy["b_ttft_p50"] / alone["b_ttft_p50"],
            }
        if "ii" in args.scenario:
            row["ii"] = shares(cand, args)
        if "iii" in args.scenario:
            row["iii"] = comeback(cand, args)
        if "iv" in args.scenario and cand in ("gate", "ticket"):
            iv = {}
            for sync in args.syncs:
                sub = argparse.Namespace(**{**vars(args), "sync": sync})
                iv[f"sync {sync:g}s"] = shares(cand, sub, gateways=2, workers=2, split=args.split)
            row["iv"] = iv
        rows.append(row)
    return rows


def share_cells(v: dict[str, float]) -> list[str]:
    return [
        f"{v['max_share_error']:.1%} / {v['max_service_share_error']:.1%}",
        f"{v['jain']:.3f}",
        f"{v['max_service_diff']:.0f}",
        f"{v['tokens_per_s']:.0f}",
    ]


def table(rows: list[dict[str, Any]]) -> list[str]:
    out = [
        "| candidate | (i) B p50 A=3 / A=30 (ratio) | B p99 | B done/sent | idle while A waits | (ii) max share "
        "err: tokens / service | Jain | max service diff | tok/s | (iii) C share, first 10 s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        i, ii, iii = r.get("i"), r.get("ii"), r.get("iii")
        cells = [str(r["candidate"])]
        if i:
            ratio = f"{i['b_p50_a3']:.3f} / {i['b_ttft_p50']:.3f} s ({i['b_p50_ratio']:.2f}x)"
            cells += [
                ratio,
                f"{i['b_ttft_p99']:.3f} s",
                f"{i['b_done']}/{i['b_sent']}",
                f"{i['idle_while_a_waits']:.2%}",
            ]
        else:
            cells += ["-"] * 4
        cells += share_cells(ii) if ii else ["-"] * 4
        cells.append(f"{iii['c_share_first_10s']:.2f}" if iii else "-")
        out.append("| " + " | ".join(cells) + " |")
    iv_rows = [(r["candidate"], k, v) for r in rows for k, v in r.get("iv", {}).items()]
    if iv_rows:
        out += [
            "",
            "| (iv) 2 gateways x 2 workers | counters synced every | max share err: tokens / service | Jain "
            "| max service diff | tok/s |",
            "|---|---|---|---|---|---|",
        ]
        out += [f"| {c} | {k.removeprefix('sync ')} | " + " | ".join(share_cells(v)) + " |" for c, k, v in iv_rows]
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidate", nargs="+", choices=CANDIDATES, default=list(CANDIDATES))
    parser.add_argument("--scenario", nargs="+", choices=("i", "ii", "iii", "iv"), default=["i", "ii", "iii", "iv"])
    parser.add_argument("--window", type=int, default=1, help="gate: requests a gateway keeps in the queue")
    parser.add_argument("--no-lift", dest="lift", action="store_false", help="no VTC counter lift")
    parser.add_argument(
        "--predict",
        action="store_true",
        help="charge a tenant's usual answer length when a request is picked (refunded at the end)",
    )
    parser.add_argument("--sync", type=float, default=0.0, help="seconds between counter syncs (0: at once)")
    parser.add_argument("--syncs", type=float, nargs="+", default=[0.0, 0.1, 1.0, 5.0], help="(iv)'s sync delays")
    parser.add_argument("--split", type=int, default=5, help="(iv): tenants 0..split-1 on gateway 0, the rest on 1")
    parser.add_argument("--idle", type=float, default=3600.0, help="(iii): seconds the tenant stays away")
    parser.add_argument("--duration-i", type=float, default=60.0)
    parser.add_argument("--duration-ii", type=float, default=60.0)
    parser.add_argument("--decode-ms", type=float, default=25.0)
    parser.add_argument("--decode-ms-per-seq", type=float, default=0.25)
    parser.add_argument("--prefill-ms", type=float, default=5.0)
    parser.add_argument("--jitter", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=22)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    results = run_scenarios(arguments)
    print(json.dumps(results, indent=2) if arguments.json else "\n".join(table(results)))
