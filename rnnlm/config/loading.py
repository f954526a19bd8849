"""From YAML and `--set a.b=value` overrides to a checked Config.

Unknown keys (with the nearest valid one), wrong types and malformed overrides raise
`ConfigError` with a one-line message that names the key and where it came from; the
finished tree then goes through every check of rnnlm.config.checks.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from rnnlm.config.schema import Config
from rnnlm.errors import ConfigError


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML file (or start from defaults when path is None) and apply `a.b=v` overrides."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found: pass an existing YAML file")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML{_yaml_problem(exc)}") \
                from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: it is not UTF-8 text "
                              f"(byte {exc.start})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, not a "
                              f"{type(raw).__name__}")
    return config_from_dict(raw, overrides, source=str(path) if path else "defaults")


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """Where the parser stopped and why, in one line: " at line 3, column 7: mapping values
    are not allowed here (while parsing a block mapping that starts at line 2, column 1)"."""
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    if mark is None or not problem:
        return ": " + (str(exc).strip().splitlines() or ["unreadable"])[0]
    text = f" at line {mark.line + 1}, column {mark.column + 1}: {problem}"
    context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and start is not None:
        text += f" ({context} that starts at line {start.line + 1}, column {start.column + 1})"
    elif context:
        text += f" ({context})"
    return text


def config_from_dict(raw: dict, overrides=(), source: str = "config") -> Config:
    raw = _deep_copy(raw)
    overridden = set()
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
        overridden.add(key)
    cfg = _build(Config, raw, prefix="", source=source, overridden=frozenset(overridden))
    # The checks ask the model classes, which import torch: loaded with the first config,
    # so that importing this module (every command's --help) stays light.
    from rnnlm.config.checks import validate

    validate(cfg)
    return cfg


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r} must look like key=value, e.g. train.epochs=50")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def _deep_copy(raw):
    if isinstance(raw, dict):
        return {k: _deep_copy(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_deep_copy(v) for v in raw]
    return raw


def _blame(key: str, source: str, overridden: frozenset) -> str:
    """Where the value of dotted `key` came from: --set when an override set it (or a section
    above it), else `source` (the config file), so a message points at what to fix."""
    if any(key == k or key.startswith(k + ".") for k in overridden):
        return "--set"
    return source


def _build(cls, raw: dict, prefix: str, source: str, overridden: frozenset = frozenset()):
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'top level'} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"{_blame(f'{prefix}{key}', source, overridden)}: unknown key "
                              f"{prefix}{key}{hint}; "
                              f"valid keys here: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, raw[name], f"{prefix}{name}.",
                                  _blame(f"{prefix}{name}", source, overridden), overridden)
        else:
            kwargs[name] = _coerce(raw[name], hint, f"{prefix}{name}",
                                   _blame(f"{prefix}{name}", source, overridden))
    return cls(**kwargs)


def _coerce(value, hint, key: str, source: str):
    """Check `value` against a type hint; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key, source)
            except _NotFinite:
                raise  # the value is a number, just not a usable one: say so
            except ConfigError as exc:
                errors.append(exc)
        allowed = " or ".join("null" if o is type(None) else _type_name(o) for o in options)
        raise ConfigError(f"{source}: {key} must be {allowed}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{source}: {key} must be one of {', '.join(map(str, choices))}; "
                              f"got {value!r}")
        return value
    if origin in (list, tuple):
        (item_type, *_) = typing.get_args(hint) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        return [_coerce(v, item_type, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if hint is Any:
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
        return _finite(value, key, source)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")  # a bug in this module


class _NotFinite(ConfigError):
    """A float key given NaN or infinity."""


def _finite(value: int | float, key: str, source: str) -> float:
    """`value` as a float, refused when NaN or infinite (inf, .nan, 1e400 or an integer past
    a float's range): no float of a config has a use for them, and a NaN learning rate
    would train on silently."""
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise _NotFinite(f"{source}: {key} must be a finite number, got {number}")
    return number


def _type_name(t) -> str:
    if typing.get_origin(t) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(t)))
    if typing.get_origin(t) in (list, tuple):
        return "a list"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(
        t, getattr(t, "__name__", str(t)))
