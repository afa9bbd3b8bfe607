"""Typed configuration trees: dataclasses documented field by field, built from YAML mappings with
``--set key=value`` overrides, every value checked against its field's type.

Errors raise `ConfigError` naming the key, what was expected and what came. `red_ppo.config` holds
the trainer's tree; the demo's, the study's and the synthetic language's sections live with them.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

# PyYAML reads YAML 1.1, where a float needs a dot: ``1e-5`` comes back as the string '1e-5'.
EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key, the expectation and the value."""


def doc(default: Any, help: str) -> Any:
    """A dataclass field with a default (copied when mutable) and its documentation."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    if is_dataclass(default):
        return field(default_factory=lambda d=default: dataclasses.replace(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def require(ok: bool, key: str, expected: str, value: Any) -> None:
    """ConfigError ``key: expected ..., got value`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")


# ---------------------------------------------------------------- building a tree from plain data

# a field's type -> what its messages expect, and the test a value must pass (no bool passes for a number)
PLAIN_TYPES = {bool: ("true or false", lambda v: isinstance(v, bool)),
               int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
               float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
               str: ("a string", lambda v: isinstance(v, str)),
               dict: ("a mapping", lambda v: isinstance(v, dict)),
               list: ("a list", lambda v: isinstance(v, (list, tuple)))}


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _expected(tp: Any) -> str:
    """What a message says a value of the field type ``tp`` must be."""
    if typing.get_origin(tp) is list:
        return f"a list (each {_expected(typing.get_args(tp)[0])})"
    return PLAIN_TYPES[tp][0]


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        if len(members) == 1:  # ``X | None``
            return _coerce(members[0], value, key)
        for member in members:  # ``list[str] | str``: the first member the value fits
            try:
                return _coerce(member, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {' or '.join(_expected(m) for m in members)}, got {_show(value)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {_show(value)}")
        return value
    if is_dataclass(tp):
        return build(tp, value, key + ".")
    if tp is float and isinstance(value, str) and EXPONENT_FLOAT.fullmatch(value.strip()):
        return float(value)
    if tp in PLAIN_TYPES:
        expected, ok = PLAIN_TYPES[tp]
        if not ok(value):
            raise ConfigError(f"{key}: expected {expected}, got {_show(value)}")
        return tp(value)  # ints become floats, and mappings and lists are copied
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_expected(tp)}, got {_show(value)}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} numbers, got {_show(value)}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    raise TypeError(f"{key}: unsupported field type {tp}")  # a bug in the tree's types, not in the user's config


def build(cls: type, data: Any, prefix: str = "") -> Any:
    """The dataclass ``cls`` from a mapping (None: all defaults); ``prefix`` names the mapping's keys."""
    where = prefix.rstrip(".") or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    for name in data:
        if name not in known:
            raise ConfigError(f"{prefix}{name}: unknown key; expected one of {known}")
    return cls(**{name: _coerce(hints[name], data[name], prefix + name) for name in known if name in data})


def load(cls: type, path: str | Path | None = None, overrides: list[str] | None = None,
         base: dict | None = None) -> Any:
    """``cls`` from a YAML file merged over ``base`` (or the defaults), with ``--set`` overrides applied."""
    data = dict(base or {})
    if path is not None:
        data = merge(data, read_yaml(path))
    return build(cls, apply_overrides(data, list(overrides or [])))


def read_yaml(path: str | Path) -> dict:
    """The mapping at the top of a YAML file (empty for an empty file)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: expected an existing YAML file, got {str(path)!r} (not found)")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"--config: {path} is not valid YAML ({error})") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"--config: expected a mapping at the top of {path}, got {_show(loaded)}")
    return loaded or {}


def merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"ppo.epochs=2"`` -> (["ppo", "epochs"], 2); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set: expected key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set: expected a dotted key such as ppo.epochs, got {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {key}: the value {raw!r} is not valid YAML ({error})") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {'.'.join(parts)}: {'.'.join(parts[:i + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return data


# ---------------------------------------------------------------- back to plain data and text

def to_dict(cfg: Any) -> dict:
    """The config as plain YAML-able data (tuples become lists)."""
    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value
    return plain(dataclasses.asdict(cfg))


def describe(cfg: Any, indent: int = 0) -> str:
    """The tree as commented YAML: every field with its value and its documentation."""
    lines = []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        pad = "  " * indent
        lines.append(f"{pad}# {f.metadata.get('help', '')}")
        if is_dataclass(value):
            lines.append(f"{pad}{f.name}:")
            lines.append(describe(value, indent + 1))
        else:
            plain = list(value) if isinstance(value, tuple) else value
            dumped = yaml.safe_dump({f.name: plain}, default_flow_style=True, width=1000).strip()
            lines.append(f"{pad}{dumped[1:-1] if dumped.startswith('{') else dumped}")
    return "\n".join(lines)

