"""The outlier plot of `prefixquant analyze`: token-wise max |x| at the down_proj input."""
from __future__ import annotations

import os

import numpy as np

from prefixquant_jax.errors import UserError
from prefixquant_jax.files import atomic_file


def plot_outliers(path, calib, plain, before, after, tokenizer, res, positions: int = 48):
    """plain / before / after: [layers, N, L] max|x| at the down_proj input of the unrotated model,
    the rotated model, and the rotated model behind the FP prefix. Saves a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = int(np.argmax(plain[:, :, 1:].max(axis=(0, 2))))  # the sample with the strongest non-initial outlier
    L = min(positions, plain.shape[-1])
    labels = [tokenizer.decode([int(t)]).replace("\n", "\\n") for t in calib[n, :L]]
    fig, axes = plt.subplots(4, 1, figsize=(13, 15))
    panels = ((plain, "unrotated model, no prefix (outlier detection)"),
              (before, "rotated model (R1-R4), no prefix"),
              (after, f"rotated model behind the FP prefix {res['prefix_text']}"))
    for ax, (data, title) in zip(axes, panels):
        im = ax.imshow(np.log10(data[:, n, :L] + 1e-6), aspect="auto", cmap="magma", interpolation="nearest")
        ax.set_title(f"log10 max|x| at the down_proj input per layer and token: {title}")
        ax.set_ylabel("layer")
        ax.set_xticks(range(L))
        ax.set_xticklabels(labels, rotation=90, fontsize=6)
        fig.colorbar(im, ax=ax)
    layers = np.arange(plain.shape[0])
    ax = axes[3]
    ax.semilogy(layers, plain[:, :, 1:].max(axis=(1, 2)), "o-", label="unrotated, no prefix (pos. 0 excluded)")
    ax.semilogy(layers, before.max(axis=(1, 2)), "^-", label="rotated, no prefix (all tokens)")
    ax.semilogy(layers, after.max(axis=(1, 2)), "s-", label="rotated, behind the prefix")
    ax.set_xlabel("layer")
    ax.set_ylabel("static range: max over tokens of max|x|")
    ax.set_title("what a per-tensor static scale must cover at the down_proj input")
    ax.legend()
    fig.tight_layout()
    fmt = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    if fmt not in fig.canvas.get_supported_filetypes():
        plt.close(fig)
        raise UserError(f"{path}: cannot write a .{fmt} plot (one of {', '.join(sorted(fig.canvas.get_supported_filetypes()))})")
    with atomic_file(path) as tmp:  # matplotlib names the format by the extension; the temp name has none
        fig.savefig(tmp, dpi=100, format=fmt)
    plt.close(fig)
