"""One training run, orchestration only: start, loop, step, guards, checkpoints, export, signals, and
`kdistill validate`."""
