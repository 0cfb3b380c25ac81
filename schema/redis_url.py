"""What a ``REDIS_URL`` means, for everything that talks to Redis (daemon, tools, readers).

One parser, so the daemon's own wire (:mod:`cdc.cache.wire`), its redis-py clients (checks,
verify, snapshot sweeps) and the writer's ``CacheReader`` agree on every form
(contract section 4):

``redis://[user:password@]host:port[/db]``
    one node; ``rediss://`` for TLS with the ``ssl_*`` query parameters redis-py knows
    (``ssl_certfile``, ``ssl_keyfile``, ``ssl_ca_certs``, ``ssl_ca_path``, ``ssl_cert_reqs``,
    ``ssl_check_hostname``, ``ssl_password``), typed as redis-py types them.
``redis+sentinel://[user:password@]host:port[,host:port…]/<master name>[/<db>]``
    the master of a Sentinel-managed group: the user and password are the master's,
    ``?sentinel_password=`` (and ``?sentinel_username=``) authenticate to the Sentinels;
    ``rediss+sentinel://`` speaks TLS to the Sentinels and the master alike.
``redis+cluster://[user:password@]host:port[,host:port…]``
    a Redis Cluster: any of the nodes named lets the client discover the topology
    (``rediss+cluster://`` for TLS). A plain ``redis://`` URL of a node whose ``HELLO``
    says ``mode cluster`` means the same (:func:`cluster_url`).

Nothing here opens a connection except the clients and the cluster probes;
:meth:`RedisTarget.describe` is the only text of a URL that may be logged (no password, no
query).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

if TYPE_CHECKING:
    import redis
    import redis.asyncio
    from redis.cluster import RedisCluster

SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}
DIRECT_SCHEMES = {"redis": False, "rediss": True}
CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}
_CERT_REQS = {
    "none": ssl.CERT_NONE,
    "cert_none": ssl.CERT_NONE,
    "optional": ssl.CERT_OPTIONAL,
    "cert_optional": ssl.CERT_OPTIONAL,
    "required": ssl.CERT_REQUIRED,
    "cert_required": ssl.CERT_REQUIRED,
}


def _flag(value: str) -> bool | None:
    """A boolean query value as redis-py reads it (empty: unset)."""
    if value == "":
        return None
    return value.upper() not in ("0", "F", "FALSE", "N", "NO")


def _verify_flags(value: str) -> list[ssl.VerifyFlags]:
    """``VERIFY_X509_STRICT,VERIFY_X509_PARTIAL_CHAIN`` (brackets allowed) as redis-py
    reads it."""
    flags = []
    for name in value.replace("[", "").replace("]", "").split(","):
        flag = getattr(ssl.VerifyFlags, name.strip(), None)
        if not isinstance(flag, ssl.VerifyFlags):
            raise ValueError(name)
        flags.append(flag)
    return flags


# How the query values redis-py knows are typed (``redis.connection.URL_QUERY_ARGUMENT_PARSERS``);
# others are passed on as text. Kept here rather than imported: importing redis-py costs
# 65-110 ms, and the daemon's start (restart to ready) needs none of it.
_QUERY_PARSERS: dict[str, Callable[[str], Any]] = {
    "db": int,
    "socket_timeout": float,
    "socket_connect_timeout": float,
    "socket_read_size": int,
    "socket_keepalive": _flag,
    "retry_on_timeout": _flag,
    "max_connections": int,
    "health_check_interval": int,
    "ssl_check_hostname": _flag,
    "ssl_min_version": int,
    "timeout": float,
    "protocol": int,
    "legacy_responses": _flag,
    "retry_on_error": list,
    "ssl_include_verify_flags": _verify_flags,
    "ssl_exclude_verify_flags": _verify_flags,
}


def _query_options(query: str) -> dict[str, Any]:
    """The URL's query as typed connection options (the first value of each name wins)."""
    options: dict[str, Any] = {}
    for name, value in parse_qsl(query):
        if name in options or value == "":
            continue
        parser = _QUERY_PARSERS.get(name)
        try:
            options[name] = parser(value) if parser else value
        except (TypeError, ValueError):
            raise ValueError(f"invalid value for {name!r}") from None
    return options


_TLS_KEYS = (
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_ca_certs",
    "ssl_ca_path",
    "ssl_cert_reqs",
    "ssl_check_hostname",
    "ssl_password",
)


@dataclass(frozen=True)
class TlsOptions:
    """Client-side TLS settings, the same for the daemon's wire and for redis-py."""

    certfile: str | None = None
    keyfile: str | None = None
    ca_certs: str | None = None
    ca_path: str | None = None
    cert_reqs: str = "required"
    check_hostname: bool = True
    password: str | None = field(default=None, repr=False)

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> TlsOptions:
        reqs = str(options.get("ssl_cert_reqs") or "required").lower()
        if reqs not in _CERT_REQS:
            raise ValueError("ssl_cert_reqs must be none, optional or required")
        check = options.get("ssl_check_hostname", True)
        return cls(
            certfile=options.get("ssl_certfile"),
            keyfile=options.get("ssl_keyfile"),
            ca_certs=options.get("ssl_ca_certs"),
            ca_path=options.get("ssl_ca_path"),
            cert_reqs=reqs.removeprefix("cert_"),
            check_hostname=bool(check) and _CERT_REQS[reqs] != ssl.CERT_NONE,
            password=options.get("ssl_password"),
        )

    def context(self) -> ssl.SSLContext:
        """An ``SSLContext`` for the daemon's own sockets (``OSError`` on bad files)."""
        context = ssl.create_default_context(cafile=self.ca_certs, capath=self.ca_path)
        context.check_hostname = self.check_hostname
        context.verify_mode = _CERT_REQS[self.cert_reqs]
        if self.certfile:
            context.load_cert_chain(self.certfile, self.keyfile, self.password)
        return context

    def redis_kwargs(self) -> dict[str, Any]:
        """The same settings as redis-py connection arguments."""
        kwargs: dict[str, Any] = {
            "ssl_cert_reqs": self.cert_reqs,
            "ssl_check_hostname": self.check_hostname,
        }
        for name, value in (
            ("ssl_certfile", self.certfile),
            ("ssl_keyfile", self.keyfile),
            ("ssl_ca_certs", self.ca_certs),
            ("ssl_ca_path", self.ca_path),
            ("ssl_password", self.password),
        ):
            if value is not None:
                kwargs[name] = value
        return kwargs


@dataclass(frozen=True)
class RedisTarget:
    """A parsed ``REDIS_URL``: one node, or the Sentinels that know the master."""

    hosts: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: TlsOptions | None = None
    # Sentinel mode: the master's name and the Sentinels' own credentials.
    master: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    # Other redis-py connection arguments from the query (socket_timeout, ...).
    options: dict[str, Any] = field(default_factory=dict, repr=False)
    # Cluster mode: ``hosts`` are startup nodes (the topology is discovered from them).
    cluster: bool = False

    @property
    def sentinel(self) -> bool:
        return self.master is not None

    @property
    def host(self) -> str:
        """The node (direct URLs), or the first Sentinel."""
        return self.hosts[0][0]

    @property
    def port(self) -> int:
        return self.hosts[0][1]

    @classmethod
    def parse(cls, url: str) -> RedisTarget:
        """Parse ``url``; ``ValueError`` with a message that never repeats the URL."""
        scheme, sep, _ = url.partition("://")
        if not sep:
            raise ValueError("not a URL (expected redis://, rediss:// or redis+sentinel://)")
        scheme = scheme.lower()
        if scheme in DIRECT_SCHEMES:
            return cls._direct(url, DIRECT_SCHEMES[scheme])
        if scheme in SENTINEL_SCHEMES:
            return cls._sentinel(url, SENTINEL_SCHEMES[scheme])
        if scheme in CLUSTER_SCHEMES:
            return cls._cluster(url, CLUSTER_SCHEMES[scheme])
        raise ValueError(
            f"unknown scheme {scheme}:// (expected redis://, rediss://, redis+sentinel://,"
            " rediss+sentinel://, redis+cluster:// or rediss+cluster://)"
        )

    @classmethod
    def from_url(cls, url: str) -> RedisTarget:
        return cls.parse(url)

    @classmethod
    def _direct(cls, url: str, tls: bool) -> RedisTarget:
        parts = urlsplit(url)
        options = _query_options(parts.query)
        try:
            port = parts.port or 6379
        except ValueError:
            raise ValueError("the port must be a number from 1 to 65535") from None
        host = unquote(parts.hostname or "") or "127.0.0.1"
        if "db" not in options and parts.path:
            # As redis-py: the path is the db when it reads as a number, else ignored.
            with contextlib.suppress(ValueError):
                options["db"] = int(unquote(parts.path).replace("/", ""))
        tls_options = TlsOptions.from_options(options) if tls else None
        for name in _TLS_KEYS:
            options.pop(name, None)
        # The netloc's credentials win over ?username= / ?password= (as in redis-py).
        query_user, query_password = options.pop("username", None), options.pop("password", None)
        return cls(
            hosts=((host, port),),
            db=int(options.pop("db", 0) or 0),
            username=unquote(parts.username) if parts.username else query_user,
            password=unquote(parts.password) if parts.password else query_password,
            tls=tls_options,
            options=options,
        )

    @classmethod
    def _sentinel(cls, url: str, tls: bool) -> RedisTarget:
        parts = urlsplit(url)
        userinfo, at, hostlist = parts.netloc.rpartition("@")
        username = password = None
        if at:
            user, colon, secret = userinfo.partition(":")
            username = unquote(user) or None
            password = unquote(secret) if colon else None
        hosts: list[tuple[str, int]] = []
        for item in hostlist.split(","):
            host, colon, port = item.strip().rpartition(":")
            if not colon:
                host, port = item.strip(), "26379"
            host = host.strip("[]")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError("each Sentinel must be host:port")
            hosts.append((host, int(port)))
        path = [unquote(p) for p in parts.path.split("/") if p]
        if not path or len(path) > 2:
            raise ValueError("the path must be /<master name>[/<db>]")
        if len(path) == 2 and not path[1].isdigit():
            raise ValueError("the database after the master name must be a number")
        options = _query_options(parts.query)
        tls_options = TlsOptions.from_options(options) if tls else None
        for name in _TLS_KEYS:
            options.pop(name, None)
        db = int(path[1]) if len(path) == 2 else int(options.pop("db", 0) or 0)
        return cls(
            hosts=tuple(hosts),
            db=db,
            username=username,
            password=password,
            tls=tls_options,
            master=path[0],
            sentinel_username=options.pop("sentinel_username", None),
            sentinel_password=options.pop("sentinel_password", None),
            options=options,
        )

    @classmethod
    def _cluster(cls, url: str, tls: bool) -> RedisTarget:
        parts = urlsplit(url)
        userinfo, at, hostlist = parts.netloc.rpartition("@")
        username = password = None
        if at:
            user, colon, secret = userinfo.partition(":")
            username = unquote(user) or None
            password = unquote(secret) if colon else None
        hosts: list[tuple[str, int]] = []
        for item in hostlist.split(","):
            host, colon, port = item.strip().rpartition(":")
            if not colon:
                host, port = item.strip(), "6379"
            host = host.strip("[]")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError("each cluster node must be host:port")
            hosts.append((host, int(port)))
        path = [unquote(p) for p in parts.path.split("/") if p]
        if path and path != ["0"]:
            raise ValueError("a Redis Cluster has only database 0")
        options = _query_options(parts.query)
        tls_options = TlsOptions.from_options(options) if tls else None
        for name in _TLS_KEYS:
            options.pop(name, None)
        options.pop("db", None)
        return cls(
            hosts=tuple(hosts),
            username=username,
            password=password,
            tls=tls_options,
            options=options,
            cluster=True,
        )

    def describe(self) -> str:
        """Where, without credentials or query (safe to log)."""
        hosts = ",".join(f"{h}:{p}" for h, p in self.hosts)
        user = f"{self.username}@" if self.username else ""
        if self.cluster:
            return f"{'rediss' if self.tls else 'redis'}+cluster://{user}{hosts}"
        if self.sentinel:
            scheme = "rediss+sentinel" if self.tls else "redis+sentinel"
            return f"{scheme}://{user}{hosts}/{self.master}/{self.db}"
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{user}{hosts}/{self.db}"

    def node_kwargs(self) -> dict[str, Any]:
        """redis-py arguments for a connection to the node (or the master)."""
        kwargs: dict[str, Any] = {**self.options, "db": self.db}
        if self.username is not None:
            kwargs["username"] = self.username
        if self.password is not None:
            kwargs["password"] = self.password
        if self.tls is not None:
            kwargs["ssl"] = True
            kwargs.update(self.tls.redis_kwargs())
        return kwargs

    def sentinel_kwargs(self, timeout: float | None) -> dict[str, Any]:
        """redis-py arguments for a connection to a Sentinel."""
        kwargs: dict[str, Any] = {}
        if timeout is not None:
            kwargs["socket_timeout"] = kwargs["socket_connect_timeout"] = timeout
        if self.sentinel_username is not None:
            kwargs["username"] = self.sentinel_username
        if self.sentinel_password is not None:
            kwargs["password"] = self.sentinel_password
        if self.tls is not None:
            kwargs["ssl"] = True
            kwargs.update(self.tls.redis_kwargs())
        return kwargs


def cluster_client(url: str, **kwargs: Any) -> RedisCluster:
    """A redis-py ``RedisCluster`` for a ``redis+cluster://`` URL: it discovers the
    topology from the nodes named, routes each command to its slot's primary and follows
    ``MOVED``/``ASK`` redirections (resharding, failover)."""
    from redis.cluster import ClusterNode, RedisCluster

    target = RedisTarget.parse(url)
    if not target.cluster:
        raise ValueError("not a redis+cluster:// URL")
    node_kwargs = {**target.node_kwargs(), **kwargs}
    node_kwargs.pop("db", None)
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.hosts],  # type: ignore[no-untyped-call]
        **node_kwargs,
    )


def cluster_url(url: str, timeout: float = 2.0) -> str:
    """``url`` itself, or, for a ``redis://`` URL of a Redis Cluster node, the
    ``redis+cluster://`` URL of that node (so every part of the daemon sees one form).
    A node that cannot be asked leaves the URL as it is (the checks report why).

    Blocking: asyncio callers ask :func:`async_is_cluster_node` instead."""
    import redis

    target = RedisTarget.parse(url)
    if target.cluster or target.sentinel:
        return url
    try:
        client = redis.Redis(
            host=target.host,
            port=target.port,
            **{
                **target.node_kwargs(),
                "socket_timeout": timeout,
                "socket_connect_timeout": timeout,
            },
        )
        try:
            clustered = is_cluster_node(client)
        finally:
            client.close()
    except redis.RedisError:
        return url
    return as_cluster_url(url) if clustered else url


def is_cluster_node(client: redis.Redis) -> bool:
    """Whether ``client``'s node is one of a Redis Cluster: ``HELLO``'s ``mode``, which
    Redis answers for any user (an ACL user without ``INFO`` is still recognised);
    ``INFO cluster`` before Redis 6.2. Raises redis-py's errors.

    ``HELLO`` without a protocol version: with one it would switch the pooled connection's
    protocol under redis-py (which speaks RESP3 by default) and garble later replies."""
    import redis

    try:
        mode = node_mode(client.execute_command("HELLO"))  # type: ignore[no-untyped-call]
    except redis.ResponseError:
        mode = None  # before Redis 6.2: no HELLO without arguments
    if mode is None:
        return bool(int(client.info("cluster").get("cluster_enabled", 0)))
    return mode == "cluster"


async def async_is_cluster_node(client: redis.asyncio.Redis) -> bool:
    """:func:`is_cluster_node` on ``redis.asyncio`` (``AsyncCacheReader``: its event loop
    never waits on a blocking socket)."""
    import redis

    try:
        mode = node_mode(await client.execute_command("HELLO"))  # type: ignore[no-untyped-call]
    except redis.ResponseError:
        mode = None
    if mode is None:
        return bool(int((await client.info("cluster")).get("cluster_enabled", 0)))
    return mode == "cluster"


def node_mode(hello: Any) -> str | None:
    """``HELLO``'s ``mode`` (``standalone``, ``cluster``, ``sentinel``), from its RESP2
    (flat list) or RESP3 (map) reply, as bytes or text; None when it has none."""
    if isinstance(hello, (list, tuple)):
        hello = dict(zip(hello[0::2], hello[1::2], strict=False))
    if not isinstance(hello, dict):
        return None
    mode = hello.get(b"mode", hello.get("mode"))
    if isinstance(mode, bytes):
        return mode.decode()
    return mode if isinstance(mode, str) else None


def as_cluster_url(url: str) -> str:
    """The ``redis+cluster://`` form of a ``redis://`` URL naming one cluster node (a
    cluster URL stays as it is)."""
    if RedisTarget.parse(url).cluster:
        return url
    # urlsplit, not text cuts: a query value may hold '/' (``ssl_ca_certs=/etc/ca.pem``)
    # and the path (the db) may be absent. A cluster has only db 0: the path goes.
    parts = urlsplit(url)
    return urlunsplit((f"{parts.scheme}+cluster", parts.netloc, "", parts.query, ""))


def redis_client(url: str, **kwargs: Any) -> redis.Redis:
    """A redis-py client for any ``REDIS_URL`` form (keyword arguments win over the URL).

    With Sentinel, the client asks the Sentinels for the master on every new connection
    and treats a ``READONLY`` reply as a lost master (redis-py's ``SentinelConnectionPool``),
    so it follows a failover by itself.

    For a cluster URL this is a ``RedisCluster``, typed as the ``Redis`` the callers use:
    what they call of it (``scan_iter`` over every primary, ``unlink``/``delete`` split
    by slot, single-key commands) behaves alike; scripts over several keys must be sent
    per slot instead (:mod:`cdc.cache.cluster_sink`)."""
    import redis
    from redis.sentinel import Sentinel

    target = RedisTarget.parse(url)
    if target.cluster:
        return cast("redis.Redis", cluster_client(url, **kwargs))
    if not target.sentinel:
        return redis.Redis(host=target.host, port=target.port, **{**target.node_kwargs(), **kwargs})
    timeout = kwargs.get("socket_connect_timeout", kwargs.get("socket_timeout"))
    sentinel = Sentinel(list(target.hosts), sentinel_kwargs=target.sentinel_kwargs(timeout))  # type: ignore[no-untyped-call]
    assert target.master is not None
    client: redis.Redis = sentinel.master_for(target.master, **{**target.node_kwargs(), **kwargs})  # type: ignore[no-untyped-call]
    return client


def async_redis_client(url: str, **kwargs: Any) -> redis.asyncio.Redis:
    """:func:`redis_client` for asyncio (``AsyncCacheReader``): the same forms and options."""
    import redis.asyncio
    from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
    from redis.asyncio.sentinel import Sentinel as AsyncSentinel

    target = RedisTarget.parse(url)
    if target.cluster:
        node_kwargs = {**target.node_kwargs(), **kwargs}
        node_kwargs.pop("db", None)
        node_kwargs.pop("max_connections", None)
        cluster = AsyncRedisCluster(
            startup_nodes=[AsyncClusterNode(h, p) for h, p in target.hosts], **node_kwargs
        )
        return cast("redis.asyncio.Redis", cluster)
    if not target.sentinel:
        return redis.asyncio.Redis(
            host=target.host, port=target.port, **{**target.node_kwargs(), **kwargs}
        )
    timeout = kwargs.get("socket_connect_timeout", kwargs.get("socket_timeout"))
    sentinel = AsyncSentinel(list(target.hosts), sentinel_kwargs=target.sentinel_kwargs(timeout))  # type: ignore[no-untyped-call]
    assert target.master is not None
    client: redis.asyncio.Redis = sentinel.master_for(
        target.master, **{**target.node_kwargs(), **kwargs}
    )
    return client


def tls_problem(exc: BaseException) -> str | None:
    """One line saying what is wrong with TLS, when ``exc`` was caused by the handshake.

    A refused client certificate, an untrusted server certificate or a TLS client on a
    plain port are configuration errors (exit 2), not a peer that is down."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current)
        upper = text.upper()
        if (
            isinstance(current, ssl.SSLCertVerificationError)
            or "CERTIFICATE_VERIFY_FAILED" in upper
        ):
            return (
                "cannot verify the Redis server's TLS certificate: set ssl_ca_certs in REDIS_URL"
                " to the CA that signed it (or fix ssl_check_hostname)"
            )
        if "CERTIFICATE_REQUIRED" in upper or "CERTIFICATE REQUIRED" in upper:
            return (
                "Redis requires a TLS client certificate: set ssl_certfile and ssl_keyfile"
                " in REDIS_URL"
            )
        if "UNKNOWN_CA" in upper or "BAD_CERTIFICATE" in upper or "CERTIFICATE_UNKNOWN" in upper:
            return "Redis refused the TLS client certificate in REDIS_URL (ssl_certfile)"
        if "WRONG_VERSION_NUMBER" in upper or "WRONG VERSION NUMBER" in upper:
            return "REDIS_URL is rediss:// but the Redis port does not speak TLS"
        if isinstance(current, (FileNotFoundError, IsADirectoryError, PermissionError)):
            return f"cannot read a TLS file named in REDIS_URL: {current.strerror}"
        if isinstance(current, ssl.SSLError) and "PEM" in upper:
            return "a TLS certificate or key named in REDIS_URL is not valid PEM"
        current = current.__cause__ or current.__context__
    return None


def probe_tls(url: str, timeout: float = 1.0) -> str | None:
    """Why a TLS connection to the node is refused, when it is, else None.

    With TLS 1.3 the server judges the client's certificate after the client finished its
    handshake, so a refused (or missing) certificate shows up only as a closed connection
    on the first command. Reading first, without sending, receives the server's alert
    instead ("certificate required", "unknown CA"), which :func:`tls_problem` names."""
    target = RedisTarget.parse(url)
    if target.tls is None:
        return None
    try:
        context = target.tls.context()
    except OSError as exc:
        return tls_problem(exc) or "cannot load the TLS files named in REDIS_URL"
    try:
        sock = socket.create_connection((target.host, target.port), timeout=timeout)
    except OSError:
        return None  # not there at all: not a TLS problem
    try:
        with context.wrap_socket(sock, server_hostname=target.host) as tls_sock:
            tls_sock.recv(1)
    except TimeoutError:
        return None  # the server accepted us and waits for a command
    except OSError as exc:
        return tls_problem(exc)
    finally:
        sock.close()
    return None
