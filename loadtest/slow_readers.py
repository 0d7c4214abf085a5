"""Clients that never read: the gateway's memory stays bounded and the GPU work stops.

Opens N streamed requests on raw sockets with a small receive buffer and never reads from them.
Each stream's answer piles up in the gateway until the per-stream cap (``MAX_BUFFERED_BYTES``)
ends it and cancels its worker. Prints the gateway's RSS over time and the simulator's counters.

    python -m llmdispatch.loadtest.slow_readers --streams 200 --tokens 4000 --cap 262144
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

from llmdispatch.loadtest.services import Services, tree_rss_mb


def open_stream(url: str, token: str, model: str, tokens: int) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(
        {"model": model, "stream": True, "max_tokens": tokens, "messages": [{"role": "user", "content": "go"}]}
    ).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel holds little for us
    sock.connect((host, int(port)))
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def stats(url: str) -> dict[str, int]:
    with urllib.request.urlopen(url + "/sim/stats", timeout=5) as response:
        data = json.loads(response.read())
    return {key: data[key] for key in ("started", "finished", "aborted", "running")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=4000, help="answer length of each stream")
    parser.add_argument("--cap", type=int, default=256 * 1024, help="MAX_BUFFERED_BYTES of the gateway")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        services = Services(Path(tmp), args.amqp_url)
        try:
            services.start(
                max_num_seqs=args.streams,
                decode_ms=5,
                worker_concurrency=args.streams,
                decode_ms_per_seq=0,
                gateway_env={"DISPATCHER_MAX_BUFFERED_BYTES": str(args.cap)},
                simulator_args=("--max-model-len", str(args.tokens + 100)),
            )
            gateway = psutil.Process(services.processes["gateway"].pid)
            print(f"gateway RSS idle: {tree_rss_mb(gateway):.0f} MB; cap {args.cap / 1024:.0f} KiB per stream")
            sockets = [
                open_stream(services.gateway_url, services.token, services.model, args.tokens)
                for _ in range(args.streams)
            ]
            started, peak = time.monotonic(), 0.0
            while time.monotonic() - started < args.seconds:
                time.sleep(2)
                rss = tree_rss_mb(gateway)
                peak = max(peak, rss)
                elapsed = time.monotonic() - started
                print(f"t={elapsed:5.1f}s gateway RSS {rss:6.0f} MB  simulator {stats(services.simulator_url)}")
            capped = (Path(tmp) / "worker.log").read_text(errors="replace").count("outcome=cancelled")
            print(
                f"\n{args.streams} streams that never read: gateway peak RSS {peak:.0f} MB; "
                f"{capped} ended by the cap; simulator {stats(services.simulator_url)}"
            )
            for sock in sockets:
                sock.close()
        finally:
            services.close()


if __name__ == "__main__":
    main()
