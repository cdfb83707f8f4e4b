"""Typed configuration (SPEC §9, §11).

Precedence: command-line flag > ``SOVEREIGN_<KEY>`` environment variable > config
file (TOML) > default. Every key is validated at start-up; a bad value raises
:class:`ConfigError` whose message is one line naming the key and what is allowed.
List-valued environment keys are comma-separated (SPEC §12.21).

``storage = "postgres"`` needs ``postgres_dsn`` (and a DSN needs that storage);
``redis_url`` (cluster mode) needs ``storage = "postgres"``. A setting that silently does
nothing is worse than a clear error: :func:`validate` refuses such combinations.
:func:`load_with_sources` also says where each value came from (the admin API's
settings view shows it, SPEC §12.23).
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import tomllib
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import msgspec

Registration = Literal["open", "invite", "closed"]
MlsValidation = Literal["strict", "opaque"]
StorageBackend = Literal["sqlite", "postgres"]
LogFormat = Literal["text", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key."""


class Config(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    # listeners and identity
    listen: str = "0.0.0.0:8080"
    admin_listen: str = "127.0.0.1:8081"  # admin API, panel, /metrics; "" turns it off
    data_dir: str = "./data"
    server_name: str = "Sovereign"
    rp_id: str = "localhost"
    rp_name: str = "Sovereign"
    rp_origins: list[str] = msgspec.field(default_factory=lambda: ["http://localhost:8080"])
    allowed_origins: list[str] | None = None  # None: same as rp_origins (SPEC §12.10)
    tls_cert: str = ""
    tls_key: str = ""
    # the bundled browser client on the WebSocket listener (SPEC §12.30)
    web_client: bool = True
    web_client_dir: str = ""  # "": the client bundled in the package; else a directory
    # policy
    registration: Registration = "open"
    mls_validation: MlsValidation = "strict"
    # storage: "sqlite" (under data_dir) or "postgres" (postgres_dsn)
    storage: StorageBackend = "sqlite"
    postgres_dsn: str = ""
    redis_url: str = ""  # cluster mode (SPEC §12.27): needs storage = "postgres"
    cluster_name: str = "sovereign"  # the Redis channel's name: one per cluster
    # limits (SPEC §9)
    max_envelope_bytes: int = 65_536
    max_frame_bytes: int = 1_048_576
    max_message_size_bytes: int = 65_536
    rate_limit_per_second: float = 30.0
    rate_limit_burst: int = 10
    max_connections: int = 10_000
    max_connections_per_user: int = 5
    auth_timeout: float = 10.0
    idle_timeout: float = 90.0
    # liveness and abuse (SPEC §12.31, §12.32)
    handshake_timeout: float = 5.0  # the HTTP upgrade must complete within this
    ping_interval: float = 30.0  # server ping after this long without a client frame
    ping_timeout: float = 15.0  # ... and close 4008 when nothing arrives this long after
    auth_rate_per_minute: float = 30.0  # AUTH_REQUEST + AUTH_REGISTER_REQUEST per source IP
    auth_rate_burst: int = 10
    register_rate_per_hour: int = 10  # AUTH_REGISTER_REQUEST per source IP
    trusted_proxies: list[str] = msgspec.field(default_factory=list)  # IPs or CIDRs
    challenge_timeout: float = 60.0
    max_auth_failures: int = 5
    session_timeout_hours: int = 720
    max_group_members: int = 1_000
    max_groups_per_user: int = 500
    max_key_packages: int = 100
    min_key_packages: int = 5
    retention_days: int = 90
    send_buffer_limit: int = 4 * 1_048_576
    # operations
    log_format: LogFormat = "text"
    log_level: LogLevel = "info"
    group_commit_max_batch: int = 512
    # SQLite: a commit's WAL frames reach the file one write per page, durable commits
    # padded to a page of the WAL (storage/walvfs.py)
    sqlite_coalesce_wal: bool = True
    # SQLite: an event batch commits on the event loop itself while the writer thread is
    # idle and the last commit took less than this many ms; 0 keeps every commit on the
    # writer thread
    sqlite_inline_commit_ms: float = 2.0
    metrics: bool = True  # count for /metrics; false removes even the hot path's counting

    @property
    def origins_allowed(self) -> list[str]:
        return list(self.rp_origins if self.allowed_origins is None else self.allowed_origins)

    @property
    def sqlite_path(self) -> Path:
        return Path(self.data_dir) / "sovereign.db"

    @property
    def storage_dsn(self) -> str:
        """The PostgreSQL DSN when PostgreSQL is the storage, else "" (SQLite)."""
        return self.postgres_dsn if self.storage == "postgres" else ""


_POSITIVE = {
    "max_envelope_bytes",
    "max_frame_bytes",
    "max_message_size_bytes",
    "rate_limit_per_second",
    "rate_limit_burst",
    "max_connections",
    "max_connections_per_user",
    "auth_timeout",
    "idle_timeout",
    "handshake_timeout",
    "ping_interval",
    "ping_timeout",
    "auth_rate_per_minute",
    "auth_rate_burst",
    "register_rate_per_hour",
    "challenge_timeout",
    "session_timeout_hours",
    "max_group_members",
    "max_groups_per_user",
    "max_key_packages",
    "send_buffer_limit",
    "group_commit_max_batch",
}
_NON_NEGATIVE = {
    "min_key_packages",
    "retention_days",
    "max_auth_failures",
    "sqlite_inline_commit_ms",
}


def _hints() -> dict[str, Any]:
    return get_type_hints(Config)


def _describe(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(tp))
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if tp is bool:
        return "true or false"
    return "a list of strings (comma-separated in the environment)"


def _coerce_env(key: str, raw: str, tp: Any) -> Any:
    """Turn an environment string into the key's type (SPEC §11)."""
    base = tp
    if isinstance(tp, types.UnionType):  # "list[str] | None" -> list[str]
        base = next(a for a in get_args(tp) if a is not type(None))
    if get_origin(base) is Literal and raw not in get_args(base):
        raise ConfigError(
            f"{key}: {raw!r} from SOVEREIGN_{key.upper()} is not valid; expected {_describe(base)}"
        )
    if base is bool:
        word = raw.strip().lower()
        if word in ("true", "1", "yes", "on"):
            return True
        if word in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: {raw!r} is not valid; expected {_describe(base)}")
    try:
        if base is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        if base is int:
            return int(raw)
        if base is float:
            return float(raw)
        if get_origin(base) is list:
            return [p.strip() for p in raw.split(",") if p.strip()]
    except ValueError:
        raise ConfigError(f"{key}: {raw!r} is not valid; expected {_describe(base)}") from None
    return raw


def _parse_hostport(key: str, value: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{key}: {value!r} is not valid; expected HOST:PORT (port 0-65535)")


def validate(cfg: Config) -> Config:
    for key in _POSITIVE:
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key}: must be greater than 0 (got {getattr(cfg, key)})")
    for key in _NON_NEGATIVE:
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key}: must be 0 or more (got {getattr(cfg, key)})")
    _parse_hostport("listen", cfg.listen)
    if cfg.admin_listen:
        _parse_hostport("admin_listen", cfg.admin_listen)
    if cfg.storage == "postgres" and not cfg.postgres_dsn:
        raise ConfigError(
            'postgres_dsn: required with storage = "postgres"'
            " (e.g. postgresql://sovereign@127.0.0.1:5432/sovereign)"
        )
    if cfg.storage == "sqlite" and cfg.postgres_dsn:
        raise ConfigError('postgres_dsn: only used with storage = "postgres"; set that too')
    _check_cluster(cfg)
    if cfg.max_envelope_bytes > cfg.max_frame_bytes:
        raise ConfigError("max_envelope_bytes: must not exceed max_frame_bytes")
    if not cfg.rp_origins:
        raise ConfigError("rp_origins: at least one origin is required")
    for origin in cfg.rp_origins + (cfg.allowed_origins or []):
        if not origin.startswith(("http://", "https://")):
            raise ConfigError(f"rp_origins: {origin!r} is not an http(s) origin")
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise ConfigError("tls_cert: tls_cert and tls_key must be set together")
    for proxy in cfg.trusted_proxies:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise ConfigError(
                f"trusted_proxies: {proxy!r} is not an IP address or CIDR network"
            ) from None
    if cfg.max_connections_per_user > cfg.max_connections:
        raise ConfigError("max_connections_per_user: must not exceed max_connections")
    return cfg


#: Cluster keys ``sovereign setup`` leaves out: its wizard sets up a single node.
_CLUSTER_KEYS = {"redis_url", "cluster_name"}
_CLUSTER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _check_cluster(cfg: Config) -> None:
    """SPEC §12.27: Redis carries notifications between nodes that share PostgreSQL;
    with SQLite there is one process and nothing to notify."""
    if cfg.redis_url:
        if cfg.storage != "postgres":
            raise ConfigError(
                f'redis_url: cluster mode needs storage = "postgres" (storage is '
                f'"{cfg.storage}", which serves one process); leave redis_url unset'
            )
        if not cfg.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError("redis_url: expected a redis://, rediss:// or unix:// URL")
    if not _CLUSTER_NAME.fullmatch(cfg.cluster_name):
        raise ConfigError(
            f"cluster_name: {cfg.cluster_name!r} is not valid; expected 1-64 letters, "
            "digits, '_', '.' or '-'"
        )


def _convert(data: Mapping[str, Any], where: str) -> Config:
    try:
        return msgspec.convert(dict(data), Config, strict=False)
    except msgspec.ValidationError as exc:
        # msgspec says e.g. "Expected `int`, got `str` - at `$.auth_timeout`"
        text = str(exc)
        key = text.rsplit("$.", 1)[-1].rstrip("`") if "$." in text else ""
        if key and key in _hints():
            raise ConfigError(
                f"{key}: invalid value in {where}; expected {_describe(_hints()[key])}"
            ) from None
        if "unknown field" in text.lower():
            field = text.split("`")[1] if "`" in text else text
            raise ConfigError(f"{field}: unknown configuration key in {where}") from None
        raise ConfigError(f"config: {text} ({where})") from None


def load(
    config_file: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build the effective configuration: flags > environment > file > default."""
    return load_with_sources(config_file, overrides, environ)[0]


#: ``SOVEREIGN_*`` variables that are read, but are not settings: the build's and the
#: compiled modules' switches, the tests' and tools' own (``SOVEREIGN_TEST_*`` too).
NOT_SETTINGS = frozenset(
    {
        "PURE",
        "ALLOW_PURE",
        "REQUIRE_FAST",
        "BOT_TOKEN",
        "CHROMIUM",
        "MLS_VECTORS",
        "MLS_EXAMPLES",
        "CRASH_SEED",
        "CRASH_ROUNDS",
    }
)


def stray_environment(environ: Mapping[str, str] | None = None) -> list[str]:
    """One message per ``SOVEREIGN_*`` variable that names no setting. A misspelt key in
    the config file is refused (``forbid_unknown_fields``); in the environment it would
    otherwise be ignored without a word, and the server would run on the default.
    Names only: a value may be a secret (a DSN's password)."""
    env = os.environ if environ is None else environ
    settings = sorted(key.upper() for key in _hints())
    known = set(settings)
    out = []
    for name in sorted(env):
        if not name.startswith("SOVEREIGN_"):
            continue
        key = name[len("SOVEREIGN_") :]
        if key in known or key in NOT_SETTINGS or key.startswith("TEST_"):
            continue
        close = difflib.get_close_matches(key, settings, n=1)
        hint = f" (did you mean SOVEREIGN_{close[0]}?)" if close else ""
        out.append(f"{name} is not a setting; it is ignored{hint}")
    return out


def load_with_sources(
    config_file: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[Config, dict[str, str]]:
    """:func:`load`, plus where each key set by someone came from: ``file``, ``env``
    or ``flag`` (a key absent from the map has its default)."""
    env = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    sources: dict[str, str] = {}
    hints = _hints()
    if config_file is None:
        # A data dir chosen by flag or environment may hold a sovereign.toml (setup writes it).
        data_dir = (overrides or {}).get("data_dir") or env.get("SOVEREIGN_DATA_DIR") or "./data"
        candidate = Path(data_dir) / "sovereign.toml"
        if candidate.is_file():
            config_file = candidate
    if config_file is not None:
        path = Path(config_file)
        try:
            with path.open("rb") as fh:
                data.update(tomllib.load(fh))
            sources.update(dict.fromkeys(data, "file"))
        except FileNotFoundError:
            raise ConfigError(f"config: file {str(path)!r} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config: {str(path)!r} is not valid TOML ({exc})") from None
    for key, tp in hints.items():
        raw = env.get("SOVEREIGN_" + key.upper())
        if raw is not None:
            data[key] = _coerce_env(key, raw, tp)
            sources[key] = "env"
    for key, value in (overrides or {}).items():
        if value is not None:
            data[key] = value
            sources[key] = "flag"
    return validate(_convert(data, "configuration")), sources


def dump_toml(cfg: Config) -> str:
    """Render a config as TOML (used by ``sovereign setup``)."""
    lines = []
    for key, value in msgspec.structs.asdict(cfg).items():
        if value is None or key in _CLUSTER_KEYS:
            continue
        if key == "postgres_dsn" and not value:
            continue
        if isinstance(value, bool):
            rendered = "true" if value else "false"
        elif isinstance(value, (int, float)):
            rendered = repr(value)
        elif isinstance(value, list):
            rendered = "[" + ", ".join(_toml_str(v) for v in value) + "]"
        else:
            rendered = _toml_str(str(value))
        lines.append(f"{key} = {rendered}")
    return "\n".join(lines) + "\n"


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
