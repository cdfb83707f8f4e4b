"""Configuration precedence and validation (SPEC §11)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sovereign.config import (
    NOT_SETTINGS,
    Config,
    ConfigError,
    dump_toml,
    load,
    load_with_sources,
    stray_environment,
)

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_match_spec_section_9() -> None:
    c = load(None, {}, environ={})
    assert (c.max_envelope_bytes, c.max_frame_bytes) == (65_536, 1_048_576)
    assert (c.rate_limit_per_second, c.rate_limit_burst) == (30.0, 10)
    assert (c.max_connections, c.max_connections_per_user) == (10_000, 5)
    assert (c.auth_timeout, c.idle_timeout) == (10.0, 90.0)
    assert c.session_timeout_hours == 30 * 24
    assert (c.max_group_members, c.max_groups_per_user) == (1_000, 500)
    assert (c.max_key_packages, c.min_key_packages, c.retention_days) == (100, 5, 90)
    assert (c.listen, c.data_dir) == ("0.0.0.0:8080", "./data")
    assert (c.storage, c.postgres_dsn, c.redis_url) == ("sqlite", "", "")
    assert (c.admin_listen, c.metrics) == ("127.0.0.1:8081", True)  # SPEC §10: loopback
    assert c.origins_allowed == c.rp_origins


def test_precedence_flag_over_env_over_file_over_default(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('auth_timeout = 3\nserver_name = "file"\nregistration = "invite"\n')
    env = {"SOVEREIGN_AUTH_TIMEOUT": "4", "SOVEREIGN_SERVER_NAME": "env"}
    c = load(f, {"auth_timeout": 5.0}, environ=env)
    assert c.auth_timeout == 5.0  # flag
    assert c.server_name == "env"  # environment
    assert c.registration == "invite"  # file
    assert c.idle_timeout == 90.0  # default


def test_list_keys_from_environment_are_comma_separated() -> None:
    c = load(None, {}, environ={"SOVEREIGN_RP_ORIGINS": "https://a.example, https://b.example"})
    assert c.rp_origins == ["https://a.example", "https://b.example"]


def test_data_dir_toml_is_picked_up(tmp_path: Path) -> None:
    (tmp_path / "sovereign.toml").write_text('server_name = "from data dir"\n')
    assert load(None, {"data_dir": str(tmp_path)}, environ={}).server_name == "from data dir"


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"SOVEREIGN_AUTH_TIMEOUT": "soon"}, "auth_timeout"),
        ({"SOVEREIGN_REGISTRATION": "maybe"}, "registration"),
        ({"SOVEREIGN_MLS_VALIDATION": "lenient"}, "mls_validation"),
        ({"SOVEREIGN_MAX_CONNECTIONS": "0"}, "max_connections"),
        ({"SOVEREIGN_LISTEN": "nowhere"}, "listen"),
        ({"SOVEREIGN_RP_ORIGINS": "ftp://x"}, "rp_origins"),
        ({"SOVEREIGN_MAX_ENVELOPE_BYTES": "2000000"}, "max_envelope_bytes"),
        ({"SOVEREIGN_TLS_CERT": "/x.pem"}, "tls_cert"),
    ],
)
def test_bad_values_name_the_key(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(None, {}, environ=env)
    msg = str(info.value)
    assert msg.startswith(key + ":") and "\n" not in msg


def test_unknown_key_in_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("no_such_key = 1\n")
    with pytest.raises(ConfigError, match="no_such_key"):
        load(f, {}, environ={})


def test_a_misspelt_environment_setting_is_named_with_the_likely_one() -> None:
    env = {
        "SOVEREIGN_MAX_CONECTIONS": "5",  # misspelt
        "SOVEREIGN_RATE_LIMIT_BURST": "50",  # a setting
        "SOVEREIGN_REQUIRE_FAST": "1",  # read, not a setting
        "SOVEREIGN_TEST_LOOP": "both",  # the tests' own
        "SOVEREIGN_ZZZ": "1",  # like nothing
        "PATH": "/bin",
    }
    assert stray_environment(env) == [
        "SOVEREIGN_MAX_CONECTIONS is not a setting; it is ignored"
        " (did you mean SOVEREIGN_MAX_CONNECTIONS?)",
        "SOVEREIGN_ZZZ is not a setting; it is ignored",
    ]
    # The settings still load: a stray variable is reported, never fatal.
    assert load(None, {}, environ=env).rate_limit_burst == 50
    # Every setting's own variable is accepted.
    every = {"SOVEREIGN_" + k.upper(): "" for k in Config.__struct_fields__}
    assert stray_environment(every) == []


def test_every_variable_that_is_not_a_setting_is_read_somewhere() -> None:
    """The exemption list cannot keep a name that nothing reads any more."""
    files = [
        p
        for folder in ("src", "tests", "benchmarks", "examples")
        for p in (ROOT / folder).rglob("*")
        if p.suffix in (".py", ".pyx", ".js") and p.name != "test_config.py"
    ]
    files += [ROOT / "setup.py", ROOT / "Makefile", *(ROOT / ".ci").iterdir()]
    text = "".join(p.read_text(errors="replace") for p in files if p.is_file())
    for name in NOT_SETTINGS:
        assert f"SOVEREIGN_{name}" in text, name


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "nope.toml", {}, environ={})
    bad = tmp_path / "bad.toml"
    bad.write_text("= =")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(bad, {}, environ={})


def test_dump_round_trips(tmp_path: Path) -> None:
    c = load(None, {"server_name": 'quote " name', "rp_origins": ["https://x.example"]}, environ={})
    f = tmp_path / "out.toml"
    f.write_text(dump_toml(c))
    assert load(f, {}, environ={}) == c


# -- storage and cluster keys ----------------------------------------------------------


@pytest.mark.parametrize("source", ["file", "environment", "override"])
def test_postgres_storage_needs_a_dsn_and_a_dsn_needs_postgres(tmp_path: Path, source: str) -> None:
    def attempt(values: dict[str, str]) -> Config:
        f = tmp_path / "c.toml"
        f.write_text("".join(f'{k} = "{v}"\n' for k, v in values.items()))
        if source == "file":
            return load(f, {}, environ={})
        if source == "environment":
            return load(None, {}, environ={"SOVEREIGN_" + k.upper(): v for k, v in values.items()})
        return load(None, dict(values), environ={})

    dsn = "postgresql://sovereign@127.0.0.1:5432/sovereign"
    c = attempt({"storage": "postgres", "postgres_dsn": dsn})
    assert (c.storage, c.postgres_dsn, c.storage_dsn) == ("postgres", dsn, dsn)
    for values, start in (
        ({"storage": "postgres"}, "postgres_dsn: required with storage"),
        ({"postgres_dsn": dsn}, 'postgres_dsn: only used with storage = "postgres"'),
    ):
        with pytest.raises(ConfigError) as info:
            attempt(values)
        assert str(info.value).startswith(start) and "\n" not in str(info.value)
    assert load(None, {}, environ={}).storage_dsn == ""


def test_unavailable_features_unset_or_at_default_are_accepted(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('storage = "sqlite"\npostgres_dsn = ""\nredis_url = ""\n')
    env = {"SOVEREIGN_REDIS_URL": "", "SOVEREIGN_STORAGE": "sqlite"}
    assert load(f, {"postgres_dsn": None}, environ=env).storage == "sqlite"


@pytest.mark.parametrize("source", ["file", "environment", "override"])
def test_redis_url_with_sqlite_is_refused_in_one_line(tmp_path: Path, source: str) -> None:
    # SPEC §12.27: Redis links nodes that share PostgreSQL; SQLite serves one process.
    url = "redis://localhost:6379/0"
    f = tmp_path / "c.toml"
    f.write_text(f'redis_url = "{url}"\n')
    with pytest.raises(ConfigError) as info:
        if source == "file":
            load(f, {}, environ={})
        elif source == "environment":
            load(None, {}, environ={"SOVEREIGN_REDIS_URL": url})
        else:
            load(None, {"redis_url": url}, environ={})
    msg = str(info.value)
    assert msg.startswith('redis_url: cluster mode needs storage = "postgres"')
    assert "\n" not in msg and url not in msg  # a URL may hold a password


def test_redis_url_with_postgres_is_accepted() -> None:
    dsn = "postgresql://sovereign@127.0.0.1:5432/sovereign"
    env = {
        "SOVEREIGN_STORAGE": "postgres",
        "SOVEREIGN_POSTGRES_DSN": dsn,
        "SOVEREIGN_REDIS_URL": "redis://127.0.0.1:6379/0",
        "SOVEREIGN_CLUSTER_NAME": "eu-1",
    }
    c = load(None, {}, environ=env)
    assert (c.redis_url, c.cluster_name) == ("redis://127.0.0.1:6379/0", "eu-1")
    with pytest.raises(ConfigError, match=r"^redis_url: expected a redis://"):
        load(None, {}, environ={**env, "SOVEREIGN_REDIS_URL": "http://x"})


def test_cluster_name_is_validated() -> None:
    assert load(None, {}, environ={}).cluster_name == "sovereign"
    assert load(None, {"cluster_name": "eu-1.prod"}, environ={}).cluster_name == "eu-1.prod"
    for bad in ("", "has space", "x" * 65, "a:b"):
        with pytest.raises(ConfigError, match=r"^cluster_name: "):
            load(None, {"cluster_name": bad}, environ={})


def test_setup_writes_no_unavailable_keys() -> None:
    text = dump_toml(load(None, {}, environ={}))
    assert 'storage = "sqlite"' in text
    for key in ("postgres_dsn", "redis_url", "cluster_name"):
        assert key not in text
    assert 'admin_listen = "127.0.0.1:8081"' in text


def test_admin_listen_is_a_host_and_port_or_empty_for_off(tmp_path: Path) -> None:
    assert load(None, {"admin_listen": "0.0.0.0:9000"}, environ={}).admin_listen == "0.0.0.0:9000"
    assert load(None, {}, environ={"SOVEREIGN_ADMIN_LISTEN": ""}).admin_listen == ""
    for bad in ("localhost", "127.0.0.1:http", ":8081", "127.0.0.1:70000"):
        with pytest.raises(ConfigError) as info:
            load(None, {"admin_listen": bad}, environ={})
        assert str(info.value).startswith("admin_listen: ") and "HOST:PORT" in str(info.value)


def test_metrics_switch_from_each_source(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("metrics = false\n")
    assert load(f, {}, environ={}).metrics is False
    assert load(None, {}, environ={"SOVEREIGN_METRICS": "false"}).metrics is False
    assert load(None, {}, environ={"SOVEREIGN_METRICS": "1"}).metrics is True
    with pytest.raises(ConfigError) as info:
        load(None, {}, environ={"SOVEREIGN_METRICS": "maybe"})
    assert str(info.value).startswith("metrics: ") and "true or false" in str(info.value)


def test_sources_say_where_each_value_came_from(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('server_name = "file"\nrate_limit_burst = 7\n')
    env = {"SOVEREIGN_RATE_LIMIT_BURST": "8", "SOVEREIGN_REGISTRATION": "invite"}
    cfg, sources = load_with_sources(f, {"registration": "closed", "listen": None}, environ=env)
    assert (cfg.server_name, cfg.rate_limit_burst, cfg.registration) == ("file", 8, "closed")
    assert sources["server_name"] == "file"
    assert sources["rate_limit_burst"] == "env"
    assert sources["registration"] == "flag"
    assert "listen" not in sources and "max_connections" not in sources  # defaults


def test_sqlite_inline_commit_ms_defaults_to_two_and_refuses_negative_values() -> None:
    assert load(None, {}, environ={}).sqlite_inline_commit_ms == 2.0
    env = {"SOVEREIGN_SQLITE_INLINE_COMMIT_MS": "0"}
    assert load(None, {}, environ=env).sqlite_inline_commit_ms == 0.0  # always the thread
    with pytest.raises(ConfigError, match=r"^sqlite_inline_commit_ms: must be 0 or more"):
        load(None, {"sqlite_inline_commit_ms": -1}, environ={})
