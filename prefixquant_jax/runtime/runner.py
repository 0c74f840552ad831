"""Old name of prefixquant_jax.runtime.compiled (kept so that code importing it keeps working)."""
from prefixquant_jax.runtime.compiled import RealCompiled, compile_loaded

__all__ = ["RealCompiled", "compile_loaded"]
