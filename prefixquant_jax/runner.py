"""Old name of prefixquant_jax.compiled (kept so that code importing it keeps working)."""
from prefixquant_jax.compiled import Compiled

__all__ = ["Compiled"]
