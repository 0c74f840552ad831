"""FlatQuant (arXiv 2410.09426): learnable Kronecker affine transforms, per-channel scales, LWC/LAC,
trained by the generic block-wise trainer and merged into the weights (see README "FlatQuant")."""
from prefixquant_jax.flatquant.merge import merge_model
from prefixquant_jax.flatquant.pipeline import FlatOptions, flatquant_groups, init_flatquant, train_and_merge
from prefixquant_jax.flatquant.recipe import FlatQuantRecipe
from prefixquant_jax.flatquant.transforms import (ClipParam, TransformBase, TransformParam, check_transforms,
                                                  kron_apply, kron_sizes)

__all__ = ["ClipParam", "FlatOptions", "FlatQuantRecipe", "TransformBase", "TransformParam", "check_transforms",
           "flatquant_groups", "init_flatquant", "kron_apply", "kron_sizes", "merge_model", "train_and_merge"]
