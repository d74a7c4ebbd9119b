"""Evaluation: lm-eval tasks over real benchmark data, latency, reports and run comparison."""
