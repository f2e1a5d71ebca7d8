"""Training the demo pair and its data, random checkpoints of real shapes, a soak test: python -m tools.<name>."""
