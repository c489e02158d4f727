"""Values of the flat run config as Flower, TOML and the command line give them: ``key=value`` text split, and each
value coerced to its field's type (bool, int, float or str) or refused with the key named."""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any

from fedtl.errors import ConfigError


def field_type(cls: type, name: str) -> type:
    default = next(f for f in fields(cls) if f.name == name).default
    return type(default)


def coerce(key: str, raw: Any, typ: type) -> Any:
    """Coerce a value from TOML/CLI text to the field's type, or say why it can't be."""
    if typ is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return raw.strip().lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"`{key}` must be true or false, got {raw!r}.")
    if typ is int:
        if isinstance(raw, bool):
            raise ConfigError(f"`{key}` must be an integer, got {raw!r}.")
        if isinstance(raw, int):
            return raw
        if isinstance(raw, float) and raw.is_integer():
            return int(raw)
        if isinstance(raw, str):
            try:
                return int(raw.strip())
            except ValueError:
                pass
        raise ConfigError(f"`{key}` must be an integer, got {raw!r}.")
    if typ is float:
        value = None
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            value = float(raw)
        elif isinstance(raw, str):
            try:
                value = float(raw.strip())
            except ValueError:
                pass
        if value is None or not math.isfinite(value):
            raise ConfigError(f"`{key}` must be a finite number, got {raw!r}.")
        return value
    if not isinstance(raw, str):
        raise ConfigError(f"`{key}` must be a string, got {raw!r}.")
    return raw


def parse_assignment(text: str) -> tuple[str, str]:
    """Split a CLI ``key=value`` override."""
    if "=" not in text:
        raise ConfigError(f"Overrides take the form key=value (e.g. privacy.target-epsilon=3), got {text!r}.")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()
