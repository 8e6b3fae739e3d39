"""Backbones ported to Flax: configs, one transformer, checkpoint conversion.

`ports` knows architectures and checkpoints, nothing about tracing or editing.
"""

from ports.backbone import Backbone, convert, load_pretrained, resolve_model_path
from ports.checkpoint import abstract_params, count_params
from ports.config import TransformerConfig
from ports.errors import CheckpointError, ConfigError, UserError
from ports.families import FAMILIES, detect_family, parse_config
from ports.sites import MODULES, SITES, Captured, Edit, Site
from ports.transformer import Transformer

__all__ = [
    "Backbone", "Captured", "CheckpointError", "ConfigError", "Edit", "FAMILIES", "MODULES", "SITES", "Site",
    "Transformer", "TransformerConfig", "UserError", "abstract_params", "convert", "count_params",
    "detect_family", "load_pretrained", "parse_config", "resolve_model_path",
]
