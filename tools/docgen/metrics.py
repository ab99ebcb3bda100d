"""docs/reference/metrics.md: every metric of the gateway's Prometheus registry (gateway/ops/metrics.py) and
of the collectors registered on it (gateway/ops/queuestats.py), as /metrics exposes them."""

from __future__ import annotations

import math
from dataclasses import dataclass

from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from tools.docgen.gateway_modules import import_all
from tools.docgen.markdown import anchor, code, sentence, table
from tools.docgen.notes import Notes

TITLE = "Metrics"
# The series each type exposes besides its name, as /metrics shows them.
SERIES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


@dataclass(frozen=True)
class MetricDoc:
    name: str  # without the type's suffixes
    type: str
    labels: tuple[str, ...]
    help: str
    buckets: tuple[float, ...] = ()

    @property
    def exposed(self) -> str:
        """The name a query uses (a counter's with `_total`): the row's anchor and its note's name."""
        return self.series[0] if self.type == "counter" else self.name

    @property
    def series(self) -> list[str]:
        return [self.name + suffix for suffix in SERIES.get(self.type, ("",))]


def _registered() -> list[Collector]:
    from gateway.ops.metrics import REGISTRY

    # The registry keeps its collectors in a private mapping; prometheus_client has no public way to list them.
    return list(REGISTRY._collector_to_names)


def collect() -> list[MetricDoc]:
    """Every metric of the registry, sorted by name. Only what gateway modules define and register (a test
    run may register more)."""
    import_all()  # every module, so every collector is registered
    found: list[MetricDoc] = []
    for collector in _registered():
        if isinstance(collector, MetricWrapperBase):
            # The wrapper's name, type, labels and help are attributes its constructor keeps.
            found.append(
                MetricDoc(
                    collector._name,
                    str(collector._type),
                    tuple(collector._labelnames),
                    collector._documentation,
                    tuple(getattr(collector, "_upper_bounds", ())),
                )
            )
        elif type(collector).__module__.startswith("gateway."):
            for family in collector.collect():
                found.append(
                    MetricDoc(
                        family.name,
                        family.type,
                        tuple(getattr(family, "_labelnames", ())),
                        family.documentation,
                    )
                )
    return sorted((m for m in found if m.name.startswith("smtp_gateway_")), key=lambda m: m.name)


def _bound(value: float) -> str:
    return "+Inf" if math.isinf(value) else f"{value:g}"


def render(notes: Notes) -> str:
    out = [f"# {TITLE}\n"]
    if notes.intro:
        out.append(notes.intro + "\n")
    rows = []
    for metric in collect():
        series = ", ".join(code(s) for s in metric.series)
        text = [sentence(metric.help)]
        if metric.buckets:
            text.append(f"Buckets: {', '.join(_bound(b) for b in metric.buckets)}.")
        text.append(notes.item(metric.exposed))
        rows.append(
            (
                anchor(metric.exposed) + series,
                metric.type,
                ", ".join(code(label) for label in metric.labels) or "(none)",
                " ".join(t for t in text if t),
            )
        )
    out.append(table(["metric", "type", "labels", "help"], rows))
    notes.check_used()
    return "\n".join(out)
