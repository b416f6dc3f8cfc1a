"""Developer tools (benchmarks, evaluation, load tests) over the two cores."""
