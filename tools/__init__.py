"""Training the demo pair, its data, and the fixtures tests and benchmarks build (random checkpoints of real shapes)."""
