"""Developer tools: demo, self-test, evaluation, load test, benchmarks, chaos, the network lab."""
