"""TimeROME-JAX: diffusion-time causal tracing and inference-time editing of masked diffusion LMs.

`timerome_jax` knows the method (diffusion process, tracing, edit memory, evaluation) and talks to
any backbone from `ports` through the `Backbone` interface.
"""

import os as _os

# transformers is used for tokenizers only; its "PyTorch was not found" notice is noise here and
# would break the CLI's one-line error contract.
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
