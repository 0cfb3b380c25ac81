"""Every ``REDIS_URL`` form (contract section 4) parsed one way, and never printed with a secret."""

from __future__ import annotations

import pytest

from cdc.cache.sink import RedisSink
from cdc.errors import ConfigError, RedisUnavailable
from cdc.settings import load_settings
from cdc.transform.plan import CommandBatch
from schema.redis_url import RedisTarget, as_cluster_url, redis_client

SECRET = "s3cr3t-pw"


def test_direct_tls_url_with_client_certificate() -> None:
    target = RedisTarget.parse(
        f"rediss://cdc:{SECRET}@cache.example:6380/3?ssl_certfile=/c.pem&ssl_keyfile=/k.pem"
        "&ssl_ca_certs=/ca.pem&ssl_check_hostname=false&socket_timeout=2"
    )
    assert target.hosts == (("cache.example", 6380),)
    assert (target.db, target.username, target.password) == (3, "cdc", SECRET)
    assert target.tls is not None
    assert (target.tls.certfile, target.tls.keyfile, target.tls.ca_certs) == (
        "/c.pem",
        "/k.pem",
        "/ca.pem",
    )
    assert target.tls.check_hostname is False
    assert target.tls.cert_reqs == "required"
    assert target.options == {"socket_timeout": 2.0}
    assert not target.sentinel
    assert target.describe() == "rediss://cdc@cache.example:6380/3"
    kwargs = target.node_kwargs()
    assert kwargs["ssl"] is True
    assert kwargs["ssl_certfile"] == "/c.pem"


def test_cert_reqs_none_turns_hostname_checks_off() -> None:
    target = RedisTarget.parse("rediss://h:1/0?ssl_cert_reqs=none")
    assert target.tls is not None
    assert target.tls.cert_reqs == "none"
    assert target.tls.check_hostname is False
    target.tls.context()  # a consistent SSLContext (no ValueError)


def test_plain_url_has_no_tls() -> None:
    target = RedisTarget.parse("redis://127.0.0.1:6379")
    assert target.tls is None
    assert target.db == 0
    assert target.describe() == "redis://127.0.0.1:6379/0"


def test_sentinel_url() -> None:
    target = RedisTarget.parse(
        f"redis+sentinel://app:{SECRET}@s1:26379,s2:26380,[::1]:26381/mymaster/2"
        f"?sentinel_password={SECRET}x&sentinel_username=watch"
    )
    assert target.sentinel
    assert target.hosts == (("s1", 26379), ("s2", 26380), ("::1", 26381))
    assert target.master == "mymaster"
    assert (target.db, target.username, target.password) == (2, "app", SECRET)
    assert (target.sentinel_username, target.sentinel_password) == ("watch", SECRET + "x")
    assert target.tls is None
    described = target.describe()
    assert SECRET not in described
    assert described == "redis+sentinel://app@s1:26379,s2:26380,::1:26381/mymaster/2"
    assert target.sentinel_kwargs(1.0)["password"] == SECRET + "x"
    assert target.node_kwargs()["password"] == SECRET


def test_tls_sentinel_url_defaults() -> None:
    target = RedisTarget.parse("rediss+sentinel://s1/mymaster?ssl_ca_certs=/ca.pem")
    assert target.hosts == (("s1", 26379),)
    assert target.db == 0
    assert target.tls is not None
    assert target.tls.ca_certs == "/ca.pem"
    assert target.sentinel_kwargs(None)["ssl"] is True


@pytest.mark.parametrize(
    "url",
    [
        f"http://u:{SECRET}@h:1/0",
        f"redis+sentinel://u:{SECRET}@h:1",
        f"redis+sentinel://u:{SECRET}@h:1/m/x",
        f"redis+sentinel://u:{SECRET}@h:99999/m",
        f"redis+sentinel://u:{SECRET}@:1/m",
        f"redis+sentinel://u:{SECRET}@h:1/m/1/2",
        f"rediss://u:{SECRET}@h:1/0?ssl_cert_reqs=maybe",
        f"nourl{SECRET}",
    ],
)
def test_invalid_urls_are_refused_without_the_secret(url: str) -> None:
    with pytest.raises(ValueError, match=r".") as caught:
        RedisTarget.parse(url)
    assert SECRET not in str(caught.value)
    with pytest.raises(ConfigError) as config:
        load_settings(database_url="postgresql://localhost/x", redis_url=url)
    assert SECRET not in str(config.value)
    assert str(config.value).startswith("REDIS_URL")


def test_settings_describe_hides_every_secret() -> None:
    settings = load_settings(
        database_url="postgresql://localhost/x",
        redis_url=f"rediss+sentinel://a:{SECRET}@s1:1,s2:2/m/1?sentinel_password={SECRET}"
        f"&ssl_password={SECRET}&ssl_keyfile=/k.pem",
        redis_min_replicas=2,
    )
    assert settings.redis_min_replicas == 2
    assert SECRET not in str(settings.describe())
    assert "/k.pem" not in str(settings.describe())


def test_redis_client_speaks_every_form(redis_url: str) -> None:
    client = redis_client(redis_url)
    assert client.ping()
    client.close()


def test_too_few_replicas_is_retryable_and_not_silent(redis_url: str) -> None:
    """A Redis without replicas cannot satisfy CDC_REDIS_MIN_REPLICAS=1."""
    sink = RedisSink(redis_url, timeout=0.5, min_replicas=1)
    sink.connect()
    with pytest.raises(RedisUnavailable, match="CDC_REDIS_MIN_REPLICAS"):
        sink.claim({"slot": "s"})
    sink.close()
    # Without the setting no WAIT is sent at all.
    plain = RedisSink(redis_url, timeout=0.5)
    plain.connect()
    plain.claim({"slot": "s"})
    plain.apply(CommandBatch(), {"lsn": "0/10", "partial": ""})
    plain.close()


@pytest.mark.parametrize(
    "url",
    [
        "redis://h:1/-1",
        "redis://h:1/ 1",
        "redis://h/not-a-number",
        "redis://h/2?db=3",
        "redis://h/?db=3&db=4",
        "redis://u:p%40ss@[::1]:7000/4",
        "redis://h?password=s3cret&username=bob",
        "redis://:pw@h?password=other",
        "redis://h?legacy_responses=false&socket_keepalive=no&retry_on_timeout=yes",
        "redis://h?socket_timeout=2.5&health_check_interval=3&client_name=svc",
        "rediss://h?ssl_include_verify_flags=VERIFY_X509_STRICT,VERIFY_X509_PARTIAL_CHAIN",
    ],
)
def test_direct_urls_mean_what_they_mean_to_redis_py(url: str) -> None:
    """The daemon parses REDIS_URL without importing redis-py (it costs 65-110 ms of the
    start); what it reads must be what redis-py reads."""
    from redis.connection import parse_url

    theirs = {k: v for k, v in parse_url(url).items() if k != "connection_class"}  # type: ignore[no-untyped-call]
    target = RedisTarget.parse(url)
    ours: dict[str, object] = {"host": target.host, **target.options}
    for name, value in (
        ("port", target.port),
        ("db", target.db),
        ("username", target.username),
        ("password", target.password),
    ):
        if name in theirs or value not in (None, 0, 6379):
            ours[name] = value
    if target.tls is not None:
        theirs = {k: v for k, v in theirs.items() if not k.startswith("ssl_") or "verify" in k}
    assert ours == theirs


@pytest.mark.parametrize(
    "url",
    [
        f"redis://u:{SECRET}@h:7000/0?ssl_ca_certs=/etc/ca.pem&socket_timeout=2",
        f"redis://u:{SECRET}@h:7000?ssl_ca_certs=/etc/ca.pem&socket_timeout=2",
        f"redis://u:{SECRET}@h:7000/?ssl_ca_certs=/etc/ca.pem&socket_timeout=2",
    ],
)
def test_cluster_form_of_a_node_url_keeps_a_query_with_slashes(url: str) -> None:
    """``as_cluster_url`` splits the URL as a URL: a '/' inside a query value (a file
    path), with or without a db path, stays in the query."""
    clustered = as_cluster_url(url)
    assert (
        clustered == f"redis+cluster://u:{SECRET}@h:7000?ssl_ca_certs=/etc/ca.pem&socket_timeout=2"
    )
    target = RedisTarget.parse(clustered)
    assert target.cluster
    assert target.hosts == (("h", 7000),)
    assert (target.username, target.password) == ("u", SECRET)
    assert target.options == {"socket_timeout": 2.0}  # ssl_* apply to rediss:// only


def test_cluster_form_of_a_tls_node_url_keeps_its_tls_options() -> None:
    url = "rediss://u:p%2Fq@h:7000?ssl_ca_certs=/etc/ca.pem&ssl_check_hostname=false"
    target = RedisTarget.parse(as_cluster_url(url))
    assert target.cluster
    assert target.password == "p/q"
    assert target.tls is not None
    assert target.tls.ca_certs == "/etc/ca.pem"
    assert target.tls.check_hostname is False
