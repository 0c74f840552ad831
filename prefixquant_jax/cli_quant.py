"""Quantization subcommands (analyze, quantize, export-prefix); filled in by the PrefixQuant pipeline."""
HANDLERS: dict = {}


def add_subcommands(sub, add_model_args, add_eval_args) -> None:
    return None
