"""Failed authentication throttled per client address.

After ``limit`` requests with a wrong API key from one address within ``window_s``, requests
from that address carrying a wrong or no key are answered 429 ``too-many-failed-attempts`` with
``Retry-After`` until the oldest of those failures leaves the window; a valid key is still
accepted from it (one indexed lookup, the same as a refusal costs), so the clients behind one
NAT are not locked out by a misconfigured neighbour. A request without a key counts as no
attempt (nothing was guessed) but is refused 429 like the others while the address is throttled;
429s are not counted either, so a client that waits ``Retry-After`` is heard again.

API keys are long random secrets: guessing one is hopeless with or without this. What it bounds
is the work and the log noise of a key-spraying client, and it makes a misconfigured script
visible (429 instead of an endless stream of 401s).

State is in memory, per gateway process (N replicas allow N times ``limit``), and bounded: at
most ``max_addresses`` addresses with at most ``limit`` failure times each, the least recently
failing forgotten first. The client address is the peer's, or the X-Forwarded-For of a trusted
proxy (``forwarded_allow_ips``).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable


class AuthThrottle:
    """Failure times per client address (thread-safe: authentication runs in the thread pool)."""

    def __init__(
        self, *, limit: int, window_s: float, max_addresses: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit, self.window_s, self.max_addresses, self.clock = limit, window_s, max_addresses, clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def retry_after_s(self, address: str) -> int | None:
        """Whole seconds until ``address`` may try a wrong key again; None if it may now."""
        if self.limit <= 0:
            return None
        with self._lock:
            times = self._failures.get(address)
            if times is None or len(times) < self.limit:
                return None
            wait = times[0] + self.window_s - self.clock()
        return max(1, math.ceil(wait)) if wait > 0 else None

    def failed(self, address: str) -> None:
        """Record one failed attempt from ``address``."""
        if self.limit <= 0:
            return
        now = self.clock()
        with self._lock:
            times = self._failures.pop(address, None) or deque(maxlen=self.limit)
            times.append(now)
            self._failures[address] = times  # now the most recent
            while len(self._failures) > self.max_addresses:
                self._failures.popitem(last=False)

    def __len__(self) -> int:
        return len(self._failures)
