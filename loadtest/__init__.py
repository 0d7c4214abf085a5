"""Load-test kit: a locustfile for any deployment, and ``loadtest.bench``, the performance report."""
