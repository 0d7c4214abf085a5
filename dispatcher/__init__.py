"""dispatcher: an OpenAI-compatible gateway, a RabbitMQ priority queue and workers beside vLLM."""

__version__ = "0.1.0"
