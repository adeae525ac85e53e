"""Run configs from YAML and ``key=value`` overrides: read, set, validate into a :class:`RunConfig`.

cfg = load_config("configs/simclr_shapes.yaml", ["pretrain.epochs=2"])
flatten(cfg.as_dict())   # {"pretrain.epochs": 2, ...}, what MLflow logs as params
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from core.errors import ConfigError, suggest
from harness.config.messages import first_error, submodel
from harness.config.schema import RunConfig, default_method

log = logging.getLogger(__name__)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML run config, apply ``key=value`` overrides, validate. Raises ConfigError."""
    raw = read_yaml(path) if path is not None else {}
    return build_config(raw, overrides, source=str(path) if path else "defaults")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Parse a YAML mapping; a missing file or malformed YAML is a one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}:{where}: malformed YAML: {problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level, got {type(raw).__name__}")
    if _expanded_size(raw) > MAX_VALUES:
        raise ConfigError(
            f"{path}: expands to more than {MAX_VALUES:,} values (anchors nested in anchors?); "
            f"a config or sweep file holds at most {MAX_VALUES:,}"
        )
    return raw


MAX_VALUES = 100_000
"""Most values (mappings, lists and scalars, each alias counted as often as it is used) one YAML file may expand to:
YAML aliases are shared references, so a file of a few lines can stand for billions of values ("billion laughs")."""


def _expanded_size(tree: Any) -> int:
    """How many values ``tree`` expands to, counting up to just past :data:`MAX_VALUES` (so a bomb stops early)."""
    count, stack = 0, [tree]
    while stack and count <= MAX_VALUES:
        node = stack.pop()
        count += 1
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            stack.extend(node)
    return count


def build_config(raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = (), source: str = "config") -> RunConfig:
    """Validate a nested dict (plus overrides) into a RunConfig, or raise a one-line ConfigError."""
    raw = apply_overrides(raw, overrides, RunConfig)
    try:
        return RunConfig(**raw)
    except ValidationError as err:
        raise ConfigError(first_error(err, RunConfig)) from None
    except TypeError as err:  # e.g. a section given as a scalar
        raise ConfigError(f"{source}: {err}") from None


def apply_overrides(
    raw: dict[str, Any], overrides: list[str] | tuple[str, ...], schema: type[BaseModel]
) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``dotted.key=value`` set; values parse as YAML scalars.

    A key that the schema does not have is refused here, with the closest valid key,
    so that a typo on the command line never silently does nothing.
    """
    return set_values(raw, parse_overrides(overrides), schema)


def parse_overrides(overrides: list[str] | tuple[str, ...], example: str = "pretrain.epochs=5") -> dict[str, Any]:
    """``["a.b=1", "c=[1,2]"]`` -> ``{"a.b": 1, "c": [1, 2]}``: values parse as YAML scalars (else stay text)."""
    values: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. {example}")
        try:
            values[key] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            values[key] = text
    return values


def set_values(
    raw: dict[str, Any], values: dict[str, Any], schema: type[BaseModel], what: str = "override"
) -> dict[str, Any]:
    """Return a copy of ``raw`` with each dotted key of ``values`` set to its (already typed) value.

    Keys the schema does not have are refused with the closest valid key; ``what``
    names the source in the message (``override``, ``space``).
    """
    raw = copy.deepcopy(raw)
    if "method" in values:  # a whole method section replaces the method keys set before it
        keys = list(values)
        before = keys[: keys.index("method")]
        values = {k: v for k, v in values.items() if not (k in before and k.startswith("method."))}
    first = ("method", "method.name")  # a new method first: its own keys may follow in any order
    for key, value in sorted(values.items(), key=lambda kv: kv[0] not in first):
        if schema is RunConfig and key == "method.name":
            _switch_method(raw, value, what)
        _check_override_key(key, schema, raw, what)
        node = raw
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = _default_section(schema, part) if depth == 0 else {}
            elif isinstance(child, str) and part == "method":
                child = node[part] = {"name": child}
            elif not isinstance(child, dict):
                raise ConfigError(f"{what} {key}: {part} is a value, not a section")
            node = child
        node[parts[-1]] = copy.deepcopy(value)
    return raw


def _switch_method(raw: dict[str, Any], name: Any, what: str) -> None:
    """``method.name=OTHER`` starts from OTHER's defaults, as a config group does: the keys set for the method
    named so far are dropped (one INFO line names them); setting the same name again keeps them."""
    method = raw.get("method")
    if isinstance(method, str):
        method = raw["method"] = {"name": method}
    if not isinstance(method, dict):
        return
    before = method.get("name", default_method())
    dropped = sorted(k for k in method if k != "name")
    if name == before or not dropped:
        return
    raw["method"] = {"name": before}
    log.log(
        logging.INFO if what == "override" else logging.DEBUG,
        "%s method.name=%s: %s's settings dropped (%s); %s starts from its own defaults",
        what, name, before, ", ".join(f"method.{k}" for k in dropped), name,
    )  # fmt: skip


def _default_section(schema: type[BaseModel], name: str) -> dict[str, Any]:
    """A missing top-level mapping starts from the schema's default (``method`` keeps its default name)."""
    default = schema.model_fields[name].get_default(call_default_factory=True)
    return dict(default) if isinstance(default, dict) else {}


def _check_override_key(key: str, schema: type[BaseModel], raw: dict[str, Any], what: str = "override") -> None:
    """Refuse a dotted key that names no field (``method.*`` is checked by the method's Params)."""
    model: type[BaseModel] | None = schema
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if model is None:
            return  # a free-form mapping (backbone.kwargs, method params): checked on validation
        fields = model.model_fields
        if part not in fields:
            path = ".".join([*parts[:depth], part])
            known = [".".join([*parts[:depth], f]) for f in fields]
            raise ConfigError(f"{what} {key}: unknown key {path!r}{suggest(path, known, n=1)}")
        if model is RunConfig and part == "method" and depth + 1 < len(parts):
            _check_method_key(parts[depth + 1], raw, what)
            return
        model = submodel(model, part)


def _check_method_key(param: str, raw: dict[str, Any], what: str = "override") -> None:
    from methods import get_method_class

    method = raw.get("method", {"name": default_method()})
    name = method if isinstance(method, str) else (method or {}).get("name", default_method())
    if param == "name":
        return
    try:
        fields = get_method_class(name).Params.model_fields
    except ConfigError:
        return  # the unknown method itself is reported on validation
    if param not in fields:
        known = ["method." + f for f in ["name", *fields]]
        raise ConfigError(
            f"{what} method.{param}: unknown key 'method.{param}' for "
            f"method {name!r}{suggest('method.' + param, known, n=1)}"
        )


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and tuples stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat
