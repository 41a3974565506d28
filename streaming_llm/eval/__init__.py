"""Evaluation: perplexity by method, sweeps, recall vs distance, stability, plots."""
