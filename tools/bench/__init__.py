"""The benchmark harness: sweeps, the PyTorch peer, kernel timings. Measuring code, not product."""
