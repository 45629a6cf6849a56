"""pipellm's benchmarks (installed as ``pipellm.benchmarks``; run them with ``pipellm bench``)."""
