"""What a memory is built from: one frozen, validated specification, checked once.

`MemorySpec` holds every choice of a build: the ridge hyperparameters (α, λ, q), where each fact's
entries are captured (steps of the traced trajectory, the last or every subject token, states of
the greedy sampler), the covariance regulariser's shrinkage, the gate's calibration rate and the
noise of the deltas. `MemorySpec.paper()` is DESIGN.md §3 as written; `MemorySpec.selective()` is
the configuration docs/memory.md recommends. `from_flags` reads the `timerome edit` / `demo`
flags; every bad value is one `InputError` here, before any model is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import numpy as np

from timerome_jax import sampler
from timerome_jax.errors import InputError
from timerome_jax.memory.ridge import check_gate_rate

KEY_POSITIONS = ("last", "subject")
# how a rewrite memory computes its values (timerome_jax.rewrite)
VALUE_METHODS = ("optimised", "in_context")


@dataclasses.dataclass(frozen=True)
class RewriteValues:
    """How a rewrite's value is computed (module docstring): `method` and, for "optimised", Adam
    `steps` at `learning_rate`, the KL weight β, the norm weight γ, the clamp and J MC masks."""

    method: str = "optimised"
    steps: int = 100
    learning_rate: float = 0.5
    kl_weight: float = 0.0625
    norm_weight: float = 1e-3
    clamp: float = 4.0
    mc_samples: int = 8

    def __post_init__(self):
        if self.method not in VALUE_METHODS:
            raise InputError(f"unknown rewrite value method {self.method!r}; choose {' or '.join(VALUE_METHODS)}")
        for name in ("steps", "mc_samples"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise InputError(f"rewrite {name.replace('_', ' ')} must be a positive integer, got {value!r}")
        for name in ("learning_rate", "clamp"):
            if not np.isfinite(getattr(self, name)) or getattr(self, name) <= 0:
                raise InputError(f"rewrite {name.replace('_', ' ')} must be a finite number > 0, got {getattr(self, name)}")
        for name in ("kl_weight", "norm_weight"):
            if not np.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise InputError(f"rewrite {name.replace('_', ' ')} must be a finite number >= 0, got {getattr(self, name)}")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_steps(steps, count: int, what: str) -> tuple[int, ...]:
    """`steps` as distinct ints in 0..count − 1 (at least one), or one error naming `what`."""
    steps = tuple(int(k) for k in steps)
    if not steps or len(set(steps)) != len(steps) or not all(0 <= k < count for k in steps):
        raise InputError(f"{what} must be distinct steps in 0..{count - 1}, got {list(steps)}")
    return steps


@dataclasses.dataclass(frozen=True)
class SamplerCapture:
    """Memory entries along the sampler's own trajectory (beyond the paper; docs/memory.md).

    The tracer's trajectory lays a fact out as prompt + its answer's length of masks and reveals
    the true answer; the sampler lays it out as prompt + `gen_length` masks and reveals its own
    proposals block by block. With bidirectional attention the subject's keys differ between the
    two, and a gated memory built from the tracer's states alone fires on a minority of the
    subject tokens of a generation (docs/RESULTS_v3.md §9). With a SamplerCapture, each fact also
    gets entries in the unedited greedy sampler's states before `capture_steps` of its
    (`gen_length`, `steps`, `block_length`) schedule; use the schedule you generate with.
    `mentions` (with key positions "subject"): the subject's copies in the generated answer are
    subject tokens too, from the step they are revealed on; off by default: on tofu-tiny it added
    a third more entries and moved forget ROUGE-L by 0.002."""

    gen_length: int
    steps: int
    block_length: int
    capture_steps: tuple[int, ...]
    mentions: bool = False

    def __post_init__(self):
        sampler.check_schedule(self.gen_length, self.steps, self.block_length)
        object.__setattr__(self, "capture_steps", check_steps(self.capture_steps, self.steps, "sampler capture steps"))

    @classmethod
    def evenly(cls, count: int, *, gen_length: int, steps: int, block_length: int,
               mentions: bool = False) -> "SamplerCapture":
        """`count` steps spread evenly over the schedule, the first step included."""
        if not isinstance(count, (int, np.integer)) or not 1 <= count <= steps:
            raise InputError(f"the number of sampler steps to capture must lie in 1..{steps}, got {count}")
        return cls(gen_length, steps, block_length, tuple(int(k) for k in np.unique(
            np.floor(np.arange(count) * steps / count).astype(int))), mentions)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self) | {"capture_steps": list(self.capture_steps)}


# the generation schedule the selective preset's sampler entries follow (`timerome demo`, eval's ROUGE)
SELECTIVE_SCHEDULE = dict(gen_length=96, steps=48, block_length=32)


@dataclasses.dataclass(frozen=True)
class MemorySpec:
    """How to build an edit memory (module docstring).

    alpha, lam, q: the ridge memory's scale α ≥ 0, ridge λ > 0 (scale-free) and sparsity q (None:
      keep every coefficient; checked against the number of entries at build time).
    capture_steps: steps of the coordinate's K-step trajectory at which each fact is captured
      (None: the traced step k*; "all": every step).
    key_positions: "last" subject token (the paper's) or every "subject" token, one entry each.
    sampler: also capture along the greedy sampler's trajectory (`SamplerCapture`), or None.
    gate_rate: gate the memory so that this fraction of the gate facts' tokens is still edited
      (None: the paper's ungated memory).
    shrinkage: the covariance regulariser's C + shrinkage · (tr C / d_k) I (used when covariance
      facts are given).
    noise_samples, noise_scale: R draws of ν σ noise whose mean effect is each delta.
    rewrite: a rewrite memory (`RewriteValues`: each fact's value makes the model answer the fact's
      answer, read with the answer masked at its last subject token; DESIGN.md §3b), or None: a
      forgetting memory (corrupted − clean deltas).
    """

    alpha: float = 1.0
    lam: float = 0.1
    q: int | None = None
    capture_steps: tuple[int, ...] | str | None = None
    key_positions: str = "last"
    sampler: SamplerCapture | None = None
    gate_rate: float | None = None
    shrinkage: float = 1e-2
    noise_samples: int = 10
    noise_scale: float = 3.0
    rewrite: RewriteValues | None = None

    def __post_init__(self):
        if not math.isfinite(self.alpha) or self.alpha < 0:
            raise InputError(f"alpha must be a finite number >= 0, got {self.alpha}")
        if not math.isfinite(self.lam) or self.lam <= 0:
            raise InputError(f"lambda (ridge) must be a finite number > 0, got {self.lam}")
        if self.q is not None and (not isinstance(self.q, (int, np.integer)) or self.q < 1):
            raise InputError(f"q must lie in 1..n (number of memory entries), got {self.q}")
        if self.key_positions not in KEY_POSITIONS:
            raise InputError(f"key positions must be one of {', '.join(KEY_POSITIONS)}, got {self.key_positions!r}")
        if self.gate_rate is not None:
            check_gate_rate(self.gate_rate)
        if not math.isfinite(self.shrinkage) or self.shrinkage <= 0:
            raise InputError(f"the covariance shrinkage must be a finite number > 0, got {self.shrinkage}")
        if not isinstance(self.noise_samples, (int, np.integer)) or self.noise_samples < 1:
            raise InputError(f"noise samples must be an integer >= 1, got {self.noise_samples!r}")
        if not math.isfinite(self.noise_scale) or self.noise_scale < 0:
            raise InputError(f"the noise scale must be a finite number >= 0, got {self.noise_scale}")
        steps = self.capture_steps
        if isinstance(steps, str):
            text = steps.strip()
            if text == "all":
                steps = "all"
            else:
                try:
                    steps = tuple(int(t) for t in text.split(","))
                except ValueError:
                    raise InputError(f"--capture-steps must be comma-separated integers or 'all', got {text!r}") from None
        elif steps is not None:
            steps = tuple(int(k) for k in steps)
        if isinstance(steps, tuple) and (not steps or len(set(steps)) != len(steps) or min(steps) < 0):
            raise InputError(f"capture steps must be distinct non-negative steps, got {list(steps)}")
        object.__setattr__(self, "capture_steps", steps)
        if self.rewrite is not None and (steps is not None or self.sampler is not None):
            raise InputError("a rewrite memory reads each fact in one state, its prompt with the answer masked: "
                             "capture steps and sampler steps do not apply")

    def steps_for(self, coordinate) -> tuple[int, ...]:
        """The capture steps resolved against the coordinate's K-step trajectory."""
        if self.capture_steps is None:
            return (coordinate.step,)
        if self.capture_steps == "all":
            return tuple(range(coordinate.steps))
        return check_steps(self.capture_steps, coordinate.steps, "capture steps")

    def replace(self, **changes) -> "MemorySpec":
        return dataclasses.replace(self, **changes)

    @classmethod
    def paper(cls, **changes) -> "MemorySpec":
        """DESIGN.md §3 as written: one key per fact at k*, α = 1, λ = 0.1, ungated."""
        return cls(**changes)

    @classmethod
    def selective(cls, **changes) -> "MemorySpec":
        """The recommended memory (docs/memory.md): every step, every subject token, 8 steps of the
        G = 96 / 48-step / block-32 sampler trajectory, gated at rate 0.001, α = 32."""
        preset = dict(alpha=32.0, capture_steps="all", key_positions="subject", gate_rate=0.001,
                      sampler=SamplerCapture.evenly(8, **SELECTIVE_SCHEDULE))
        return cls(**{**preset, **changes})

    @classmethod
    def rewriting(cls, **changes) -> "MemorySpec":
        """A rewrite memory (DESIGN.md §3b; docs/rewrite.md): ROME-style optimised values at every
        subject token, α = 1, λ = 10⁻⁴ (far smaller than forgetting's 0.1: the subject tokens'
        keys are close to each other, and a larger ridge mixes their values on read-back), gated at
        rate 0.001 (so that the values act on the edited subjects only)."""
        preset = dict(lam=1e-4, key_positions="subject", gate_rate=0.001, rewrite=RewriteValues())
        return cls(**{**preset, **changes})

    @classmethod
    def from_flags(cls, args: argparse.Namespace, *, base: "MemorySpec | None" = None) -> "MemorySpec":
        """The spec of `timerome edit` / `demo` flags: explicit flags override `base` (default the
        paper's). Flags a command does not have keep the base's value."""
        base = base or cls.paper()
        if getattr(args, "gate_rate", None) is not None:
            check_gate_rate(args.gate_rate, "--gate-rate")
        shrinkage = getattr(args, "shrinkage", None)
        if shrinkage is not None and (not math.isfinite(shrinkage) or shrinkage <= 0):
            raise InputError(f"--shrinkage must be a finite number > 0, got {shrinkage}")
        flag = lambda name, default: default if getattr(args, name, None) is None else getattr(args, name)  # noqa: E731
        sampler_steps = getattr(args, "sampler_steps", None)
        sampler_capture = base.sampler if sampler_steps is None else SamplerCapture.evenly(
            sampler_steps, gen_length=flag("gen_length", 96), steps=flag("gen_steps", 48),
            block_length=flag("block_length", 32))
        values = base.rewrite
        if values is not None:
            values = dataclasses.replace(values, method=flag("rewrite_method", values.method),
                                         steps=flag("rewrite_steps", values.steps),
                                         learning_rate=flag("rewrite_lr", values.learning_rate),
                                         kl_weight=flag("kl_weight", values.kl_weight))
        return cls(alpha=flag("alpha", base.alpha), lam=flag("lam", base.lam), q=flag("q", base.q),
                   capture_steps=flag("capture_steps", base.capture_steps),
                   key_positions=flag("key_positions", base.key_positions), sampler=sampler_capture,
                   gate_rate=flag("gate_rate", base.gate_rate), shrinkage=flag("shrinkage", base.shrinkage),
                   noise_samples=flag("noise_samples", base.noise_samples),
                   noise_scale=flag("noise_scale", base.noise_scale), rewrite=values)


# in a model directory: the edit configuration tuned for that model (as generation_config.json holds its
# recommended sampler schedule), written from experiments/heldout.py's tuning step
EDIT_CONFIG_FILE = "edit_config.json"


@dataclasses.dataclass(frozen=True)
class Recommended:
    """What `timerome edit` / `demo` build without tuning flags: `spec` (the selective preset with the
    model's tuned α and gate rate), `coordinate` (LAYER,MODULE,STEP and K as a dict, or None: trace
    the facts) and `source` (the edit_config.json it came from, or None: the preset alone)."""

    spec: MemorySpec
    coordinate: dict | None = None
    source: str | None = None


def recommended(backbone) -> Recommended:
    """The recommended memory for this backbone: `MemorySpec.selective()` with the values of the
    model directory's `edit_config.json` when it has one ({"alpha", "gate_rate", "coordinate":
    {"layer", "module", "step", "steps"}}, each optional; other keys are notes), else the preset
    alone. A malformed file is one error naming it."""
    import json
    from pathlib import Path

    path = Path(backbone.source or "") / EDIT_CONFIG_FILE
    if not backbone.source or not path.is_file():
        return Recommended(MemorySpec.selective())
    try:
        found = json.loads(path.read_text())
        changes = {k: float(found[k]) for k in ("alpha", "gate_rate") if k in found}
        spec = MemorySpec.selective(**changes)
        coordinate = found.get("coordinate")
        if coordinate is not None:
            coordinate = {"layer": int(coordinate["layer"]), "module": str(coordinate["module"]),
                          "step": int(coordinate["step"]), "steps": int(coordinate.get("steps", 8))}
            n_layers = backbone.config.n_layers
            if not (0 <= coordinate["layer"] < n_layers and 0 <= coordinate["step"] < coordinate["steps"]):
                raise ValueError(f"coordinate {coordinate} is outside this model's {n_layers} layers or its K steps")
    except InputError as e:
        raise InputError(f"{path}: {e}") from None
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise InputError(f"{path} is not a valid edit config: {e}") from None
    return Recommended(spec, coordinate, str(path))


__all__ = ["EDIT_CONFIG_FILE", "KEY_POSITIONS", "VALUE_METHODS", "MemorySpec", "Recommended", "RewriteValues",
           "SamplerCapture", "check_steps", "recommended"]
