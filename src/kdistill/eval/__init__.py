"""What the student kept: held-out metrics, lm-eval benchmarks, bench and the run report."""
