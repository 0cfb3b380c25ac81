"""Agent operations: create, update, change password, deactivate/reactivate, authenticate.

Passwords are hashed with argon2id (:mod:`writer.passwords`) before the statement is built,
as an :class:`~writer.steps.Offload` step (an async writer hashes in a worker thread, not on
its event loop); the hash is stored in ``agents.password_hash`` and never returned.

Each operation is a plan (:mod:`writer.steps`), run by every writer layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Any

from pydantic import SecretStr, TypeAdapter, ValidationError

from schema.models import Agent, AgentCreate, AgentUpdate, Password, Username
from writer.base import audit, identifier, optional_identifier, problems_of, to_model, validate
from writer.errors import FieldProblem, InvalidInput, NotFound
from writer.ids import new_id
from writer.passwords import hash_password, needs_rehash, verify_password
from writer.statements import adapt, insert, returning, update, written
from writer.steps import Offload, Options, Plan, Read, Write

_CREATE_COLUMNS = (
    "id",
    "username",
    "display_name",
    "email",
    "password_hash",
    "role",
    "status",
    "skills",
    "max_concurrent_sessions",
    "avatar_url",
    "phone",
    "extra_data",
)
_NOT_NULLABLE = (
    "username",
    "display_name",
    "role",
    "status",
    "skills",
    "max_concurrent_sessions",
    "extra_data",
)

_PASSWORD: TypeAdapter[SecretStr] = TypeAdapter(Password)
_USERNAME: TypeAdapter[str] = TypeAdapter(Username)


def _password(value: object) -> str:
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if not isinstance(value, str):
        raise InvalidInput(
            "password", [FieldProblem(("password",), "must be a string", "string_type")]
        )
    try:
        _PASSWORD.validate_python(SecretStr(value))
    except ValidationError as exc:
        problems = [FieldProblem(("password",), p.message, p.kind) for p in problems_of(exc)]
        raise InvalidInput("password", problems) from None
    return value


@cache
def _login_sql() -> str:
    return f"SELECT {returning('agents')}, password_hash FROM agents WHERE username = %(username)s"


def create_agent(
    opts: Options, data: AgentCreate | Mapping[str, Any], *, actor: str | None = None
) -> Plan[Agent]:
    agent = validate(AgentCreate, data)
    actor = optional_identifier(actor, "actor")
    values = agent.model_dump(exclude={"password"})
    values["id"] = agent.id or new_id()
    values["password_hash"] = yield Offload(hash_password, (agent.password.get_secret_value(),))
    params = adapt("agents", values)
    params.update(audit(opts, "agent.created", "agent", actor, {"role": agent.role.value}))
    rows = yield Write("agent", insert("agents", _CREATE_COLUMNS), params)
    values.pop("password_hash")
    return to_model(Agent, written(values, rows[0]))


def update_agent(
    opts: Options,
    agent_id: str,
    changes: AgentUpdate | Mapping[str, Any],
    *,
    actor: str | None = None,
) -> Plan[Agent]:
    agent_id = identifier(agent_id, "agent_id")
    update_model = validate(AgentUpdate, changes)
    actor = optional_identifier(actor, "actor")
    fields = sorted(update_model.model_fields_set)
    if not fields:
        raise InvalidInput("AgentUpdate", [FieldProblem((), "no field to update", "empty_update")])
    for name in _NOT_NULLABLE:
        if name in fields and getattr(update_model, name) is None:
            raise InvalidInput(
                "AgentUpdate", [FieldProblem((name,), "cannot be cleared", "not_nullable")]
            )
    params = adapt("agents", {name: getattr(update_model, name) for name in fields})
    params["id"] = agent_id
    params.update(audit(opts, "agent.updated", "agent", actor, {"fields": fields}))
    rows = yield Write("agent", update("agents", fields, ["updated_at = now()"]), params)
    if not rows:
        raise NotFound("agent", agent_id)
    return to_model(Agent, rows[0])


def set_agent_password(
    opts: Options, agent_id: str, password: str | SecretStr, *, actor: str | None = None
) -> Plan[Agent]:
    agent_id = identifier(agent_id, "agent_id")
    actor = optional_identifier(actor, "actor")
    secret = _password(password)
    params: dict[str, Any] = {
        "id": agent_id,
        "password_hash": (yield Offload(hash_password, (secret,))),
    }
    params.update(audit(opts, "agent.password_changed", "agent", actor, {}))
    rows = yield Write("agent", update("agents", ["password_hash"], ["updated_at = now()"]), params)
    if not rows:
        raise NotFound("agent", agent_id)
    return to_model(Agent, rows[0])


def deactivate_agent(opts: Options, agent_id: str, *, actor: str | None = None) -> Plan[Agent]:
    """Block the agent from logging in and mark them offline; the row is kept."""
    return (yield from _set_active(opts, agent_id, False, actor))


def reactivate_agent(opts: Options, agent_id: str, *, actor: str | None = None) -> Plan[Agent]:
    return (yield from _set_active(opts, agent_id, True, actor))


def _set_active(opts: Options, agent_id: str, active: bool, actor: str | None) -> Plan[Agent]:
    agent_id = identifier(agent_id, "agent_id")
    actor = optional_identifier(actor, "actor")
    params: dict[str, Any] = {"id": agent_id, "is_active": active, "status": "offline"}
    event = "agent.reactivated" if active else "agent.deactivated"
    params.update(audit(opts, event, "agent", actor, {}))
    sets = ["is_active"] if active else ["is_active", "status"]
    rows = yield Write("agent", update("agents", sets, ["updated_at = now()"]), params)
    if not rows:
        raise NotFound("agent", agent_id)
    return to_model(Agent, rows[0])


def authenticate_agent(
    opts: Options, username: str, password: str | SecretStr
) -> Plan[Agent | None]:
    """The agent if ``password`` is right and the account is active, else None.

    A successful login records ``last_login_at`` (and upgrades an outdated hash).
    """
    try:
        username = _USERNAME.validate_python(username, strict=True)
    except ValidationError as exc:
        raise InvalidInput(
            "username",
            [FieldProblem(("username",), p.message, p.kind) for p in problems_of(exc)],
        ) from None
    secret = _password(password)
    rows = yield Read(_login_sql(), {"username": username})
    if not rows or not rows[0]["is_active"]:
        return None
    if not (yield Offload(verify_password, (rows[0]["password_hash"], secret))):
        return None
    sets = ["last_login_at"]
    params: dict[str, Any] = {"id": rows[0]["id"], "last_login_at": None}
    if needs_rehash(rows[0]["password_hash"]):
        sets.append("password_hash")
        params["password_hash"] = yield Offload(hash_password, (secret,))
    params.update(audit(opts, "agent.logged_in", "agent", rows[0]["id"], {}))
    sql = update("agents", [s for s in sets if s != "last_login_at"], ["last_login_at = now()"])
    logged_in = yield Write("agent", sql, params)
    if not logged_in:
        return None
    return to_model(Agent, logged_in[0])
