"""Subcommands of the `timerome` CLI: thin wrappers over the public API."""
