"""The OpenAI-compatible gateway (the seed's "sender"): auth, queueing, and the SSE relay."""
