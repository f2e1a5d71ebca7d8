"""Measurement: speed and memory against transformers and CTranslate2; run as python -m benchmarks.<name>."""
