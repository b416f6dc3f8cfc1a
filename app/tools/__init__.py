"""Developer tools over the cores: benchmarks, load tests, evaluation."""
