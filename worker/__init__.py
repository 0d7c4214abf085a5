"""The worker (the seed's "consumer"): takes requests off its model's queue and calls vLLM."""
