"""The daemon's configuration: one object, read once at start, passed down.

Read from the environment (and ``.env``); nothing reads the environment at import time.
Connection URLs are secrets: they are held as :class:`pydantic.SecretStr` and only ever
shown through :func:`redact_url`.
"""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from psycopg.conninfo import conninfo_to_dict
from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cdc.errors import ConfigError
from schema.keys import TrackedTable
from schema.redis_url import RedisTarget

_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def redact_url(url: str) -> str:
    """``url`` without its password (safe for logs and messages)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def postgres_conninfo(url: str) -> str:
    for prefix in ("postgresql+psycopg://", "postgres+psycopg://"):
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix) :]
    return url


def _env(*names: str) -> AliasChoices:
    return AliasChoices(*names)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True)

    database_url: SecretStr = Field(validation_alias=_env("DATABASE_URL"))
    cdc_database_url: SecretStr | None = Field(
        default=None, validation_alias=_env("CDC_DATABASE_URL")
    )
    redis_url: SecretStr = Field(
        default=SecretStr("redis://127.0.0.1:6379/0"), validation_alias=_env("REDIS_URL")
    )
    slot: str = Field(default="cdc_cache", validation_alias=_env("CDC_SLOT"))
    publication: str = Field(default="cdc_cache", validation_alias=_env("CDC_PUBLICATION"))
    metrics_addr: str = Field(default="127.0.0.1:9464", validation_alias=_env("CDC_METRICS_ADDR"))
    log_format: Literal["text", "json"] = Field(
        default="text", validation_alias=_env("CDC_LOG_FORMAT")
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", validation_alias=_env("CDC_LOG_LEVEL")
    )
    plugin: Literal["pgoutput", "wal2json"] = Field(
        default="pgoutput", validation_alias=_env("CDC_PLUGIN")
    )
    # A transaction with more changes than this is applied in several chunks (contract 7.3).
    batch_max_changes: int = Field(
        default=10_000, ge=1, validation_alias=_env("CDC_BATCH_MAX_CHANGES")
    )
    batch_max_bytes: int = Field(
        default=16 << 20, ge=1024, validation_alias=_env("CDC_BATCH_MAX_BYTES")
    )
    # A row bigger than this is not cached (its key is dropped; readers use PostgreSQL).
    max_row_bytes: int = Field(default=1 << 20, ge=1, validation_alias=_env("CDC_MAX_ROW_BYTES"))
    status_interval: float = Field(default=1.0, gt=0, validation_alias=_env("CDC_STATUS_INTERVAL"))
    pg_timeout: float = Field(default=30.0, gt=0, validation_alias=_env("CDC_PG_TIMEOUT"))
    redis_timeout: float = Field(default=5.0, gt=0, validation_alias=_env("CDC_REDIS_TIMEOUT"))
    # After each batch, WAIT for this many Redis replicas before confirming (contract 4).
    redis_min_replicas: int = Field(
        default=0, ge=0, validation_alias=_env("CDC_REDIS_MIN_REPLICAS")
    )
    standby: bool = Field(default=False, validation_alias=_env("CDC_STANDBY"))
    slot_busy_timeout: float = Field(
        default=15.0, ge=0, validation_alias=_env("CDC_SLOT_BUSY_TIMEOUT")
    )
    retry_max: float = Field(default=30.0, gt=0, validation_alias=_env("CDC_RETRY_MAX"))
    schema_poll_interval: float = Field(
        default=0.5, gt=0, validation_alias=_env("CDC_SCHEMA_POLL_INTERVAL")
    )
    observe_interval: float = Field(
        default=2.0, gt=0, validation_alias=_env("CDC_OBSERVE_INTERVAL")
    )
    backfill_chunk: int = Field(default=2_000, ge=1, validation_alias=_env("CDC_BACKFILL_CHUNK"))
    config: str | None = Field(default=None, validation_alias=_env("CDC_CONFIG"))
    change_feed: bool = Field(default=False, validation_alias=_env("CDC_CHANGE_FEED"))
    change_feed_maxlen: int = Field(
        default=100_000, ge=1, validation_alias=_env("CDC_CHANGE_FEED_MAXLEN")
    )

    @field_validator("slot", "publication")
    @classmethod
    def _identifier(cls, value: str) -> str:
        if not _IDENT.match(value):
            raise ValueError("must be a lower-case identifier (letters, digits, underscore)")
        return value

    @field_validator("metrics_addr")
    @classmethod
    def _address(cls, value: str) -> str:
        _host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("must be host:port")
        return value

    # -- derived ------------------------------------------------------------------------------

    def tables(self) -> tuple[TrackedTable, ...]:
        """The tables the cache declares (``CDC_CONFIG``, else the packaged default)."""
        from schema.config import CacheConfigError, load_tables

        try:
            return load_tables(self.config)
        except CacheConfigError as exc:
            raise ConfigError(f"CDC_CONFIG: {exc}") from None

    @property
    def replication_conninfo(self) -> str:
        url = self.cdc_database_url or self.database_url
        return postgres_conninfo(url.get_secret_value())

    @property
    def redis(self) -> str:
        return self.redis_url.get_secret_value()

    @property
    def metrics_host_port(self) -> tuple[str, int]:
        host, _, port = self.metrics_addr.rpartition(":")
        return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - only if asked for

    def describe(self) -> dict[str, object]:
        """The settings without secrets (for the startup log line)."""
        return {
            "database": redact_url(self.replication_conninfo),
            "redis": describe_redis_url(self.redis),
            "slot": self.slot,
            "publication": self.publication,
            "plugin": self.plugin,
            "metrics": self.metrics_addr,
            "batch_max_changes": self.batch_max_changes,
            "config": self.config or "default",
            "change_feed": self.change_feed,
        }


_ENV_NAMES = {
    "database_url": "DATABASE_URL",
    "cdc_database_url": "CDC_DATABASE_URL",
    "redis_url": "REDIS_URL",
}


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, or a :class:`ConfigError` naming the bad variable."""
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors(include_input=False)[0]
        field = str(first["loc"][0]) if first["loc"] else "settings"
        name = _ENV_NAMES.get(field, "CDC_" + field.upper())
        if first["type"] == "missing":
            raise ConfigError(f"{name} is not set") from None
        raise ConfigError(f"{name}: {first['msg']}") from None
    if not settings.database_url.get_secret_value():
        raise ConfigError("DATABASE_URL is not set")
    _check_postgres_url(
        "CDC_DATABASE_URL" if settings.cdc_database_url else "DATABASE_URL",
        settings.replication_conninfo,
    )
    _check_redis_url(settings.redis)
    return settings


def _check_postgres_url(name: str, url: str) -> None:
    if not url.startswith(("postgresql://", "postgres://")):
        raise ConfigError(f"{name} must be a postgresql:// URL (got {redact_url(url)})")
    try:
        conninfo_to_dict(url)
    except Exception as exc:  # noqa: BLE001 - psycopg raises ProgrammingError here
        raise ConfigError(f"{name} is not a valid URL: {type(exc).__name__}") from None


def describe_redis_url(url: str) -> str:
    """Where ``url`` points, without password or query (safe for logs)."""
    try:
        return RedisTarget.parse(url).describe()
    except ValueError:
        return "<invalid REDIS_URL>"


def _check_redis_url(url: str) -> None:
    try:
        RedisTarget.parse(url)
    except ValueError as exc:
        raise ConfigError(f"REDIS_URL is not valid: {exc}") from None
