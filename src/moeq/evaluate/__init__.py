"""Evaluation: perplexity / bits per byte, reports."""
