"""Figure 2: TIE heatmaps (layer × denoising step) for resid / attn / mlp, averaged over 8 TOFU
facts, plus the referee's control: the effect restricted to early vs late steps.

    python experiments/tie_heatmaps.py [--model tofu-tiny] [--quick] --out runs/tie_heatmaps

Writes tie_{resid,attn,mlp}.png, early_late.png, results.json (+ tie.npz).
"""

from __future__ import annotations

import numpy as np

import ports
from timerome_jax import api, tracing
from timerome_jax.plots import tie_heatmaps

import _common
import _quick


def early_late_figure(tie_KLM: np.ndarray, modules, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    K = tie_KLM.shape[0]
    half = K // 2
    fig, axes = plt.subplots(1, len(modules), figsize=(3.4 * len(modules), 2.8), sharey=False)
    for ax, (mi, module) in zip(np.atleast_1d(axes), enumerate(modules)):
        layers = np.arange(tie_KLM.shape[1])
        ax.plot(layers, tie_KLM[:half, :, mi].mean(0), marker="o", label=f"early steps (k < {half})")
        ax.plot(layers, tie_KLM[half:, :, mi].mean(0), marker="s", label=f"late steps (k ≥ {half})")
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set_title(module)
        ax.set_xlabel("layer")
    np.atleast_1d(axes)[0].set_ylabel("mean TIE (nats)")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    _common.save_figure(fig, path, dpi=120)


def main() -> None:
    p = _common.parser(__doc__.split("\n")[0], "runs/tie_heatmaps")
    p.add_argument("--facts", default="forget01_subjects[:8]", help="data selection or JSONL file")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--noise-samples", type=int, default=10)
    args = p.parse_args()
    if args.quick:  # options typed on the command line win over the smoke settings
        _quick.apply_quick(p, args, {"facts": "forget01_subjects[:2]", "steps": 4, "noise_samples": 2})
    with _common.experiment(args) as out:
        backbone = ports.load_pretrained(args.model)
        tokenizer = api.tokenizer(backbone)
        facts = api.encode(backbone, tokenizer, api.load_facts(args.facts))
        config = api.TraceConfig(steps=args.steps, noise_samples=args.noise_samples)
        traced = api.trace(backbone, facts, config, seed=args.seed,
                           progress=lambda xs: _common.progress(xs, "tracing", "chunk"))
        result, sigma, seconds = traced.result, traced.sigma, traced.seconds
        mean_KLM = result.tie.mean(axis=0)
        K, half = config.steps, config.steps // 2
        coordinate = traced.coordinate
        late = tracing.select_coordinate(result.tie, config.modules, k_min=half)
        early = tracing.select_coordinate(result.tie[:, :half], config.modules)
        tie_heatmaps(mean_KLM, config.modules, out, num_facts=facts.num_facts, coordinate=coordinate.as_dict())
        early_late_figure(mean_KLM, config.modules, out / "early_late.png")
        np.savez(out / "tie.npz", tie=result.tie, clean_lp=result.clean_lp, corrupted_lp=result.corrupted_lp)
        per_module = {m: {"max_tie_early": float(mean_KLM[:half, :, i].mean(0).max()),
                          "max_tie_late": float(mean_KLM[half:, :, i].mean(0).max()),
                          "argmax_layer_early": int(mean_KLM[:half, :, i].mean(0).argmax()),
                          "argmax_layer_late": int(mean_KLM[half:, :, i].mean(0).argmax())}
                      for i, m in enumerate(config.modules)}
        gap = (result.clean_lp - result.corrupted_lp).mean(axis=0)
        _common.write_json(out / "results.json", {
            "experiment": "tie_heatmaps (paper Fig. 2)", "model": args.model, "fingerprint": backbone.fingerprint(),
            "facts": list(facts.wheres), "steps": K,
            "noise_samples": config.noise_samples, "seed": args.seed, "seconds": seconds, "sigma": sigma,
            "coordinate": coordinate.as_dict(), "coordinate_late_steps_only": late.as_dict(),
            "coordinate_early_steps_only": early.as_dict(), "per_module": per_module,
            "clean_lp_by_step": result.clean_lp.mean(0), "corrupted_lp_by_step": result.corrupted_lp.mean(0),
            "total_effect_by_step": gap,
            "best_cell_tie": float(mean_KLM[coordinate.step, coordinate.layer, config.modules.index(coordinate.module)]),
        })
        c = coordinate
        print(f"coordinate: layer {c.layer}, step {c.step}, module {c.module}; "
              f"late-steps-only: layer {late.layer}, step {late.step}, {late.module}; "
              f"early-steps-only: layer {early.layer}, step {early.step}, {early.module}")


if __name__ == "__main__":
    main()
