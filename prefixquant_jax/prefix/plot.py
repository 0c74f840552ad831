"""The outlier plot of `prefixquant analyze`: token-wise max |x| before and after the FP prefix."""
from __future__ import annotations

import numpy as np


def plot_outliers(path, calib, before, after, tokenizer, res, positions: int = 64):
    """before/after: [layers, N, L] max|x| at the down_proj input. Saves a PNG with three panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = 0  # the sample with the largest non-initial outlier
    n = int(np.argmax(before[:, :, 1:].max(axis=(0, 2))))
    L = min(positions, before.shape[-1])
    fig, axes = plt.subplots(3, 1, figsize=(12, 11))
    vmax = float(before[:, n, :L].max())
    for ax, data, title in ((axes[0], before, "without prefix"), (axes[1], after, f"with FP prefix {res['prefix_text']}")):
        im = ax.imshow(data[:, n, :L], aspect="auto", cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"max |x| at the down_proj input per layer and token ({title})")
        ax.set_ylabel("layer")
        ax.set_xticks(range(L))
        ax.set_xticklabels([tokenizer.decode([int(t)]).replace("\n", "\\n") for t in calib[n, :L]], rotation=90, fontsize=6)
        fig.colorbar(im, ax=ax)
    layers = np.arange(before.shape[0])
    axes[2].semilogy(layers, before[:, :, 1:].max(axis=(1, 2)) / np.median(before, axis=(1, 2)), "o-", label="without prefix")
    axes[2].semilogy(layers, after.max(axis=(1, 2)) / np.median(after, axis=(1, 2)), "s-", label="with prefix")
    axes[2].axhline(res["eta"], color="gray", ls="--", label=f"eta = {res['eta']:g}")
    axes[2].set_xlabel("layer")
    axes[2].set_ylabel("max / median of token max|x|")
    axes[2].legend()
    axes[2].set_title("outlier ratio per layer (position 0 excluded without prefix)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
