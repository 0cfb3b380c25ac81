"""Startup checks: every misconfiguration ends in :class:`ConfigError` with one line that
says what to fix (exit code 2); an unreachable peer is :class:`Retryable` instead.

The daemon checks and refuses; it never creates tables, publications or replica
identities itself (those belong to the migrations).
"""

from __future__ import annotations

from cdc.cache.wire import RedisWire, WireError, WireReplyError, auth_problem
from cdc.errors import ConfigError, RedisUnavailable
from cdc.postgres import catalog
from cdc.settings import Settings
from cdc.telemetry import logs
from cdc.transform.cluster_script import fence_key, key_prefixes, outbox_key
from schema.keys import REGISTRY_KEY, STATE_KEY, TRACKED_TABLES, TrackedTable
from schema.redis_url import RedisTarget, as_cluster_url, node_mode, probe_tls, tls_problem

log = logs.get("cdc.ops.checks")

SAFE_EVICTION = ("noeviction", "volatile-lru", "volatile-lfu", "volatile-random", "volatile-ttl")


def mirrored_tables(
    published: set[tuple[str, str]] | None,
    publication: str,
    tables: tuple[TrackedTable, ...],
) -> tuple[TrackedTable, ...]:
    """The declared tables ``publication`` holds: the ones this daemon mirrors. Several
    daemons may split the tables between publications (one slot each); a publication
    that holds none of them is a mistake (exit 2)."""
    if published is None:
        raise ConfigError(f'publication "{publication}" does not exist: run the migrations')
    mirrored = tuple(t for t in tables if (t.schema, t.name) in published)
    if not mirrored:
        raise ConfigError(
            f'publication "{publication}" holds none of the tracked tables'
            f" ({', '.join(t.qualified_name for t in tables)}): run the migrations,"
            " or set CDC_PUBLICATION"
        )
    return mirrored


def publication_mirror(
    settings: Settings, tables: tuple[TrackedTable, ...]
) -> tuple[TrackedTable, ...]:
    """:func:`mirrored_tables` for ``settings.publication``, asked of the database (for the
    one-shot commands: ``cdc verify``, ``cdc slot reset``)."""
    conn = catalog.connect(settings.catalog_conninfo, "PostgreSQL")
    try:
        published = catalog.publication_tables(conn, settings.publication)
    finally:
        conn.close()
    return mirrored_tables(published, settings.publication, tables)


def check_postgres(
    settings: Settings, tables: tuple[TrackedTable, ...]
) -> tuple[TrackedTable, ...]:
    """Check the server and the tables; returns the declared tables the publication holds
    (the ones the daemon mirrors: :func:`mirrored_tables`)."""
    conn = catalog.connect(settings.catalog_conninfo, "PostgreSQL")
    try:
        wal_level = catalog.setting(conn, "wal_level")
        if wal_level != "logical":
            raise ConfigError(
                f"wal_level is '{wal_level}'; set wal_level=logical and restart PostgreSQL"
            )
        role = catalog.role_info(conn)
        if not (role.replication or role.superuser):
            raise ConfigError(
                f'role "{role.name}" lacks REPLICATION (ALTER ROLE "{role.name}" REPLICATION)'
            )
        published = catalog.publication_tables(conn, settings.publication)
        mirrored = mirrored_tables(published, settings.publication, tables)
        _check_declared_exist(conn, tables, mirrored)
        tables = mirrored
        for table in tables:
            check_table(conn, table, role.name, settings.publication)
        for warning in column_list_warnings(conn, settings, tables, role):
            log.warning("excluded columns", problem=warning)
        slot = catalog.slot_info(conn, settings.slot)
        if slot is not None:
            if slot.slot_type != "logical":
                raise ConfigError(
                    f'slot "{settings.slot}" is a physical slot; choose another CDC_SLOT'
                )
            if slot.plugin != settings.plugin:
                raise ConfigError(
                    f'slot "{settings.slot}" uses plugin "{slot.plugin}", not "{settings.plugin}":'
                    " set CDC_PLUGIN, choose another CDC_SLOT, or run cdc slot reset"
                )
            dbname = conn.info.dbname
            if slot.database is not None and slot.database != dbname:
                raise ConfigError(
                    f'slot "{settings.slot}" belongs to database "{slot.database}", not "{dbname}"'
                )
        return tables
    finally:
        conn.close()


def _check_declared_exist(
    conn: catalog.Conn, declared: tuple[TrackedTable, ...], mirrored: tuple[TrackedTable, ...]
) -> None:
    """A declared table the publication does not hold is another daemon's, but only if
    it exists: a typo or a dropped table is refused, never silently left unmirrored."""
    for table in declared:
        if table not in mirrored and not catalog.replica_identity(conn, table).exists:
            raise ConfigError(f'CDC_CONFIG: table "{table.qualified_name}" does not exist')


def check_table(
    conn: catalog.Conn, table: TrackedTable, role: str, publication: str | None = None
) -> None:
    identity = catalog.replica_identity(conn, table)
    if not identity.exists:
        raise ConfigError(f'table "{table.qualified_name}" does not exist: run the migrations')
    columns = catalog.table_columns(conn, table)
    if table.primary_key not in columns:
        raise ConfigError(f'table "{table.qualified_name}" has no column "{table.primary_key}"')
    needed = set(table.identity_columns)
    if identity.kind == "n" or not needed <= identity.columns:
        have = (
            "NOTHING"
            if identity.kind == "n"
            else f"({', '.join(sorted(identity.columns)) or 'none'})"
        )
        raise ConfigError(
            f'table "{table.qualified_name}" has replica identity {have}, which must cover '
            f"({', '.join(table.identity_columns)}): run the migrations"
        )
    if identity.kind == "f" and table.excluded_columns:
        # FULL would put the excluded columns into every UPDATE/DELETE's old row (and with
        # a column list PostgreSQL refuses the table's UPDATEs).
        raise ConfigError(
            f'table "{table.qualified_name}" has REPLICA IDENTITY FULL, which would publish '
            f"{', '.join(sorted(table.excluded_columns))}: run the migrations"
        )
    check_declaration(conn, table, columns, publication)
    readable = catalog.readable_columns(conn, table, publication)
    denied = catalog.unreadable_columns(conn, table, readable)
    if denied:
        which = "" if len(denied) == len(readable) else f" ({', '.join(denied)})"
        raise ConfigError(
            f'role "{role}" cannot SELECT from {table.qualified_name}{which}:'
            " GRANT SELECT to it (docker/grants/10-cdc-daemon.sql)"
        )


def column_list_warnings(
    conn: catalog.Conn,
    settings: Settings,
    tables: tuple[TrackedTable, ...],
    role: catalog.RoleInfo,
) -> list[str]:
    """Where excluded columns (``agents.password_hash``) still leave PostgreSQL, or a
    column list is out of date. Warnings: the daemon never writes them to Redis either way."""
    out: list[str] = []
    for table in tables:
        if not table.excluded_columns:
            continue
        excluded = ", ".join(f"{table.name}.{c}" for c in sorted(table.excluded_columns))
        if not catalog.has_column_lists(conn):
            out.append(
                f"PostgreSQL {conn.info.server_version // 10000} has no publication column"
                f" lists: {excluded} travels in the replication stream (never to Redis);"
                " PostgreSQL 15+ keeps it in the server"
            )
        elif settings.plugin == "wal2json":
            out.append(
                f"wal2json ignores publication column lists: {excluded} travels in the"
                " replication stream (never to Redis); CDC_PLUGIN=pgoutput keeps it in the server"
            )
        else:
            published = catalog.publication_columns(conn, settings.publication, table) or []
            leaking = sorted(set(published) & table.excluded_columns)
            if leaking:
                out.append(
                    f'publication "{settings.publication}" publishes'
                    f" {', '.join(f'{table.name}.{c}' for c in leaking)}: run the migrations"
                    " (alembic upgrade head) to give it a column list"
                )
            else:
                missing = [
                    c
                    for c in catalog.table_columns(conn, table)
                    if c not in published and c not in table.excluded_columns
                ]
                if missing:
                    out.append(
                        f'publication "{settings.publication}" does not publish'
                        f" {', '.join(f'{table.name}.{c}' for c in missing)}: its column list"
                        " is out of date; run SELECT cdc_sync_column_lists()"
                    )
        if not role.superuser:
            readable = catalog.unreadable_columns(conn, table, sorted(table.excluded_columns))
            granted = sorted(set(table.excluded_columns) - set(readable))
            if granted:
                out.append(
                    f'role "{role.name}" can read'
                    f" {', '.join(f'{table.name}.{c}' for c in granted)}: grant column-level"
                    " SELECT without it (docker/grants/10-cdc-daemon.sql)"
                )
    return out


def check_declaration(
    conn: catalog.Conn, table: TrackedTable, columns: list[str], publication: str | None = None
) -> None:
    """The declared cache (CDC_CONFIG) against the table: columns exist, the key names the
    primary key, views and lookups read published columns."""
    name = table.qualified_name
    used = [
        *sorted(table.excluded_columns),
        *(lookup.column for lookup in table.lookups),
        *(view.column for view in table.views),
        *(view.score for view in table.views if view.score),
    ]
    for column in used:
        if column not in columns:
            raise ConfigError(f'CDC_CONFIG: table "{name}" has no column "{column}"')
    primary = [
        str(r[0])
        for r in conn.execute(
            "SELECT a.attname FROM pg_index i JOIN pg_attribute a"
            " ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
            " WHERE i.indrelid = %s::regclass AND i.indisprimary",
            (f'"{table.schema}"."{table.name}"',),
        ).fetchall()
    ]
    if primary != [table.primary_key]:
        raise ConfigError(
            f'CDC_CONFIG: the key of table "{name}" must be its primary key'
            f" ({', '.join(primary) or 'none'}), not {table.primary_key}"
        )
    if publication is None or conn.info.server_version < 150000:
        return
    row = conn.execute(
        "SELECT attnames FROM pg_publication_tables"
        " WHERE pubname = %s AND schemaname = %s AND tablename = %s",
        (publication, table.schema, table.name),
    ).fetchone()
    names: list[str] | None = row[0] if row else None  # type: ignore[assignment]
    published = set(names) if names is not None else set(columns)
    for column in [table.primary_key, *used[len(table.excluded_columns) :]]:
        if column not in published:
            raise ConfigError(
                f'CDC_CONFIG: column "{column}" of table "{name}" is not in publication'
                f' "{publication}"'
            )


def check_config(settings: Settings, tables: tuple[TrackedTable, ...]) -> tuple[TrackedTable, ...]:
    """``cdc config check``: the declaration against the database, nothing started.
    Returns the declared tables the publication holds (the ones a daemon mirrors)."""
    conn = catalog.connect(settings.replication_conninfo, "PostgreSQL")
    try:
        published = catalog.publication_tables(conn, settings.publication)
        mirrored = mirrored_tables(published, settings.publication, tables)
        _check_declared_exist(conn, tables, mirrored)
        tables = mirrored
        for table in tables:
            if not catalog.replica_identity(conn, table).exists:
                raise ConfigError(f'CDC_CONFIG: table "{table.qualified_name}" does not exist')
            check_declaration(conn, table, catalog.table_columns(conn, table), settings.publication)
        return tables
    finally:
        conn.close()


def check_cluster(
    settings: Settings,
    tables: tuple[TrackedTable, ...] = TRACKED_TABLES,
    state: str = STATE_KEY,
) -> None:
    """Cluster mode (README "Redis Cluster"): the credentials, the user's permissions on
    every primary, no primary evicting, and what the cluster mode cannot keep is refused
    (one line, exit 2)."""
    import redis  # only in cluster mode: redis-py costs 65-110 ms of every start

    from cdc.cache.cluster_sink import cluster_problem
    from schema.redis_url import cluster_client

    url = as_cluster_url(settings.redis)
    try:
        client = cluster_client(
            url,
            socket_timeout=settings.redis_timeout,
            socket_connect_timeout=settings.redis_timeout,
        )
        try:
            uses = _uses(settings, tables, state) + _cluster_uses(state, tables)
            policy_unknown = False
            for node in client.get_primaries():  # type: ignore[no-untyped-call]
                connection = node.redis_connection
                try:
                    refused = connection.eval(_PERMISSIONS_SCRIPT, 0, *_script_args(uses))
                except redis.exceptions.NoPermissionError:
                    raise ConfigError(_NO_EVAL) from None
                except redis.ResponseError as exc:
                    if "acl_check_cmd" not in str(exc) and "flags" not in str(exc):
                        raise
                    refused = None  # a Redis before 7.0 cannot be asked
                _refuse(refused, f" on cluster node {node.host}:{node.port}")
                try:
                    info = connection.info("memory")
                except redis.exceptions.NoPermissionError:
                    policy_unknown = True
                    continue
                policy = str(info.get("maxmemory_policy", "noeviction"))
                if policy not in SAFE_EVICTION:
                    raise ConfigError(
                        f"Redis maxmemory-policy is {policy} on cluster node"
                        f" {node.host}:{node.port}: set it to noeviction so cached rows are"
                        " never evicted"
                    )
            if policy_unknown:
                log.warning(
                    "the Redis user may not run INFO: maxmemory-policy (must not evict) is"
                    " not checked"
                )
        finally:
            client.close()
    except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
        if problem := cluster_problem(exc):
            raise ConfigError(problem) from None
        name = type(exc).__name__
        raise RedisUnavailable(f"cannot reach the Redis Cluster: {name}") from None


def _cluster_uses(state: str, tables: tuple[TrackedTable, ...]) -> list[tuple[str, ...]]:
    """What cluster mode sends besides (:mod:`cdc.cache.cluster_sink`): each slot's fence
    and run count, the view outboxes (trimmed once delivered), each primary's node id
    (``cdc:state`` records them to see a promotion), the scans of view keys a lost-slot
    repair drops members from, and what redis-py's ``RedisCluster`` asks (the topology,
    the commands' key positions)."""
    fences, outboxes = key_prefixes(state)
    fence, outbox = fence_key(0, fences), outbox_key(0, outboxes)
    scans = [
        ("ZSCAN" if view.sorted else "SSCAN", view.key("x"), "0")
        for table in tables
        for view in table.views
    ]
    return [
        *scans,
        *((c, fence, *_VALUE) for c in ("HSET", "HMGET", "HDEL", "HINCRBY")),
        ("HGET", fence, "f"),
        ("RPUSH", outbox, "v"),
        ("LRANGE", outbox, "0", "-1"),
        ("LTRIM", outbox, "1", "-1"),
        ("DEL", outbox),
        ("CLUSTER", "SLOTS"),
        ("CLUSTER", "MYID"),
        ("CLUSTER", "GETKEYSINSLOT", "0", "1"),
        ("COMMAND",),
    ]


def check_redis(
    settings: Settings,
    tables: tuple[TrackedTable, ...] = TRACKED_TABLES,
    state: str = STATE_KEY,
) -> bool:
    """Redis answers, accepts the URL's credentials and does not evict; True when it is a
    Redis Cluster (a ``redis+cluster://`` URL, or a node whose ``HELLO`` says ``cluster``).

    Spoken over the daemon's own wire (:mod:`cdc.cache.wire`), not redis-py: importing
    redis-py costs 65-110 ms, a quarter of a restart, and nothing on the streaming path
    needs it (``make bench``, restart to ready)."""
    target = RedisTarget.parse(settings.redis)
    if target.cluster:
        check_cluster(settings, tables, state)
        return True
    wire = RedisWire(target, settings.redis_timeout)
    try:
        wire.connect()
        wire.call(b"PING")
        if _check_info(wire):
            check_cluster(settings, tables, state)
            return True
        _check_permissions(wire, settings, tables, state)
    except WireReplyError as exc:
        if problem := auth_problem(exc):
            raise ConfigError(problem) from None
        if exc.code == "NOPERM":
            raise ConfigError("Redis refused REDIS_URL's user: NOPERM") from None
        raise RedisUnavailable(f"Redis: {exc}") from None
    except WireError as exc:
        if target.sentinel and "names a master" in str(exc) and _REFUSED_MARK in str(exc):
            raise ConfigError(
                "the Sentinels refused the credentials in REDIS_URL (sentinel_password)"
            ) from None
        if problem := tls_problem(exc) or probe_tls(
            settings.redis, min(1.0, settings.redis_timeout)
        ):
            raise ConfigError(problem) from None
        raise RedisUnavailable(str(exc)) from None
    finally:
        wire.close()
    return False


_REFUSED_MARK = "credentials refused"


def _check_info(wire: RedisWire) -> bool:
    """The eviction policy, when the user may run INFO; True when the node is one of a
    Redis Cluster (asked with ``HELLO``, which every user may run)."""
    cluster = _cluster_mode(wire)
    try:
        memory = _info(wire.call(b"INFO", b"memory"))
        if cluster is None:
            cluster = _info(wire.call(b"INFO", b"cluster")).get("cluster_enabled", "0") != "0"
    except WireReplyError as exc:
        if exc.code != "NOPERM":
            raise
        # A least-privilege ACL user (README "TLS and ACL") may not run INFO: say what
        # is not checked and go on (its permissions are still checked).
        log.warning(
            "the Redis user may not run INFO: maxmemory-policy (must not evict) is not checked"
        )
        return bool(cluster)
    policy = memory.get("maxmemory_policy", "noeviction")
    if policy not in SAFE_EVICTION:
        raise ConfigError(
            f"Redis maxmemory-policy is {policy}: set it to noeviction"
            " so cached rows are never evicted"
        )
    return cluster


def _cluster_mode(wire: RedisWire) -> bool | None:
    """Whether the node is one of a Redis Cluster, from ``HELLO``'s ``mode`` (a command
    no ACL can refuse: it needs no permission, unlike ``INFO``); None before Redis 6.2."""
    try:
        reply = wire.call(b"HELLO")
    except WireReplyError:
        return None
    mode = node_mode(reply)
    return None if mode is None else mode == "cluster"


def _info(reply: bytes) -> dict[str, str]:
    """``INFO``'s ``name:value`` lines."""
    fields: dict[str, str] = {}
    for line in reply.decode(errors="replace").splitlines():
        name, sep, value = line.partition(":")
        if sep and not name.startswith("#"):
            fields[name.strip()] = value.strip()
    return fields


# Asks, inside Redis, whether this connection's user may run each (command, key) pair:
# a command the batch script is refused half-way leaves the batch's earlier writes
# visible, so refusals are found here instead (exit 2), before anything is written.
_PERMISSIONS_SCRIPT = b"""#!lua flags=no-writes
local refused = {}
local i = 1
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  if not redis.acl_check_cmd(unpack(ARGV, i + 1, i + n)) then
    refused[#refused + 1] = ARGV[i + 1] .. ' ' .. ARGV[i + 2]
  end
  i = i + 1 + n
end
return refused
"""

# Arguments after the key that are not keys (DEL, UNLINK, EXISTS take only keys).
_VALUE = ("f", "v")


def _uses(
    settings: Settings,
    tables: tuple[TrackedTable, ...],
    state: str = STATE_KEY,
    others: tuple[str, ...] = (),
) -> list[tuple[str, ...]]:
    """The commands (with a key of each kind) the daemon sends on the tables it mirrors
    (``tables``): its batch script, sweeps, its state (``state``: its state hash), the
    registry of several daemons (set, read, cleaned at each claim) and the states of
    ``others`` (the other daemons the registry names for these tables: read by the
    overlap check)."""
    uses: list[tuple[str, ...]] = [
        *((c, state, *_VALUE) for c in ("HSET", "HMGET")),
        ("HGETALL", state),
        ("DEL", state),
        *((c, REGISTRY_KEY, *_VALUE) for c in ("HSET", "HDEL")),
        ("HGETALL", REGISTRY_KEY),
        *(("HGETALL", other) for other in others),
        ("SCAN", "0"),
    ]
    for table in tables:
        row = table.key("x")
        uses += [(c, row, *_VALUE) for c in ("HSET", "HMGET", "HDEL", "HEXISTS")]
        uses += [(c, row) for c in ("TYPE", "EXISTS", "DEL", "UNLINK")]
        uses.append(("RENAME", row, table.key("y")))
        for lookup in table.lookups:
            uses += [("SET", lookup.key("x"), "v"), ("GET", lookup.key("x"))]
            uses += [(c, lookup.key("x")) for c in ("DEL", "UNLINK")]
        for view in table.views:
            kind = ("ZADD", "ZREM") if view.sorted else ("SADD", "SREM")
            uses += [(c, view.key("x"), *_VALUE) for c in kind]
            uses += [(c, view.key("x")) for c in ("DEL", "UNLINK")]
        if settings.change_feed:
            uses += [("XADD", table.feed_key, "*", *_VALUE), ("DEL", table.feed_key)]
    return uses


def _registered_others(
    wire: RedisWire, tables: tuple[TrackedTable, ...], state: str
) -> tuple[str, ...]:
    """The other states the registry names for ``tables`` (none when it may not be read:
    the permission check says so)."""
    try:
        reply = wire.call(b"HGETALL", REGISTRY_KEY.encode())
    except WireReplyError as exc:
        if exc.code == "NOPERM":
            return ()
        raise
    if not isinstance(reply, list):
        return ()
    mine = {t.name.encode() for t in tables}
    pairs = zip(reply[0::2], reply[1::2], strict=True)
    return tuple(sorted({v.decode() for k, v in pairs if k in mine and v.decode() != state}))


_NO_EVAL = (
    "the Redis user may not run EVAL: the daemon applies every batch as a script (+@scripting)"
)


def _script_args(uses: list[tuple[str, ...]]) -> list[bytes]:
    """:data:`_PERMISSIONS_SCRIPT`'s arguments: each use as its length, then its words."""
    return [part.encode() for use in uses for part in (str(len(use)), *use)]


def _refuse(refused: list[bytes] | None, where: str = "") -> None:
    """The permission script's answer: the first refused use, as one line (exit 2)."""
    if refused:
        first = refused[0].decode()
        command, _, key = first.partition(" ")
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        raise ConfigError(
            f"the Redis user may not run {command} on {key.split('{', 1)[0]}*{more}{where}:"
            f' grant it the daemon\'s keys and commands (README "TLS and ACL")'
        )


def _check_permissions(
    wire: RedisWire, settings: Settings, tables: tuple[TrackedTable, ...], state: str
) -> None:
    uses = _uses(settings, tables, state, _registered_others(wire, tables, state))
    try:
        refused = wire.call(b"EVAL", _PERMISSIONS_SCRIPT, b"0", *_script_args(uses))
    except WireReplyError as exc:
        if exc.code == "NOPERM":
            raise ConfigError(_NO_EVAL) from None
        if "acl_check_cmd" in str(exc) or "flags" in str(exc):
            return  # a Redis before 7.0 cannot be asked; the script's replies still say
        raise
    _refuse(refused)
