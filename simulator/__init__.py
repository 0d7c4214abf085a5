"""vLLM simulator: continuous batching, vLLM's wire format, /metrics and abort on disconnect, no GPU."""

from llmdispatch.simulator.app import create_app, run
from llmdispatch.simulator.engine import Engine, Sequence

__all__ = ["Engine", "Sequence", "create_app", "run"]
