"""Figures: TIE heatmaps in the layout of the paper's Figure 2 (x = denoising step, y = layer)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def tie_heatmaps(tie_KLM: np.ndarray, modules: Sequence[str], out_dir: str | Path, *,
                 title: str = "", num_facts: int | None = None,
                 coordinate: dict | None = None) -> list[Path]:
    """Write one PNG per module: mean TIE [K, L] with step on x and layer on y.

    Colour scales are per module (the paper's panels differ by an order of magnitude); the
    selected coordinate, when given, is outlined on its module's panel.
    """
    plt = _pyplot()
    out_dir = Path(out_dir)
    paths = []
    tie_KLM = np.asarray(tie_KLM, np.float64)
    K, L, _ = tie_KLM.shape
    for mi, module in enumerate(modules):
        grid = tie_KLM[:, :, mi].T  # [L, K]
        fig, ax = plt.subplots(figsize=(3.2 + 0.35 * K, 1.6 + 0.28 * L))
        bound = max(np.abs(grid).max(), 1e-9)
        image = ax.imshow(grid, origin="lower", aspect="auto", cmap="RdBu_r", vmin=-bound, vmax=bound,
                          extent=(-0.5, K - 0.5, -0.5, L - 0.5))
        if coordinate and coordinate.get("module") == module:
            ax.add_patch(plt.Rectangle((coordinate["step"] - 0.5, coordinate["layer"] - 0.5), 1, 1,
                                       fill=False, edgecolor="black", linewidth=2))
        ax.set_xlabel("denoising step k")
        ax.set_ylabel("layer")
        ax.set_xticks(range(K))
        ax.set_yticks(range(0, L, max(1, L // 8)))
        facts = f", {num_facts} facts" if num_facts else ""
        ax.set_title(f"{title}TIE: {module}{facts}", fontsize=10)
        fig.colorbar(image, ax=ax, label="mean TIE (nats)")
        fig.tight_layout()
        path = out_dir / f"tie_{module}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
