"""Before a run: the checks that validate and train share, the memory plan and the FLOP counts."""
