"""What every writer operation shares: validation, the audit-log parameters, output models.

Validation turns pydantic's errors into :class:`~writer.errors.InvalidInput` carrying field
paths and messages only (never the offending values, which may be secrets).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError

from schema.models import Identifier, Input
from writer.errors import FieldProblem, InvalidInput
from writer.statements import audit_params
from writer.steps import Options

M = TypeVar("M", bound=Input)
OutputT = TypeVar("OutputT", bound=BaseModel)

_IDENTIFIER: TypeAdapter[str] = TypeAdapter(Identifier)
_OPTIONAL_IDENTIFIER: TypeAdapter[str | None] = TypeAdapter(Identifier | None)


def problems_of(exc: ValidationError) -> list[FieldProblem]:
    return [
        FieldProblem(tuple(err["loc"]), err["msg"], err["type"])
        for err in exc.errors(include_input=False)
    ]


def validate(model: type[M], data: M | Mapping[str, Any]) -> M:
    """``data`` as a validated ``model``; a model instance is taken as is (already valid)."""
    if isinstance(data, model):
        return data
    if not isinstance(data, Mapping):
        raise InvalidInput(
            model.__name__,
            [FieldProblem((), f"expected {model.__name__} or a mapping", "model_type")],
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(model.__name__, problems_of(exc)) from None


def identifier(value: object, what: str = "id") -> str:
    try:
        return _IDENTIFIER.validate_python(value, strict=True)
    except ValidationError as exc:
        problems = [FieldProblem((what,), p.message, p.kind) for p in problems_of(exc)]
        raise InvalidInput(what, problems) from None


def optional_identifier(value: object, what: str) -> str | None:
    if value is None:
        return None
    return identifier(value, what)


def audit(
    opts: Options, event: str, target_type: str, actor: str | None, details: Mapping[str, Any]
) -> dict[str, Any]:
    """The audit-log row's parameters (the row is written only when ``opts.audit``)."""
    return audit_params(opts.audit, event, target_type, actor, None, details)


def to_model(model: type[OutputT], row: Mapping[str, Any]) -> OutputT:
    return model.model_validate(dict(row))
