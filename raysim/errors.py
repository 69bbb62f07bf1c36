"""Error types shared across raysim. This module imports nothing from raysim, so any module can use it
without creating an import cycle."""


class ConfigError(ValueError):
    """A user mistake in the config (or in data it points to); the CLI prints it and exits with 2."""
