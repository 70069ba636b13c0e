"""Validation and conversion helpers shared by the YAML/JSON schemas in proto/.

Every schema is a frozen dataclass built from a plain dict. These helpers turn the
mistakes a user can make in a file (a missing key, a typo in a key, a wrong type, a value
out of range) into a ValueError whose message names the field by its dotted path, e.g.
``cluster.nodes[3].gpu_type``, and the allowed values.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

Schema = TypeVar("Schema", bound="DataclassInstance")


def load_document(path: str | Path, what: str) -> dict[str, Any]:
    """Read a YAML or JSON file (by suffix; YAML otherwise) holding one mapping."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{what} file {str(file)!r} does not exist")
    text = file.read_text()
    if file.suffix == ".json":
        data = json.loads(text)
    else:
        import yaml  # only the readers of files pay for it

        data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{what} file {str(file)!r} must hold a mapping, got {type(data).__name__}")
    return data


def dump_document(data: dict[str, Any], path: str | Path) -> None:
    """Write a mapping as JSON when the suffix is .json, as YAML otherwise."""
    file = Path(path)
    if file.suffix == ".json":
        file.write_text(json.dumps(data, indent=2) + "\n")
    else:
        import yaml

        file.write_text(yaml.safe_dump(data, sort_keys=False))


def check_keys(where: str, data: Any, required: Iterable[str], optional: Iterable[str] = ()) -> dict[str, Any]:
    """data must be a mapping with all required keys and no keys outside required + optional."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
    required = tuple(required)
    allowed = required + tuple(optional)
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ValueError(f"{where}.{unknown[0]} is not a known field; allowed: {', '.join(allowed)}")
    for key in required:
        if key not in data:
            raise ValueError(f"{where}.{key} is required")
    return data


def as_number(
    where: str, value: Any, *, minimum: float | None = None, exclusive: bool = False, maximum: float | None = None
) -> float:
    """A real number (bools are not numbers here), optionally bounded."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} must be a number, got {value!r}")
    if minimum is not None and (value <= minimum if exclusive else value < minimum):
        bound = ">" if exclusive else ">="
        raise ValueError(f"{where} must be {bound} {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{where} must be <= {maximum}, got {value}")
    return float(value)


def as_int(where: str, value: Any, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{where} must be >= {minimum}, got {value}")
    return value


def as_str(where: str, value: Any, allowed: Iterable[str] | None = None) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where} must be a non-empty string, got {value!r}")
    if allowed is not None:
        allowed = tuple(allowed)
        if value not in allowed:
            raise ValueError(f"{where} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def as_list(where: str, value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"{where} must be a list, got {type(value).__name__}")
    return value


def plain(value: Any) -> Any:
    """value with tuples turned into lists and numeric scalars (numpy's too) into int and
    float, so that safe YAML and JSON writers take it."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def build(cls: type[Schema], where: str, data: Any, **converted: Any) -> Schema:
    """Construct the flat dataclass cls from a mapping, checking its keys.

    Fields without a default are required. Lists become tuples (the dataclasses are frozen);
    converted holds values the caller already built from nested mappings.
    """
    import dataclasses

    fields = dataclasses.fields(cls)
    required = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    optional = [f.name for f in fields if f.name not in required]
    check_keys(where, data, required, optional)
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    values.update(converted)
    return cls(**values)
