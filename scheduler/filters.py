"""Filters sit between a probe and a policy: they smooth values or hold back the ones not worth acting on.

As in Kerrighed, a filter sees one value stream and decides, value by value, whether to pass it on.
Time is an argument (seconds on any monotonic clock), never read here, so a filter's behaviour is
a function of what it was fed and is tested with made-up times.
"""

from __future__ import annotations

from abc import abstractmethod

from scheduler._plugin import Param, Plugin, Registry


class Filter(Plugin):
    kind = "filter"

    @abstractmethod
    def feed(self, value: float, now: float) -> float | None:
        """The value to pass on, or None to suppress this event."""


_filters = Registry(Filter, "kerrighed.filters")
register = _filters.register
get_filter = _filters.get
known_filters = _filters.known


@register
class Threshold(Filter):
    name = "threshold"
    description = "passes a value only if it differs from the last passed one by more than `threshold`"
    param_spec = {"threshold": Param(float)}

    def __init__(self, **params):
        super().__init__(**params)
        if self.params["threshold"] < 0:
            raise self._bad_param("threshold", "0 or more")
        self._last: float | None = None

    def feed(self, value: float, now: float) -> float | None:
        if self._last is not None and abs(value - self._last) <= self.params["threshold"]:
            return None
        self._last = value
        return value


@register
class FreqLimit(Filter):
    name = "freq_limit"
    description = "passes at most one value every `min_interval` seconds"
    param_spec = {"min_interval": Param(float)}

    def __init__(self, **params):
        super().__init__(**params)
        if self.params["min_interval"] < 0:
            raise self._bad_param("min_interval", "0 or more seconds")
        self._last_time: float | None = None

    def feed(self, value: float, now: float) -> float | None:
        if self._last_time is not None and now - self._last_time < self.params["min_interval"]:
            return None
        self._last_time = now
        return value


@register
class Ewma(Filter):
    name = "ewma"
    description = "exponentially weighted moving average: alpha x new value + (1 - alpha) x previous average"
    param_spec = {"alpha": Param(float, 0.5)}

    def __init__(self, **params):
        super().__init__(**params)
        if not 0 < self.params["alpha"] <= 1:
            raise self._bad_param("alpha", "in (0, 1]")
        self._average: float | None = None

    def feed(self, value: float, now: float) -> float | None:
        alpha = self.params["alpha"]
        self._average = value if self._average is None else alpha * value + (1 - alpha) * self._average
        return self._average
