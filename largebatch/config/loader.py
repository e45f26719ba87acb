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

from largebatch.config.keydocs import key_docs
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
               dict: "a mapping"}

# What a list or mapping looks like, per key (command-line form; the YAML form is derived from it).
_EXAMPLES = {
    "schedule.milestones": "[30,60,80]",
    "optim.betas": "[0.9,0.999]",
    "comm.bucket_candidates_mb": "[1,4,16,64]",
    "train.phases": "[{epochs: 5, image_size: 128, global_batch: 512}]",
    "data.options": "{download: false}",
    "model.options": "{drop_rate: 0.1}",
}


def example(key: str, kind: type, in_file: bool = False) -> str:
    """How to write a list or mapping for ``key``: ``key='[30,60,80]'`` on the command line, or
    ``milestones: [30, 60, 80]`` in a YAML file."""
    text = _EXAMPLES.get(key.split("[")[0], "[1,2]" if kind is list else "{name: value}")
    if in_file:
        flow = yaml.safe_dump(yaml.safe_load(text), default_flow_style=True, sort_keys=False, width=10**6).strip()
        return f"{key.split('.', 1)[1]}: {flow} under '{key.split('.')[0]}:'"
    return f"{key}='{text}'"


class _Origin:
    """Where a value came from, for messages: the command line or a config file."""

    def __init__(self, path: str | None = None):
        self.path = path

    def wrap(self, message: str) -> str:
        return message if self.path is None else f"config file '{self.path}': {message}"


def _coerce(key: str, value: Any, hint: Any, origin: _Origin | None = None) -> Any:
    """Check ``value`` against the annotation ``hint``; convert int->float and integral float->int."""
    origin = origin or _Origin()
    origin_type = typing.get_origin(hint)
    if origin_type is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        if len(args) == 1:
            return _coerce(key, value, args[0], origin)
        for arg in args:  # the first type that takes the value, e.g. 25 before 'auto'
            try:
                return _coerce(key, value, arg, origin)
            except UsageError:
                pass
        return value  # the section's own check names what the field takes ('a size in MiB > 0, or auto')
    expected = origin_type or hint
    if expected is list and isinstance(value, list) and typing.get_args(hint):
        (item,) = typing.get_args(hint)
        return [_coerce(f"{key}[{i}]", v, item, origin) for i, v in enumerate(value)]
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
    if expected in (list, dict):
        allowed += ", e.g. " + example(key, expected, in_file=origin.path is not None)
        if origin.path is None:
            allowed += " (quoted for the shell)"
    if typing.get_origin(hint) is None and value is None:
        allowed += " (null is not allowed here)"
    raise UsageError(origin.wrap(f"{key}={value!r} is not allowed: use {allowed}"))


def parse_override(item: str) -> tuple[str, Any]:
    """``key=value`` from the command line as (key, value), the value read as a YAML scalar."""
    if "=" not in item:
        raise UsageError(f"argument '{item}' is not key=value; write e.g. optim.base_lr=0.1, and quote a value "
                         "with spaces: schedule.milestones='[30, 60]'")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


_SECTION_EXAMPLE = "e.g. 'train:' on one line and '  epochs: 3' indented under it"


def _yaml_problem(path: str, text: str, exc: yaml.YAMLError) -> str:
    """One line on why ``text`` did not parse: a tab in the indentation, or YAML's own words."""
    if isinstance(exc, yaml.reader.ReaderError):
        return (f"config file '{path}' is not a YAML text file (character {exc.position} is a control character); "
                "--config takes a YAML file of sections such as 'train:' and 'optim:'")
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    last = mark.line + 1 if mark is not None else None
    for n, line in enumerate(text.splitlines(), 1):
        if last is not None and n > last:
            break
        indent = line[:len(line) - len(line.lstrip(" \t"))]
        if "\t" in indent and line.strip():
            return f"config file '{path}' line {n} uses a tab for indentation; YAML needs spaces"
    if last is not None and "'\\t'" in str(problem):
        return f"config file '{path}' line {last} has a tab character; YAML needs spaces"
    where = f" at line {mark.line + 1}" if mark is not None else ""
    why = f" ({problem})" if problem else ""
    return (f"config file '{path}' is not valid YAML{where}{why}; --config takes a YAML file of sections, "
            + _SECTION_EXAMPLE)


def _read_yaml(path: str) -> dict:
    if os.path.isdir(path):
        raise UsageError(f"config file '{path}' is a folder; pass a YAML file to --config")
    if not os.path.isfile(path):
        raise UsageError(f"config file '{path}' does not exist; pass an existing YAML file to --config")
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise UsageError(f"config file '{path}' cannot be read ({exc.strerror}); check its permissions") from None
    at = raw.find(b"\0")
    if at >= 0:
        raise UsageError(f"config file '{path}' is not a YAML text file (byte {at} is a NUL byte); "
                         "--config takes a YAML file of sections such as 'train:' and 'optim:'")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UsageError(f"config file '{path}' is not UTF-8 text (byte {exc.start}); save it as UTF-8 "
                         "(--config takes a YAML file of sections such as 'train:' and 'optim:')") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsageError(_yaml_problem(path, text, exc)) from None
    except (RecursionError, ValueError, OverflowError) as exc:  # values YAML reads but Python cannot hold
        raise UsageError(f"config file '{path}' cannot be read as YAML ({type(exc).__name__}: {exc}); "
                         "fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        kind = {list: "a list", str: "a single string"}.get(type(data), f"a single {type(data).__name__} value")
        raise UsageError(f"config file '{path}' holds {kind}, not a mapping of sections (run:, data:, ...); "
                         + _SECTION_EXAMPLE)
    sections = [s.name for s in dataclasses.fields(Config)]
    flat = {}
    for section, body in data.items():
        name = str(section)
        if name not in sections:
            if name in valid_keys():
                head, key = name.split(".", 1)
                raise UsageError(f"config file '{path}': write '{name}' as '{head}:' with '  {key}: ...' indented "
                                 "under it (dotted keys are for the command line)")
            close = difflib.get_close_matches(name, sections, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise UsageError(f"config file '{path}': unknown section '{name}'; {hint}(the sections are "
                             + ", ".join(sections) + ")")
        if body is None:  # a section whose keys are all commented out
            continue
        if not isinstance(body, dict):
            raise UsageError(f"config file '{path}': section '{name}' must be a mapping of keys, not {body!r}; "
                             f"e.g. '{name}:' on one line and its keys indented under it, or '{name}: {{key: value}}'")
        for key, value in body.items():
            flat[f"{name}.{key}"] = value
    return flat


def load_config(path: str | None = None, overrides: Iterable[str] = ()) -> Config:
    """Resolve the configuration; raises :class:`UsageError` on any bad key or value."""
    values: dict[str, Any] = {}
    from_file: set[str] = set()
    if path:
        values.update(_read_yaml(path))
        from_file.update(values)
    for item in overrides:
        key, value = parse_override(item)
        values[key] = value
        from_file.discard(key)
    return from_flat(values, {k: path for k in from_file})


def from_flat(values: dict[str, Any], files: dict[str, str] | None = None) -> Config:
    """Build a Config from ``{"section.key": value}``; missing keys keep their defaults. ``files``
    names the config file a key's value came from, for messages."""
    keys = set(valid_keys())
    sections: dict[str, dict[str, Any]] = {s.name: {} for s in dataclasses.fields(Config)}
    for key, value in values.items():
        if key not in keys:
            error = _unknown(key)
            if files and key in files:
                raise UsageError(f"config file '{files[key]}': {error}")
            raise error
        section, name = key.split(".", 1)
        hint = typing.get_type_hints(_section_type(section))[name]
        sections[section][name] = _coerce(key, value, hint, _Origin((files or {}).get(key)))
    try:
        return Config(**{name: _section_type(name)(**kw) for name, kw in sections.items()})
    except TypeError as exc:  # a value of a type the field does not take, caught in __post_init__
        raise UsageError(str(exc)) from None


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


def describe_keys() -> str:
    """Every key with its default and docstring, for ``--help-config``."""
    return "\n".join(f"{k.key} = {k.default!r}{f' ({k.resolved})' if k.resolved else ''}\n    {k.doc}"
                     for k in key_docs())


def write_yaml_atomic(data: Any, path: str) -> None:
    """Write ``data`` as YAML to ``path`` atomically."""
    write_bytes_atomic(yaml.safe_dump(data, sort_keys=False).encode(), path)
