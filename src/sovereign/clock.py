"""The one clock (injected): monotonic seconds for deadlines and rate limits, wall-clock
microseconds for timestamps that are stored or sent (SPEC §3 ``server_timestamp``).

Services never call :mod:`time` themselves; they receive a :class:`Clock`, so tests can
drive time with a fake (``tests/helpers/fakes.py``) instead of sleeping.
"""

from __future__ import annotations

import time


class Clock:
    __slots__ = ()

    #: Seconds on a clock that never steps back (timeouts, token buckets). The C
    #: function itself, not a wrapper: it is read on every received frame.
    monotonic = staticmethod(time.monotonic)

    def now_us(self) -> int:
        """Wall-clock microseconds since the epoch."""
        return time.time_ns() // 1000

    def now_ms(self) -> int:
        return self.now_us() // 1000

    def now_s(self) -> int:
        return self.now_us() // 1_000_000


#: The process's real clock.
SYSTEM_CLOCK = Clock()
