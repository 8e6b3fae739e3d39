"""Figures: TIE heatmaps in the layout of the paper's Figure 2 (x = denoising step, y = layer), and
the one-page summary of a `timerome eval` result."""

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


def evaluation_summary(result: dict, path: str | Path, *, title: str = "") -> Path:
    """One PNG of an `evaluate_suite` result: forget vs retain bars (answer probability P_norm,
    ROUGE-L recall, truth-ratio score) with their 95% CIs over seeds, and the membership-inference
    AUCs (forget vs holdout) against chance. Missing metrics are left out."""
    plt = _pyplot()
    pairs = (("P_norm(answer)", "forget_probability", "retain_probability"),
             ("ROUGE-L recall", "rouge_forget", "rouge_retain"),
             ("truth ratio score", "truth_ratio_forget", "retain_truth_ratio"))
    attacks = (("LOSS", "mia_loss"), ("ZLib", "mia_zlib"), ("Min-K %", "mia_min_k"), ("Min-K %++", "mia_min_k_plus_plus"))

    def value(name):
        m = result.get(name) or {}
        if m.get("mean") is None:
            return None
        low, high = m.get("ci_low"), m.get("ci_high")
        err = (0.0, 0.0) if low is None else (m["mean"] - low, high - m["mean"])
        return m["mean"], err

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [3, 2]})
    x = np.arange(len(pairs))
    for offset, which, label, colour in ((-0.2, 1, "forget", "tab:red"), (0.2, 2, "retain", "tab:blue")):
        got = [value(p[which]) for p in pairs]
        xs = [xi + offset for xi, g in zip(x, got) if g is not None]
        if xs:
            ys = [g[0] for g in got if g is not None]
            errs = np.asarray([g[1] for g in got if g is not None]).T
            left.bar(xs, ys, width=0.4, yerr=errs, capsize=3, label=label, color=colour)
    left.set_xticks(x, [p[0] for p in pairs])
    left.set_ylim(0, 1.05)
    left.legend(loc="upper right", fontsize=8)
    left.set_title("forget vs retain (95% CI over seeds)", fontsize=9)
    got = [(label, value(name)) for label, name in attacks]
    got = [(label, v[0]) for label, v in got if v is not None]
    if got:
        right.bar(range(len(got)), [v for _, v in got], color="tab:purple")
        right.set_xticks(range(len(got)), [label for label, _ in got])
    right.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="chance")
    right.set_ylim(0, 1.05)
    right.legend(loc="lower right", fontsize=8)
    right.set_title("membership inference AUC, forget vs holdout", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
