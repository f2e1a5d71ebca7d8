"""Research sweeps over the decoding settings (python -m experiments.run): the sweep, prompts, metrics, report."""
