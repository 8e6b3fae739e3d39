"""The low-rank residual edit memory (DESIGN.md §3), in three parts and a specification:

* `ridge`: the pure ridge algebra — `EditMemory` (an edit: `backbone.with_edits(memory)`),
  `build`, `insert`, `remove`, dual and primal solves, whitening, the gate. It knows no backbone.
* `capturing`: `capture`, the one function that captures keys and deltas over denoising states (tracer or
  sampler, chosen steps, last or every subject token, optional mesh), and key statistics of
  retain text (covariance, gate calibration).
* `storage`: `MemoryRecord` (a memory and what it was built from), `save`, `load`.
* `spec`: `MemorySpec`, every choice of a build, validated once (`paper()`, `selective()`), and
  `RewriteValues`, how a rewrite memory computes its values (`timerome_jax.rewrite`).

Building a memory from facts is `timerome_jax.api.build_memory`.
"""

from timerome_jax.memory.capturing import Entries, capture, retain_gate, retain_whitening, sampler_states
from timerome_jax.memory.ridge import (FORMS, MAX_CAPACITY, EditMemory, build, check_gate_rate,
                                       check_hyperparameters, gate_for_rate, insert, remove,
                                       whitening_from_moment, with_gate, with_hyperparameters)
from timerome_jax.memory.spec import (EDIT_CONFIG_FILE, KEY_POSITIONS, VALUE_METHODS, MemorySpec, Recommended,
                                      RewriteValues, SamplerCapture, check_steps, recommended)
from timerome_jax.memory.storage import MEMORY_FORMAT, MemoryRecord, load, save

__all__ = ["EDIT_CONFIG_FILE", "EditMemory", "Entries", "FORMS", "KEY_POSITIONS", "MAX_CAPACITY", "MEMORY_FORMAT", "MemoryRecord",
           "MemorySpec", "Recommended", "RewriteValues", "SamplerCapture", "VALUE_METHODS", "build", "capture", "check_gate_rate", "check_hyperparameters",
           "check_steps", "gate_for_rate", "insert", "load", "recommended", "remove", "retain_gate", "retain_whitening",
           "sampler_states", "save", "whitening_from_moment", "with_gate", "with_hyperparameters"]
