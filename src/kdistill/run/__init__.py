"""One training run: start, loop, step, guards, health, metrics, the accelerator and the optimizer."""
