"""Schemathesis hooks for tests/test_reliability_input.py, loaded through ``SCHEMATHESIS_HOOKS``.

- Half of the bodies (a hash of the body decides, so runs repeat) name the model the stack serves
  (``DISPATCHER_TEST_FUZZ_MODEL``): a made-up model stops at the gateway with a 404, the served one
  takes the fuzzed body through the queue, the worker and the inference server. A quarter have their
  model name repeated past 255 bytes (AMQP's limit on queue names and routing keys). Plausible token
  counts are cut to 16, so that a valid case takes milliseconds of generation, not minutes.
- Every response is logged to ``DISPATCHER_TEST_FUZZ_LOG`` (one JSON line: method, path, status, and
  the body sent when the status is 5xx), so that the test counts cases and shows a server error's request.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Any

import schemathesis

MODEL = os.environ.get("DISPATCHER_TEST_FUZZ_MODEL", "")
LOG = os.environ.get("DISPATCHER_TEST_FUZZ_LOG", "")
SHORT = 16
LONG = 256


def _key(body: Any) -> int:
    return zlib.crc32(json.dumps(body, sort_keys=True, default=repr).encode())


@schemathesis.hook
def before_call(context: schemathesis.HookContext, case: Any, kwargs: dict[str, Any]) -> None:
    body = case.body
    if not MODEL or not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return
    key = _key(body) % 4
    if key in (0, 2):
        body["model"] = MODEL
    elif key == 1:  # past AMQP's 255-byte names, which the fuzzer's short strings never reach
        body["model"] = (body["model"] + "-") * (LONG // (len(body["model"]) + 1) + 1)
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and SHORT < value <= 1_000_000:
            body[name] = SHORT


@schemathesis.hook
def after_call(context: schemathesis.HookContext, case: Any, response: Any) -> None:
    if not LOG:
        return
    entry: dict[str, Any] = {"method": case.method, "path": case.formatted_path, "status": response.status_code}
    if response.status_code >= 500:
        entry["body"] = case.body if isinstance(case.body, (dict, list, str, int, float, bool)) else repr(case.body)
        entry["answer"] = bytes(response.content[:500]).decode(errors="replace")
    with open(LOG, "a", encoding="utf-8") as log:
        log.write(json.dumps(entry, default=repr) + "\n")
