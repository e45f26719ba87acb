"""Build a :class:`Config` from defaults, a YAML file and ``key=value`` overrides.

Precedence: command line > file > defaults. Values on the command line are parsed as YAML
scalars (``0.1``, ``null``, ``true``, ``[30,60,80]``) and then checked against the field's type.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from typing import Any, Iterable

import yaml

from largebatch.config.schema import Config
from largebatch.errors import UsageError
from largebatch.fileio import write_bytes_atomic


def valid_keys() -> list[str]:
    """Every dotted key the config accepts, e.g. ``optim.base_lr``."""
    return [f"{s.name}.{f.name}" for s in dataclasses.fields(Config)
            for f in dataclasses.fields(_section_type(s.name))]


def _section_type(name: str) -> type:
    return typing.get_type_hints(Config)[name]


def _unknown(key: str) -> UsageError:
    close = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else "; run with --help-config to list the keys"
    return UsageError(f"unknown config key '{key}'{hint}")


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
               dict: "a mapping, e.g. '{key: value}'"}


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the annotation ``hint``; convert int->float and integral float->int."""
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        if len(args) == 1:
            return _coerce(key, value, args[0])
        for arg in args:  # the first type that takes the value, e.g. 25 before 'auto'
            try:
                return _coerce(key, value, arg)
            except UsageError:
                pass
        return value  # the section's own check names what the field takes ('a size in MiB > 0, or auto')
    expected = origin or hint
    if expected is list and isinstance(value, list) and typing.get_args(hint):
        (item,) = typing.get_args(hint)
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if expected is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if expected is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if expected is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if expected is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        return value
    allowed = _TYPE_NAMES.get(expected, expected.__name__)
    if typing.get_origin(hint) is None and value is None:
        allowed += " (null is not allowed here)"
    raise UsageError(f"{key}={value!r} is not allowed: use {allowed}")


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise UsageError(f"argument '{item}' is not key=value; write e.g. optim.base_lr=0.1")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise UsageError(f"config file '{path}' does not exist; pass an existing YAML file to --config")
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UsageError(f"config file '{path}' is not valid YAML{where}; fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file '{path}' must hold a mapping of sections (run:, data:, ...)")
    flat = {}
    for section, body in data.items():
        if not isinstance(body, dict):
            if section in {s.name for s in dataclasses.fields(Config)}:
                raise UsageError(f"config file '{path}': section '{section}' must be a mapping of keys")
            raise _unknown(str(section))
        for key, value in body.items():
            flat[f"{section}.{key}"] = value
    return flat


def load_config(path: str | None = None, overrides: Iterable[str] = ()) -> Config:
    """Resolve the configuration; raises :class:`UsageError` on any bad key or value."""
    values: dict[str, Any] = {}
    if path:
        values.update(_read_yaml(path))
    for item in overrides:
        key, value = _parse_override(item)
        values[key] = value
    return from_flat(values)


def from_flat(values: dict[str, Any]) -> Config:
    """Build a Config from ``{"section.key": value}``; missing keys keep their defaults."""
    keys = set(valid_keys())
    sections: dict[str, dict[str, Any]] = {s.name: {} for s in dataclasses.fields(Config)}
    for key, value in values.items():
        if key not in keys:
            raise _unknown(key)
        section, name = key.split(".", 1)
        hint = typing.get_type_hints(_section_type(section))[name]
        sections[section][name] = _coerce(key, value, hint)
    try:
        return Config(**{name: _section_type(name)(**kw) for name, kw in sections.items()})
    except TypeError as exc:  # a value of a type the field does not take, caught in __post_init__
        raise UsageError(str(exc)) from None


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


def describe_keys() -> str:
    """Every key with its default and docstring, for ``--help-config``."""
    import ast
    import inspect

    from largebatch.config import schema

    docs: dict[str, str] = {}
    tree = ast.parse(inspect.getsource(schema))
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            body = node.body
            for a, b in zip(body, body[1:]):
                if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                    docs[f"{node.name}.{a.target.id}"] = " ".join(str(b.value.value).split())
    lines = []
    defaults = to_dict(Config())
    for s in dataclasses.fields(Config):
        cls = _section_type(s.name)
        for f in dataclasses.fields(cls):
            lines.append(f"{s.name}.{f.name} = {defaults[s.name][f.name]!r}")
            lines.append(f"    {docs.get(f'{cls.__name__}.{f.name}', '')}")
    return "\n".join(lines)


def write_yaml_atomic(data: Any, path: str) -> None:
    """Write ``data`` as YAML to ``path`` atomically."""
    write_bytes_atomic(yaml.safe_dump(data, sort_keys=False).encode(), path)
