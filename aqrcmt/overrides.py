"""Typed settings from text: ``key.path=value`` overrides and JSON mappings, parsed against the dataclasses' type
annotations.

``apply_overrides(cfg, ["optim.lr=1e-4", "model.aqr.render.sigma_bev=1.0"])`` parses each value against its
field's annotation (``none`` for an optional field, JSON for tuples, lists and tables; ``optim.lr_mults.img_neck=0``
sets one table entry) and re-validates; :func:`config_from_dict` builds a :class:`~aqrcmt.config.Config` from a
(possibly partial) nested mapping such as a saved config.json. An unknown key, a key that moved
(:data:`~aqrcmt.config.MOVED_KEYS`) or a value of the wrong type raises :class:`~aqrcmt.config.ConfigError`
naming the key.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from typing import Any, Callable, Literal

from aqrcmt.config import MOVED_KEYS, Config, ConfigError


def _moved_keys_error(keys: list[str], context: str) -> ConfigError:
    """The error for dotted `keys` that moved (all in MOVED_KEYS), naming each one's new key."""
    moved = "; ".join(f"config key '{key}' moved to '{MOVED_KEYS[key]}'" for key in keys)
    return ConfigError(f"{moved} (rename {'it' if len(keys) == 1 else 'them'} {context})")


def _unknown_key(key: str, context: str) -> ConfigError:
    """The error for an unknown dotted `key` (one that moved names its new key)."""
    if key in MOVED_KEYS:
        return _moved_keys_error([key], context)
    return ConfigError(f"unknown config key '{key}' {context}")


def _first_fit(members: tuple, convert: Callable[[Any], Any], error: str) -> Any:
    """`convert` by the first non-None member of a Union that takes the value; ConfigError(error) when none does."""
    for member in members:
        if member is type(None):
            continue
        try:
            return convert(member)
        except ConfigError:
            pass
    raise ConfigError(error)


def parse_value(text: str, hint: Any, key: str) -> Any:
    """Parse a command-line string into the type `hint` of field `key`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        return _first_fit(args, lambda a: parse_value(text, a, key),
                          f"config field '{key}': cannot parse {text!r} as {hint}")
    if origin is Literal:
        for a in args:
            if str(a) == text:
                return a
        raise ConfigError(f"config field '{key}': {text!r} is not one of {args}")
    if hint is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"config field '{key}': expected a bool, got {text!r}")
    if hint in (int, float, str):
        if hint is str:
            return text
        try:
            value = hint(text)
        except ValueError:
            raise ConfigError(f"config field '{key}': expected {hint.__name__}, got {text!r}") from None
        if hint is float and not math.isfinite(value):
            raise ConfigError(f"config field '{key}': expected a finite number, got {text!r}")
        return value
    if origin in (tuple, list, dict):
        try:
            value = json.loads(text.replace("(", "[").replace(")", "]"))
        except json.JSONDecodeError:
            raise ConfigError(f"config field '{key}': expected JSON for {hint}, got {text!r}") from None
        return coerce(value, hint, key)
    raise ConfigError(f"config field '{key}': unsupported type {hint}")


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Coerce a JSON-like value (from a file or an override) into `hint`, checking types."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"config field '{key}': expected a mapping, got {type(value).__name__}")
        return dataclass_from_dict(hint, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _first_fit(args, lambda a: coerce(value, a, key), f"config field '{key}': {value!r} does not fit {hint}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config field '{key}': {value!r} is not one of {args}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config field '{key}': expected a sequence, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], key) for v in value)
        if len(args) != len(value):
            raise ConfigError(f"config field '{key}': expected {len(args)} values, got {len(value)}")
        return tuple(coerce(v, a, key) for v, a in zip(value, args))
    if origin is list:
        return [coerce(v, args[0], key) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config field '{key}': expected a mapping, got {value!r}")
        return {str(k): coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if hint is Any:
        return tuple(value) if isinstance(value, list) else value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    raise ConfigError(f"config field '{key}': expected {getattr(hint, '__name__', hint)}, got {value!r}")


def dataclass_from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """An instance of dataclass `cls` from a (possibly partial) mapping; `prefix` is its dotted path + '.'."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    moved = [prefix + u for u in unknown if prefix + u in MOVED_KEYS]
    if moved:
        raise _moved_keys_error(moved, "in the config mapping")
    if unknown:
        raise ConfigError(f"unknown config field(s) {[prefix + u for u in unknown]}; known: {sorted(names)}")
    return cls(**{k: coerce(v, hints[k], prefix + k) for k, v in data.items()})


def config_from_dict(data: dict) -> Config:
    """Build and validate a Config from a (possibly partial) nested mapping, e.g. a saved config.json."""
    return dataclass_from_dict(Config, data).validate()


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``key.path=value`` overrides in place and re-validate. Raises ConfigError naming a bad key."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        path, text = item.split("=", 1)
        parts = path.strip().split(".")
        target: Any = cfg
        for i, part in enumerate(parts[:-1]):
            if isinstance(target, dict):
                raise ConfigError(f"override '{path}': '{'.'.join(parts[:i + 1])}' is a mapping leaf")
            if not dataclasses.is_dataclass(target) or not hasattr(target, part):
                raise _unknown_key('.'.join(parts[:i + 1]), f"in override '{item}'")
            target = getattr(target, part)
        leaf = parts[-1]
        if isinstance(target, dict):  # e.g. optim.lr_mults.img_backbone=0
            target[leaf] = parse_value(text, float, path)
            continue
        if not dataclasses.is_dataclass(target) or leaf not in {f.name for f in dataclasses.fields(target)}:
            raise _unknown_key(path, f"in override '{item}'")
        hint = typing.get_type_hints(type(target))[leaf]
        if dataclasses.is_dataclass(hint):
            raise ConfigError(f"config key '{path}' is a section; set one of its fields")
        setattr(target, leaf, parse_value(text, hint, path))
    return cfg.validate()
