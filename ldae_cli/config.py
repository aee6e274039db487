"""One config system for every stage: YAML files -> typed dataclasses.

A config file may name a `base:` config whose values it changes (the trajectory rows do this, so
each row file shows exactly what that step of the deconstruction changes). Unknown keys are
rejected with their dotted path and the closest valid name; `--set a.b=c` overrides any key with
the same type checking as the file.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from ldae_cli.errors import LdaeError

BUNDLED_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def config_search_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("LDAE_CONFIGS"):
        dirs.append(Path(os.environ["LDAE_CONFIGS"]))
    dirs.append(BUNDLED_CONFIGS)
    return dirs


def find_config(name: str | os.PathLike) -> Path:
    """A config by path, else by name (with or without `.yaml`) in the bundled `configs/` tree."""
    path = Path(name)
    if path.is_file():
        return path
    candidates = [str(name)] if str(name).endswith((".yaml", ".yml")) else [f"{name}.yaml", str(name)]
    for root in config_search_dirs():
        for cand in candidates:
            if (root / cand).is_file():
                return root / cand
        for cand in candidates:  # a bare name may live in a subfolder: `T3.5` -> trajectory/T3.5.yaml
            hits = sorted(h for h in root.rglob(Path(cand).name) if h.is_file()) if root.is_dir() else []
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                listed = ", ".join(str(h.relative_to(root)) for h in hits)
                raise LdaeError(f"config '{name}' is ambiguous in {root}: {listed}")
    known = sorted(str(p.relative_to(r)) for r in config_search_dirs() if r.is_dir() for p in r.rglob("*.yaml"))
    close = difflib.get_close_matches(str(name), known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; bundled configs are in {BUNDLED_CONFIGS}"
    raise LdaeError(f"config file '{name}' not found (looked at that path and in the bundled configs){hint}")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Read a YAML config, merging it over its `base:` chain."""
    if path.resolve() in seen:
        raise LdaeError(f"{path}: 'base' chain loops back to itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise LdaeError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise LdaeError(f"{path}: a config must be a mapping of keys to values, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    base_path = path.parent / base if (path.parent / base).is_file() else find_config(base)
    return deep_merge(_read_yaml(base_path, seen + (path.resolve(),)), data)


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        return f"list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where YAML is ambiguous."""
    origin = get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise LdaeError(f"{where}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return _build(tp, value, where)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except LdaeError:
                continue
        raise LdaeError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if value in choices:
            return value
        if str(value) in choices:  # `loss_weight: 1` arrives from YAML as the int 1
            return str(value)
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise LdaeError(f"{where}: {value!r} is not one of {', '.join(repr(c) for c in choices)}{hint}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise LdaeError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_) = get_args(tp)
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:  # e.g. the overrides of a study variant: dotted keys -> values
        if not isinstance(value, dict):
            raise LdaeError(f"{where}: expected a mapping, got {value!r}")
        key_tp, value_tp = get_args(tp)
        return {_coerce(k, key_tp, where): _coerce(v, value_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise LdaeError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise LdaeError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads `1e-4` as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise LdaeError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(number):  # no setting means anything at NaN or infinity
            raise LdaeError(f"{where}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise LdaeError(f"{where}: expected a string, got {value!r}")
    if tp is Any:
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {where}")


def _build(cls: type, data: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else key
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = (
                f"; did you mean '{prefix + '.' if prefix else ''}{close[0]}'?"
                if close
                else (f"; valid keys here: {', '.join(names)}")
            )
            raise LdaeError(f"unknown config key '{where}'{hint}")
    kwargs = {}
    for name in names:
        if name in data:
            where = f"{prefix}.{name}" if prefix else name
            kwargs[name] = _coerce(data[name], hints[name], where)
    try:
        obj = cls(**kwargs)
    except TypeError as exc:
        raise LdaeError(f"config section '{prefix or cls.__name__}': {exc}") from None
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate()
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=c` -> (['a', 'b'], parsed c); values are read as YAML (so `true`, `[1, 2]`, `null` work)."""
    if "=" not in text:
        raise LdaeError(f"--set '{text}': expected KEY=VALUE, e.g. --set optim.epochs=10")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise LdaeError(f"--set '{text}': the key before '=' is empty")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_override(data: dict, keys: list[str], value: Any) -> None:
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise LdaeError(f"--set {'.'.join(keys)}: '{k}' is a value, not a section")
    node[keys[-1]] = value


def load_config(
    cls: type,
    config: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    flags: dict[str, Any] | None = None,
    base: dict | None = None,
) -> Any:
    """Defaults < `base` (a stored config) < config file (with its bases) < flags < `--set` overrides."""
    data: dict = copy.deepcopy(base) if base else {}
    if config:
        data = deep_merge(data, _read_yaml(find_config(config)))
    for dotted, value in (flags or {}).items():
        if value is not None:
            apply_override(data, dotted.split("."), value)
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(data, keys, value)
    return _build(cls, data, "")


def config_from_dict(cls: type, data: dict) -> Any:
    """Rebuild a config stored in a checkpoint (same checks as a file)."""
    return _build(cls, data, "")


def to_dict(cfg: Any) -> dict:
    def convert(v):
        if isinstance(v, tuple):
            return [convert(x) for x in v]
        if isinstance(v, list):
            return [convert(x) for x in v]
        if isinstance(v, dict):
            return {k: convert(x) for k, x in v.items()}
        return v

    return convert(dataclasses.asdict(cfg))


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def require(section: str, rule: str, ok, **values) -> None:
    """Range checks of config values: `ok(v)` must hold for each of `values` (None = unset, allowed), else the
    key, its value and the rule are named, e.g. require("optim", "> 0", lambda v: v > 0, blr=self.blr)."""
    for key, value in values.items():
        if value is not None and not ok(value):
            raise LdaeError(f"{section}.{key} must be {rule}, got {value!r}")
