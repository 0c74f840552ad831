"""Old name of prefixquant_jax.compiled_block (kept so that code importing it keeps working)."""
from prefixquant_jax.compiled_block import CompiledBlock

BlockRunner = CompiledBlock

__all__ = ["BlockRunner"]
