"""The decoder: its config, modules and KV cache."""
