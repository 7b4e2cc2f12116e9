"""Metrics: counters, gauges and histograms, rendered in the Prometheus text format.

Design notes
------------
* **Why not prometheus_client.** Its registry is process-global, its default
  collectors add process/platform metrics we do not want to promise, and our needs
  are a few dozen series. A registry per agent keeps tests hermetic (two agents, two
  registries) and the format (text exposition 0.0.4) is small and stable. The tests
  parse our output with ``prometheus_client``'s own parser, so we stay honest.
* **Two ways to feed a metric.** *Instrumented*: the code that sees the event calls
  ``inc``/``set``/``observe`` (bytes received, job durations). *Collected*: the
  metric is given ``collect=``, a callable run at render time that returns the
  current value, or ``{label values: value}`` for a labelled metric (uploads by
  state, jobs by state and kind, counts a component already keeps). Collected
  callbacks run on the event loop while ``MOUNT/metrics`` is being rendered: they must
  be cheap and must not block.
* **Threads.** Instrumented metrics may be updated from worker threads (a database
  flush, a hash); each metric family has a lock, held only for the arithmetic.
* **Names** follow Prometheus conventions: ``fsagent_`` prefix, base units (seconds,
  bytes), counters end in ``_total`` (added if missing). A name registered twice is a
  programming error and raises ``ValueError`` at start-up, not at scrape time.

Adding a metric from a component, in its ``__init__``::

    self.bytes_in = agent.metrics.counter("fsagent_upload_bytes_received_total",
                                          "Bytes written into uploads/")
    agent.metrics.gauge("fsagent_uploads", "Upload tasks by state", labels=("state",),
                        collect=lambda: {(s,): n for s, n in self.count_by_state().items()})
    self.job_seconds = agent.metrics.histogram("fsagent_job_duration_seconds",
                                               "Job run time", labels=("kind",))
    ...
    self.bytes_in.inc(len(data)); self.job_seconds.labels("import").observe(12.5)
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = ["Registry", "Counter", "Gauge", "Histogram", "CONTENT_TYPE", "DEFAULT_BUCKETS"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds, from a fast FUSE flush to a long import job.
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0,
)

_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

LabelValues = tuple[str, ...]
Collected = Callable[[], "float | dict[LabelValues, float]"]


def _format_value(value: float) -> str:
    if value != value:
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels_text(names: Sequence[str], values: Sequence[str],
                 extra: tuple[str, str] | None = None) -> str:
    pairs = [f'{n}="{_escape_label(v)}"' for n, v in zip(names, values)]
    if extra is not None:
        pairs.append(f'{extra[0]}="{extra[1]}"')
    return "{" + ",".join(pairs) + "}" if pairs else ""


class _Metric:
    type_name = "untyped"

    def __init__(self, name: str, help: str, labels: Sequence[str] = (),
                 collect: Collected | None = None):
        if not _NAME.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        for label in labels:
            if not _LABEL.match(label) or label.startswith("__") or label == "le":
                raise ValueError(f"invalid label name {label!r} for {name}")
        self.name = name
        self.help = help
        self.label_names = tuple(labels)
        self._collect = collect
        self._lock = threading.Lock()
        self._values: dict[LabelValues, Any] = {}

    def _key(self, values: Sequence[Any], kwargs: dict[str, Any]) -> LabelValues:
        if kwargs:
            if values:
                raise TypeError("pass label values by position or by name, not both")
            try:
                values = [kwargs.pop(n) for n in self.label_names]
            except KeyError as e:
                raise ValueError(f"{self.name}: missing label {e.args[0]!r}") from None
            if kwargs:
                raise ValueError(f"{self.name}: unknown labels {sorted(kwargs)}")
        if len(values) != len(self.label_names):
            raise ValueError(f"{self.name} has labels {self.label_names}, got {tuple(values)}")
        return tuple(str(v) for v in values)

    def _samples(self) -> Iterable[tuple[str, str, float]]:
        """(suffix, label text, value) for every series."""
        if self._collect is not None:
            got = self._collect()
            items = got.items() if isinstance(got, dict) else [((), got)]
            for key, value in sorted((tuple(map(str, k)), v) for k, v in items):
                if len(key) != len(self.label_names):
                    raise ValueError(f"{self.name}: collected {key} for labels "
                                     f"{self.label_names}")
                yield "", _labels_text(self.label_names, key), float(value)
            return
        with self._lock:
            items = sorted(self._values.items())
        for key, value in items:
            yield "", _labels_text(self.label_names, key), float(value)

    def render(self) -> str:
        lines = [f"# HELP {self.name} {_escape_help(self.help)}",
                 f"# TYPE {self.name} {self.type_name}"]
        for suffix, labels, value in self._samples():
            lines.append(f"{self.name}{suffix}{labels} {_format_value(value)}")
        return "\n".join(lines) + "\n"


class _Child:
    """One labelled series of a counter or gauge: ``metric.labels("running").inc()``."""

    __slots__ = ("_metric", "_key")

    def __init__(self, metric: _Metric, key: LabelValues):
        self._metric, self._key = metric, key

    def inc(self, amount: float = 1.0) -> None:
        self._metric._add(self._key, amount)

    def dec(self, amount: float = 1.0) -> None:
        self._metric._add(self._key, -amount)  # Counter refuses negative amounts

    def set(self, value: float) -> None:
        self._metric._set(self._key, value)

    def observe(self, value: float) -> None:
        self._metric._observe(self._key, value)


class _Scalar(_Metric):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.label_names and self._collect is None:
            self._values[()] = 0.0  # an unlabelled series exists from the start

    def labels(self, *values: Any, **kwargs: Any) -> _Child:
        if self._collect is not None:
            raise TypeError(f"{self.name} is collected at render time; it has no children")
        return _Child(self, self._key(values, kwargs))

    def _add(self, key: LabelValues, amount: float) -> None:
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def _set(self, key: LabelValues, value: float) -> None:
        with self._lock:
            self._values[key] = float(value)

    def value(self, *values: Any, **kwargs: Any) -> float:
        """The current value of one series (tests, status summaries)."""
        key = self._key(values, kwargs)
        if self._collect is not None:
            got = self._collect()
            return float(got if not isinstance(got, dict) else got.get(key, 0.0))
        with self._lock:
            return self._values.get(key, 0.0)


class Counter(_Scalar):
    """Only goes up (until the process restarts, which Prometheus' rate() handles)."""

    type_name = "counter"

    def __init__(self, name: str, *args, **kwargs):
        if not name.endswith("_total"):
            name += "_total"
        super().__init__(name, *args, **kwargs)

    def inc(self, amount: float = 1.0) -> None:
        self._add((), amount)

    def _set(self, key: LabelValues, value: float) -> None:
        raise TypeError(f"{self.name} is a counter: it only goes up, use inc()")

    def _add(self, key: LabelValues, amount: float) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: counters only go up (got {amount})")
        if self.label_names and key == ():
            raise ValueError(f"{self.name} has labels {self.label_names}; use .labels()")
        super()._add(key, amount)


class Gauge(_Scalar):
    """A value that goes up and down: queue lengths, free bytes, tasks by state."""

    type_name = "gauge"

    def _check_unlabelled(self) -> None:
        if self.label_names:
            raise ValueError(f"{self.name} has labels {self.label_names}; use .labels()")

    def set(self, value: float) -> None:
        self._check_unlabelled()
        self._set((), value)

    def inc(self, amount: float = 1.0) -> None:
        self._check_unlabelled()
        self._add((), amount)

    def dec(self, amount: float = 1.0) -> None:
        self._check_unlabelled()
        self._add((), -amount)


class Histogram(_Metric):
    """Observations counted into cumulative ``le`` buckets, with their sum and count."""

    type_name = "histogram"

    def __init__(self, name: str, help: str, labels: Sequence[str] = (),
                 buckets: Sequence[float] = DEFAULT_BUCKETS):
        super().__init__(name, help, labels)
        bounds = sorted(float(b) for b in buckets)
        if not bounds or len(set(bounds)) != len(bounds):
            raise ValueError(f"{name}: buckets must be distinct and non-empty")
        if bounds[-1] != math.inf:
            bounds.append(math.inf)
        self.buckets = tuple(bounds)
        if not self.label_names:
            self._values[()] = self._empty()

    def _empty(self) -> list[float]:
        return [0.0] * len(self.buckets) + [0.0, 0.0]  # per-bucket counts, sum, count

    def labels(self, *values: Any, **kwargs: Any) -> _Child:
        return _Child(self, self._key(values, kwargs))

    def observe(self, value: float) -> None:
        if self.label_names:
            raise ValueError(f"{self.name} has labels {self.label_names}; use .labels()")
        self._observe((), value)

    def _observe(self, key: LabelValues, value: float) -> None:
        with self._lock:
            series = self._values.get(key)
            if series is None:
                series = self._values[key] = self._empty()
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    series[i] += 1  # non-cumulative here; cumulated when rendered
                    break
            series[-2] += value
            series[-1] += 1

    def count(self, *values: Any, **kwargs: Any) -> float:
        key = self._key(values, kwargs)
        with self._lock:
            return self._values.get(key, self._empty())[-1]

    def _samples(self) -> Iterable[tuple[str, str, float]]:
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._values.items())
        for key, series in items:
            cumulative = 0.0
            for bound, n in zip(self.buckets, series):
                cumulative += n
                # "1.0", not "1": the canonical form, so le values compare as strings.
                le = ("le", "+Inf" if math.isinf(bound) else repr(bound))
                yield "_bucket", _labels_text(self.label_names, key, le), cumulative
            yield "_sum", _labels_text(self.label_names, key), series[-2]
            yield "_count", _labels_text(self.label_names, key), series[-1]


class Registry:
    """The agent's metrics. ``render()`` is the body of ``MOUNT/metrics``."""

    def __init__(self):
        self._metrics: dict[str, _Metric] = {}

    def _add(self, metric: _Metric) -> Any:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} is registered twice")
        self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help: str, *, labels: Sequence[str] = (),
                collect: Collected | None = None) -> Counter:
        return self._add(Counter(name, help, labels, collect))

    def gauge(self, name: str, help: str, *, labels: Sequence[str] = (),
              collect: Collected | None = None) -> Gauge:
        return self._add(Gauge(name, help, labels, collect))

    def histogram(self, name: str, help: str, *, labels: Sequence[str] = (),
                  buckets: Sequence[float] = DEFAULT_BUCKETS) -> Histogram:
        return self._add(Histogram(name, help, labels, buckets))

    def __getitem__(self, name: str) -> _Metric:
        return self._metrics[name]

    def render(self) -> bytes:
        return "".join(m.render() for m in self._metrics.values()).encode()
