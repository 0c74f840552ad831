"""Evaluation: bundled corpora, perplexity, greedy generation."""
