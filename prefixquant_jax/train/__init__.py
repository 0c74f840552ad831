"""Block-wise fine-tuning (PrefixQuant FT; FlatQuant uses the same trainer with other groups)."""
from prefixquant_jax.options import TrainCheckpoint
from prefixquant_jax.train.blockwise import (TRAIN_PRESETS, BlockTrainer, ParamGroup, TrainConfig,
                                             prefixquant_groups, train_blockwise, train_config)
from prefixquant_jax.train.finetune import finetune, train_quantized

__all__ = ["TRAIN_PRESETS", "BlockTrainer", "ParamGroup", "TrainCheckpoint", "TrainConfig", "finetune",
           "prefixquant_groups", "train_blockwise", "train_config", "train_quantized"]
