"""Logging setup (SPEC §11): one line per event, text or JSON (``--log-format json``).

Never log tokens, invite codes or payloads: callers pass identifiers only.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

import orjson

_RESERVED = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def setup(fmt: str = "text", level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    quiet_libraries()


def quiet_libraries() -> None:
    """The libraries' loggers at the levels a server runs with."""
    # picows logs every parser error at ERROR; a client's malformed frame is not our error
    # (our own record of it is the rate-limited abuse log, SPEC §12.32).
    logging.getLogger("picows").setLevel(logging.CRITICAL)


#: Protocol errors, auth failures and limit hits (SPEC §12.32) log here. A flood of
#: them must not fill the disk: :func:`limit_abuse_log` caps the rate.
ABUSE_LOGGER = "sovereign.abuse"


class RateLimitFilter(logging.Filter):
    """A token bucket over log records: at most ``burst`` at once and ``per_second``
    after that. Dropped records are counted and the next one that passes says how many
    were suppressed, so a flood is visible without being written line by line."""

    def __init__(
        self, per_second: float = 10.0, burst: int = 50, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.per_second = per_second
        self.burst = float(burst)
        self.clock = clock
        self.tokens = float(burst)
        self.at = clock()
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.per_second)
        self.at = now
        if self.tokens < 1.0:
            self.suppressed += 1
            return False
        self.tokens -= 1.0
        if self.suppressed:
            record.msg = f"{record.msg} (and {self.suppressed} similar suppressed)"
            self.suppressed = 0
        return True


def limit_abuse_log(per_second: float = 10.0, burst: int = 50) -> RateLimitFilter:
    """Install (once) the rate limit on the abuse logger; returns it."""
    logger = logging.getLogger(ABUSE_LOGGER)
    for f in logger.filters:
        if isinstance(f, RateLimitFilter):
            return f
    flt = RateLimitFilter(per_second, burst)
    logger.addFilter(flt)
    return flt
