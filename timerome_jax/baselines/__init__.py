"""Baselines the paper compares against (DESIGN.md §5; docs/baselines.md).

Training-time (`training`): GradAscent, GradDiff, NPO, SimNPO and RMU on the masked-diffusion
loss, run to convergence of the forget metric, written as ordinary model directories.
Rewrite baselines (`editing`): in-context editing, FT-L and the MEMIT-style weight update.
Inference-time (`inference`): activation steering, CAA and the random-coordinate memory, written as
small directories that `load_inference_baseline(path, backbone)` turns back into an edited backbone.

What an evaluator calls on a directory DIR written by `timerome unlearn`:

    from timerome_jax import baselines
    if baselines.is_inference_baseline(DIR):     # steer / caa / random_memory
        model = baselines.load_inference_baseline(DIR, base_backbone)   # or backbone=None
    else:                                         # gradascent / graddiff / npo / simnpo / rmu
        model = ports.load_pretrained(DIR)
"""

from timerome_jax.baselines.editing import fine_tune_site, in_context_prefix, weight_edit
from timerome_jax.baselines.inference import (INFERENCE_METHODS, InferenceBaseline, build_inference_baseline,
                                              is_inference_baseline, load_inference_baseline, mean_value_memory,
                                              read_kind,
                                              read_meta, save_inference_baseline, steer)
from timerome_jax.baselines.training import TRAINING_METHODS, TrainConfig, TrainResult, train

METHODS = TRAINING_METHODS + INFERENCE_METHODS

__all__ = ["INFERENCE_METHODS", "InferenceBaseline", "METHODS", "TRAINING_METHODS", "TrainConfig", "TrainResult",
           "build_inference_baseline", "fine_tune_site", "in_context_prefix", "is_inference_baseline", "load_inference_baseline", "mean_value_memory", "read_kind", "read_meta",
           "save_inference_baseline", "steer", "train", "weight_edit"]
