"""pydantic's validation errors as the one line a user reads: ``dotted.key: what is wrong (got value)``."""

from __future__ import annotations

from pydantic import BaseModel, ValidationError

from core.errors import suggest


def first_error(err: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    """One line for pydantic's first error: ``dotted.key: what is wrong (got value)``.

    ``model`` is the schema that was validated (``RunConfig``, or a method's Params
    under ``prefix="method"``); it gives the valid neighbours of an unknown key.
    """
    e = err.errors()[0]
    parts = [str(p) for p in e["loc"]]
    loc = ".".join(([prefix] if prefix else []) + parts) or "config"
    if e["type"] == "extra_forbidden":
        parent: type[BaseModel] | None = model
        for part in parts[:-1]:
            parent = submodel(parent, part)
        head = ([prefix] if prefix else []) + parts[:-1]
        known = [".".join([*head, f]) for f in parent.model_fields] if parent else []
        return f"{loc}: unknown key{suggest(loc, known, n=1)}"
    msg = e["msg"].removeprefix("Value error, ")
    got = e.get("input")
    shown = "" if isinstance(got, dict) or got is None else f" (got {_short(repr(got))})"
    return f"{loc}: {msg}{shown}"


def submodel(model: type[BaseModel] | None, field: str) -> type[BaseModel] | None:
    """The section model of ``model.field``, or None for a plain value, a free-form mapping or no such field."""
    info = model.model_fields.get(field) if model is not None else None
    annotation = info.annotation if info is not None else None
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else f"{text[: limit - 3]}... ({len(text)} characters)"
