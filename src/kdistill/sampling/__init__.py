"""The student's own samples for on-policy steps: in process, on a vLLM engine, or a step ahead."""
