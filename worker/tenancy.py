"""Per-tenant prefix-cache isolation: vLLM's ``cache_salt``.

vLLM reuses the KV blocks of a prompt prefix it has already computed, across requests. A tenant who
can send prompts can then tell, from the time to first token, whether another tenant recently sent
the same prefix (a timing side channel). Requests with different ``cache_salt`` values never share
prefix-cache blocks, so a salt per tenant (API token) closes the channel, at the cost of cache hits
between tenants. See docs/tenancy.md.

The salt is an HMAC of the token *name* under a server secret: stable per tenant (its own requests
still share blocks), not guessable by another tenant, and the name itself never reaches vLLM.
"""

from __future__ import annotations

import hashlib
import hmac

from llmdispatch.settings import WorkerSettings


def cache_salt(token_name: str, key: str) -> str:
    """The tenant's salt: hex HMAC-SHA256 of its token name under ``key``."""
    return hmac.new(key.encode(), token_name.encode(), hashlib.sha256).hexdigest()


def salt_key(settings: WorkerSettings) -> str | None:
    """The key to salt with, or None when ``DISPATCHER_CACHE_SALT`` is off.

    Refuses to run salted without a key: an empty key would make every salt predictable from the
    token name, which tenants may know of each other.
    """
    if not settings.cache_salt:
        return None
    if not settings.cache_salt_key:
        raise ValueError("DISPATCHER_CACHE_SALT=true needs a secret in DISPATCHER_CACHE_SALT_KEY")
    return settings.cache_salt_key


def salt_body(body: dict[str, object], token_name: str, key: str | None) -> None:
    """Set the request body's ``cache_salt`` for this tenant (replacing any the client sent), when on.

    The client's own value is replaced, not kept: otherwise a tenant could send another tenant's salt
    (were it ever learnt) and share its cache entries again.
    """
    if key is not None:
        body["cache_salt"] = cache_salt(token_name, key)
