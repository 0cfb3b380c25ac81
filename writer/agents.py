"""Agent operations: create, update, change password, deactivate/reactivate, authenticate.

Passwords are hashed with argon2id (:mod:`writer.passwords`) before the statement is built;
the hash is stored in ``agents.password_hash`` and never returned by any operation.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Any

from pydantic import SecretStr, TypeAdapter, ValidationError

from schema.models import Agent, AgentCreate, AgentUpdate, Password, Username
from writer.base import Operations, identifier, optional_identifier, problems_of, to_model, validate
from writer.db import Written
from writer.errors import FieldProblem, InvalidInput, NotFound
from writer.ids import new_id
from writer.passwords import hash_password, needs_rehash, verify_password
from writer.statements import adapt, insert, returning, update, written

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


class AgentOperations(Operations):
    def create_agent(
        self, data: AgentCreate | Mapping[str, Any], *, actor: str | None = None
    ) -> Written[Agent]:
        agent = validate(AgentCreate, data)
        actor = optional_identifier(actor, "actor")
        values = agent.model_dump(exclude={"password"})
        values["id"] = agent.id or new_id()
        values["password_hash"] = hash_password(agent.password.get_secret_value())
        params = adapt("agents", values)
        params.update(
            self._audit_params("agent.created", "agent", actor, {"role": agent.role.value})
        )
        rows, token = self._db.write("agent", insert("agents", _CREATE_COLUMNS), params)
        values.pop("password_hash")
        return Written(to_model(Agent, written(values, rows[0])), token)

    def update_agent(
        self, agent_id: str, changes: AgentUpdate | Mapping[str, Any], *, actor: str | None = None
    ) -> Written[Agent]:
        agent_id = identifier(agent_id, "agent_id")
        update_model = validate(AgentUpdate, changes)
        actor = optional_identifier(actor, "actor")
        fields = sorted(update_model.model_fields_set)
        if not fields:
            raise InvalidInput(
                "AgentUpdate", [FieldProblem((), "no field to update", "empty_update")]
            )
        for name in _NOT_NULLABLE:
            if name in fields and getattr(update_model, name) is None:
                raise InvalidInput(
                    "AgentUpdate", [FieldProblem((name,), "cannot be cleared", "not_nullable")]
                )
        params = adapt("agents", {name: getattr(update_model, name) for name in fields})
        params["id"] = agent_id
        params.update(self._audit_params("agent.updated", "agent", actor, {"fields": fields}))
        rows, token = self._db.write(
            "agent", update("agents", fields, ["updated_at = now()"]), params
        )
        if not rows:
            raise NotFound("agent", agent_id)
        return Written(to_model(Agent, rows[0]), token)

    def set_agent_password(
        self, agent_id: str, password: str | SecretStr, *, actor: str | None = None
    ) -> Written[Agent]:
        agent_id = identifier(agent_id, "agent_id")
        actor = optional_identifier(actor, "actor")
        params: dict[str, Any] = {
            "id": agent_id,
            "password_hash": hash_password(_password(password)),
        }
        params.update(self._audit_params("agent.password_changed", "agent", actor, {}))
        rows, token = self._db.write(
            "agent", update("agents", ["password_hash"], ["updated_at = now()"]), params
        )
        if not rows:
            raise NotFound("agent", agent_id)
        return Written(to_model(Agent, rows[0]), token)

    def deactivate_agent(self, agent_id: str, *, actor: str | None = None) -> Written[Agent]:
        """Block the agent from logging in and mark them offline; the row is kept."""
        return self._set_active(agent_id, False, actor)

    def reactivate_agent(self, agent_id: str, *, actor: str | None = None) -> Written[Agent]:
        return self._set_active(agent_id, True, actor)

    def _set_active(self, agent_id: str, active: bool, actor: str | None) -> Written[Agent]:
        agent_id = identifier(agent_id, "agent_id")
        actor = optional_identifier(actor, "actor")
        params: dict[str, Any] = {"id": agent_id, "is_active": active, "status": "offline"}
        event = "agent.reactivated" if active else "agent.deactivated"
        params.update(self._audit_params(event, "agent", actor, {}))
        sets = ["is_active"] if active else ["is_active", "status"]
        rows, token = self._db.write(
            "agent", update("agents", sets, ["updated_at = now()"]), params
        )
        if not rows:
            raise NotFound("agent", agent_id)
        return Written(to_model(Agent, rows[0]), token)

    def authenticate_agent(self, username: str, password: str | SecretStr) -> Written[Agent] | None:
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
        rows = self._db.read(_login_sql(), {"username": username})
        if (
            not rows
            or not rows[0]["is_active"]
            or not verify_password(rows[0]["password_hash"], secret)
        ):
            return None
        sets = ["last_login_at"]
        params: dict[str, Any] = {"id": rows[0]["id"], "last_login_at": None}
        if needs_rehash(rows[0]["password_hash"]):
            sets.append("password_hash")
            params["password_hash"] = hash_password(secret)
        params.update(self._audit_params("agent.logged_in", "agent", rows[0]["id"], {}))
        sql = update("agents", [s for s in sets if s != "last_login_at"], ["last_login_at = now()"])
        written, token = self._db.write("agent", sql, params)
        if not written:
            return None
        return Written(to_model(Agent, written[0]), token)
