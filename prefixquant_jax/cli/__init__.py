"""Command line: `prefixquant` (main.py)."""
