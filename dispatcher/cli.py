"""The dispatcher command: run the gateway, a worker, the vLLM simulator, or the whole stack (up);
manage API tokens (tokens) and read the usage ledger (usage)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from llmdispatch.local import UpState, describe_database
from llmdispatch.logs import setup_logging
from llmdispatch.settings import CommonSettings, GatewaySettings, SettingsError, WorkerSettings


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


# -- gateway / worker / simulator -------------------------------------------------------------


def cmd_gateway(args: argparse.Namespace) -> None:
    import uvicorn

    from llmdispatch.gateway.app import create_app
    from llmdispatch.gateway.server import DrainingServer, guarded_protocol

    settings = GatewaySettings()
    settings.override(host=args.host, port=args.port, gateway_workers=args.workers)
    setup_logging(settings.log_level, settings.log_format)
    if settings.gateway_workers > 1 and not args.reuse_port:
        from llmdispatch.gateway.server import supervise

        sys.exit(supervise(settings))
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        access_log=False,
        loop="auto",
        http=guarded_protocol(settings.header_timeout, settings.max_connections),
        timeout_graceful_shutdown=int(settings.shutdown_grace),
        timeout_keep_alive=30,
    )
    server = DrainingServer(
        config,
        on_drain=lambda: app.state.update(draining=True),
        drain_delay=settings.drain_delay,
        on_grace_end=lambda: app.state.broker.fail_all(503, "The gateway is shutting down; please retry."),
    )
    if args.reuse_port:  # one of several processes on this port (see gateway.server.supervise)
        from llmdispatch.processes import reuse_port_socket

        server.run(sockets=[reuse_port_socket(settings.host, settings.port)])
    else:
        server.run()


def cmd_worker(args: argparse.Namespace) -> None:
    from llmdispatch.worker.run import serve, supervise

    settings = WorkerSettings()
    settings.override(
        model=args.model,
        vllm_url=args.vllm_url,
        max_concurrency=args.max_concurrency,
        http_port=args.http_port,
        vllm_priority=args.vllm_priority,
        backend=args.backend,
        priority_headroom=args.priority_headroom,
        processes=args.processes,
    )
    setup_logging(settings.log_level, settings.log_format)
    if settings.processes > 1 and not args.reuse_port:
        sys.exit(supervise(settings))
    _run(serve(settings, reuse_port=args.reuse_port))


def cmd_simulate(args: argparse.Namespace) -> None:
    from llmdispatch.simulator.app import run

    run(
        host=args.host,
        port=args.port,
        model=args.model,
        max_num_seqs=args.max_num_seqs,
        decode_ms=args.decode_ms,
        decode_ms_per_seq=args.decode_ms_per_seq,
        json_style=args.json_style,
        scheduling_policy=args.scheduling_policy,
        kv_cache_tokens=args.kv_cache_tokens,
        max_model_len=args.max_model_len,
        line_ending=args.line_ending,
    )


# -- tokens -------------------------------------------------------------------------------------


def cmd_tokens(args: argparse.Namespace) -> None:
    from llmdispatch.tokens import TokenError

    try:
        _run(_tokens(args))
    except TokenError as exc:
        sys.exit(f"error: {exc}")


async def _tokens(args: argparse.Namespace) -> None:
    from llmdispatch.tokens import TokenError, TokenStore, hash_token, load_sync_file, publish_invalidation

    settings = CommonSettings()
    say_database(settings.database_url)
    store = TokenStore(settings.database_url, timeout=max(settings.sql_timeout, 10.0))  # a command: may wait longer
    changed: list[str] = []
    try:
        if args.action == "add":
            secret = await store.add(
                args.name, args.priority, rpm=args.rpm, tpm=args.tpm, max_concurrent=args.max_concurrent
            )
            changed.append(hash_token(secret))  # gateways may remember it as unknown for a moment
            print(f"Created token {args.name!r} with priority {args.priority}. It is shown only once:")
            print(secret)
        elif args.action == "list":
            rows = await store.list()
            print(f"{'NAME':24} {'PRIORITY':>8} {'RPM':>8} {'TPM':>10} {'CONCURRENT':>10}  STATUS")
            for row in rows:
                status = "revoked" if row.revoked else "active"
                print(
                    f"{row.name:24} {row.priority:>8} {_dash(row.rpm):>8} {_dash(row.tpm):>10} "
                    f"{_dash(row.max_concurrent):>10}  {status}"
                )
        elif args.action == "revoke":
            changed.append(await store.revoke(args.name))
            print(f"Revoked token {args.name!r}.")
        elif args.action == "delete":
            token_hash = await store.delete(args.name)
            if token_hash is None:
                raise TokenError(f"no token named {args.name!r}")
            changed.append(token_hash)
            print(f"Deleted token {args.name!r}; the name can be used again.")
        elif args.action == "set-priority":
            changed.append(await store.update(args.name, priority=args.priority))
            print(f"Token {args.name!r} now has priority {args.priority}.")
        elif args.action == "set-limits":
            limits = {k: v for k in ("rpm", "tpm", "max_concurrent") if (v := getattr(args, k)) is not None}
            # 0 removes a limit.
            changed.append(await store.update(args.name, **{k: (v or None) for k, v in limits.items()}))
            print(f"Token {args.name!r} limits updated: {limits}.")
        elif args.action == "sync":
            entries = load_sync_file(Path(args.file).read_text())  # noqa: ASYNC240 (a small file, once)
            result = await store.sync(entries, revoke=args.revoke, dry_run=args.dry_run)
            for label, names in (("add", result.added), ("change", result.changed), ("revoke", result.revoked)):
                for name in names:
                    print(f"{'would ' if args.dry_run else ''}{label} {name}")
            if args.dry_run:
                print(f"Dry run, nothing written: {result.summary()} ({args.file}).")
            else:
                changed.extend(result.hashes)
                print(f"Synced {len(entries)} tokens from {args.file}: {result.summary()}.")
    finally:
        await store.close()
    await publish_invalidation(settings.redis_url, changed)


def say_database(url: str) -> None:
    """Which token database a command uses, on stderr (stdout stays parseable: a secret is its last line)."""
    print(f"tokens: {describe_database(url)}", file=sys.stderr)
    old = Path("dispatcher.db")  # the default before it moved out of the current directory
    if "DISPATCHER_DATABASE_URL" not in os.environ and old.exists() and not url.endswith(f"/{old.resolve()}"):
        print(
            f"note: {old.resolve()} (the old default) is not used; move it to the path above to keep its tokens",
            file=sys.stderr,
        )


def _dash(value: int | None) -> str:
    return "-" if value is None else str(value)


# -- usage ----------------------------------------------------------------------------------------


def cmd_usage(args: argparse.Namespace) -> None:
    """Totals per token and model from the usage ledger (a RabbitMQ stream)."""
    import json

    from llmdispatch.usage import parse_time, read_usage, render_csv, render_table, summarize

    settings = CommonSettings()
    origin = "DISPATCHER_USAGE_STREAM_URL"
    state = UpState.load()
    if "DISPATCHER_USAGE_STREAM_URL" not in os.environ and state.usage_stream_url:
        # What the last `dispatcher up` wrote to: its own stream, not the broker's shared `usage`.
        origin = f"dispatcher up, {UpState.path()}"
        settings.usage_stream_url = state.usage_stream_url
        if "DISPATCHER_USAGE_STREAM_NAME" not in os.environ:
            settings.usage_stream_name = state.usage_stream_name or settings.usage_stream_name
    if args.stream_url:
        origin = "--stream-url"
    settings.override(usage_stream_url=args.stream_url, usage_stream_name=args.stream)
    if not settings.usage_stream_url:
        sys.exit(
            "error: no usage stream: set DISPATCHER_USAGE_STREAM_URL or pass --stream-url "
            "(after `dispatcher up` with RabbitMQ's stream plugin on, none is needed)"
        )
    from llmdispatch.usage import StreamAddress

    try:
        address = StreamAddress.parse(settings.usage_stream_url)
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    print(f"usage: stream {settings.usage_stream_name!r} at {address.host}:{address.port} ({origin})", file=sys.stderr)
    try:
        since = parse_time(args.since)
        until = parse_time(args.until) if args.until else None
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    from rstream import StreamDoesNotExist

    try:
        records = _run(read_usage(settings.usage_stream_url, settings.usage_stream_name, since, until))
    except StreamDoesNotExist:
        sys.exit(f"error: the stream {settings.usage_stream_name!r} does not exist (no worker has written to it yet)")
    except (OSError, ConnectionError) as exc:
        sys.exit(f"error: cannot reach the usage stream: {exc}")
    if args.format == "records":
        from llmdispatch.usage import encode_record, unique

        for record in unique(records):  # one JSON line per request, for billing systems
            print(encode_record(record).decode())
        return
    rows = summarize(records)
    if args.format == "json":
        print(json.dumps(rows, indent=2))
    elif args.format == "csv":
        print(render_csv(rows), end="")
    else:
        print(render_table(rows))


# -- the whole stack --------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> None:
    from llmdispatch.up import main as up

    up(args)


# -- parser ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dispatcher", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("gateway", help="run the OpenAI-compatible gateway")
    p.add_argument("--host", help="address to listen on (DISPATCHER_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (DISPATCHER_PORT, default 8080)")
    p.add_argument("--workers", type=int, help="processes on this port (DISPATCHER_GATEWAY_WORKERS, default: cores)")
    p.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # a child of --workers N
    p.set_defaults(func=cmd_gateway)

    p = sub.add_parser("worker", help="run a worker beside one vLLM server")
    p.add_argument("--model", help="model name served (DISPATCHER_MODEL)")
    p.add_argument("--vllm-url", help="vLLM base URL, e.g. http://127.0.0.1:8000/v1 (DISPATCHER_VLLM_URL)")
    p.add_argument("--max-concurrency", type=int, help="requests run at once (DISPATCHER_MAX_CONCURRENCY)")
    p.add_argument("--http-port", type=int, help="port of /health, /ready, /metrics (DISPATCHER_WORKER_PORT)")
    p.add_argument(
        "--vllm-priority",
        action="store_true",
        default=None,
        help="pass token priority to vLLM; needs --scheduling-policy priority (DISPATCHER_VLLM_PRIORITY)",
    )
    p.add_argument(
        "--backend",
        choices=("vllm", "sglang", "llamacpp", "generic", "auto"),
        help="kind of inference server: its load metrics, health and priority (DISPATCHER_BACKEND, default vllm)",
    )
    p.add_argument(
        "--priority-headroom",
        help="slots of --max-concurrency kept for high priorities: N, or auto = a third (DISPATCHER_PRIORITY_HEADROOM)",
    )
    p.add_argument(
        "--processes",
        type=int,
        help="worker processes sharing --max-concurrency and the HTTP port (DISPATCHER_WORKER_PROCESSES, default 1)",
    )
    p.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # a child of --processes N
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("simulate", help="run the vLLM simulator")
    p.add_argument("--model", default="sim-model", help="model name it serves (default: sim-model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--max-num-seqs", type=int, default=16, help="sequences run at once, as vLLM's flag (default: 16)")
    p.add_argument("--decode-ms", type=float, default=10.0, help="duration of one decode step")
    p.add_argument("--decode-ms-per-seq", type=float, default=0.25, help="added to a step per running sequence")
    p.add_argument("--json-style", choices=("compact", "spaced"), default="compact",
                   help="compact JSON like vLLM, or spaced (json.dumps default, keys reversed)")  # fmt: skip
    p.add_argument("--scheduling-policy", choices=("fcfs", "priority"), default="priority",
                   help="vLLM's waiting-queue order (vLLM's own default is fcfs)")  # fmt: skip
    p.add_argument("--kv-cache-tokens", type=int, help="KV-cache size in tokens; when full, vLLM-style preemption")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--line-ending", choices=("lf", "crlf"), default="lf", help="line ends of SSE streams")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("tokens", help="manage API tokens")
    actions = p.add_subparsers(dest="action", required=True)
    a = actions.add_parser("add", help="create a token; prints the secret (once) as the last line")
    a.add_argument("name")
    a.add_argument("--priority", type=int, default=1, help="0..10, higher is answered first")
    _limit_flags(a)
    actions.add_parser("list", help="list tokens")
    a = actions.add_parser("revoke", help="revoke a token")
    a.add_argument("name")
    a = actions.add_parser("set-priority", help="change a token's priority")
    a.add_argument("name")
    a.add_argument("priority", type=int)
    a = actions.add_parser("set-limits", help="change a token's limits (0 removes one)")
    a.add_argument("name")
    _limit_flags(a)
    a = actions.add_parser("delete", help="delete a token (revoked or not), so that its name can be used again")
    a.add_argument("name")
    a = actions.add_parser("sync", help="make the database hold exactly the tokens of a YAML file")
    a.add_argument("file")
    a.add_argument("--dry-run", action="store_true", help="print what would change; write nothing")
    a.add_argument(
        "--no-revoke", dest="revoke", action="store_false", help="keep tokens that are not in the file as they are"
    )
    p.set_defaults(func=cmd_tokens)

    p = sub.add_parser("usage", help="totals per token and model from the usage ledger")
    p.add_argument("--since", default="24h", help="start: 1h, 30m, 7d (ago), 2026-11-01, an ISO time (UTC default)")
    p.add_argument("--until", help="end, same forms as --since (default: now)")
    p.add_argument(
        "--stream-url",
        help="rabbitmq-stream://user:password@host:5552/ (DISPATCHER_USAGE_STREAM_URL; default: `dispatcher up`'s)",
    )
    p.add_argument(
        "--stream", help="stream name (DISPATCHER_USAGE_STREAM_NAME; default: the one of `dispatcher up`, else usage)"
    )
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", dest="format", action="store_const", const="json", help="print JSON")
    fmt.add_argument("--csv", dest="format", action="store_const", const="csv", help="print CSV")
    fmt.add_argument(
        "--records", dest="format", action="store_const", const="records",
        help="print each request's record (JSON lines, each request once) instead of totals",
    )  # fmt: skip
    p.set_defaults(func=cmd_usage, format="table")

    p = sub.add_parser("bench", help="benchmark: streaming load direct to the simulator and through the stack")
    p.set_defaults(func=cmd_bench, bench_args=[])

    from llmdispatch.up import add_parser as up_parser

    p = up_parser(sub)
    p.set_defaults(func=cmd_up)
    return parser


def _limit_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rpm", type=int, help="requests per minute")
    parser.add_argument("--tpm", type=int, help="prompt + completion tokens per minute")
    parser.add_argument("--max-concurrent", type=int, help="requests in flight at once")


def cmd_bench(args: argparse.Namespace) -> None:
    from llmdispatch.loadtest.bench import main as bench

    bench(args.bench_args)


def main(argv: list[str] | None = None, extra: dict[str, Callable[..., None]] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser takes every flag (see `dispatcher bench --help`)
        cmd_bench(argparse.Namespace(bench_args=argv[1:]))
        return
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except SettingsError as exc:  # a wrong DISPATCHER_* value: one line, and the usage-error exit code
        print(f"dispatcher: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
