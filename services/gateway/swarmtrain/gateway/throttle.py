"""Throttling of failed sign-ins, per email and per client address.

Counted in memory, per gateway process (several gateway replicas each count on their own): a
sliding window of failure times per key. Once a key holds ``limit`` failures inside the window,
sign-ins for it are refused (429) until the oldest one ages out; a refused attempt is not checked
at all, so a correct password does not get through either, and it costs no password hashing.
A successful sign-in clears its email's failures (not its address's). The number of keys kept is
bounded: past ``max_keys`` the oldest are forgotten first.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from swarmtrain.common.settings import Settings


class FailureWindow:
    def __init__(
        self, limit: int, window_s: float, *, max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        self.window_s = window_s
        self.max_keys = max_keys
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}

    def retry_after(self, key: str) -> float | None:
        """Seconds until ``key`` may try again, or None if it may now."""
        times = self._prune(key)
        if times is None or len(times) < self.limit:
            return None
        return max(0.0, times[0] + self.window_s - self._clock())

    def failed(self, key: str) -> None:
        times = self._prune(key)
        if times is None:
            times = self._failures[key] = deque(maxlen=max(1, self.limit))
            self._evict()
        times.append(self._clock())

    def clear(self, key: str) -> None:
        self._failures.pop(key, None)

    def __len__(self) -> int:
        return len(self._failures)

    def _prune(self, key: str) -> deque[float] | None:
        times = self._failures.get(key)
        if times is None:
            return None
        horizon = self._clock() - self.window_s
        while times and times[0] <= horizon:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times

    def _evict(self) -> None:
        while len(self._failures) > self.max_keys:
            del self._failures[next(iter(self._failures))]


class SignInThrottle:
    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        window = settings.signin_window_s
        self.by_email = FailureWindow(settings.signin_max_failures, window, clock=clock)
        self.by_address = FailureWindow(settings.signin_max_failures_per_address, window, clock=clock)

    def retry_after(self, email: str, address: str) -> float | None:
        waits = [w for w in (self.by_email.retry_after(email), self.by_address.retry_after(address)) if w is not None]
        return max(waits) if waits else None

    def failed(self, email: str, address: str) -> None:
        self.by_email.failed(email)
        self.by_address.failed(address)

    def succeeded(self, email: str) -> None:
        self.by_email.clear(email)
