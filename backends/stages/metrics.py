"""Serving metrics the stages export on Triton's metrics port (Prometheus text, beside Triton's own
`nv_inference_*`, which cannot time a decoupled model's tokens).

Stages count into `Deltas`; the Triton model hands them to `TritonMetrics`. Every update of a Triton
metric is an IPC round trip from the stub to the server, so nothing is updated per token: decode's
worker sends its deltas about once a second and when it goes idle, prefill once per execute."""

from __future__ import annotations

from collections import defaultdict

# name: (kind, help). Counters take deltas, gauges the current value.
DECODE = {
    "baton_decode_steps_total": ("counter", "Decode engine steps."),
    "baton_decode_step_seconds_total": ("counter", "Seconds inside decode engine steps (mean step time: "
                                                   "rate of this over rate of baton_decode_steps_total)."),
    "baton_generation_tokens_total": ("counter", "Generated tokens, the first one (sampled by prefill) included."),
    "baton_decode_running_requests": ("gauge", "Requests in the decode batch."),
    "baton_spec_draft_tokens_total": ("counter", "Speculative draft tokens verified by the target."),
    "baton_spec_accepted_tokens_total": ("counter", "Draft tokens accepted (acceptance rate: the rate of this "
                                                    "over the rate of baton_spec_draft_tokens_total)."),
}
PREFILL = {
    "baton_prefill_requests_total": ("counter", "Requests prefilled."),
    "baton_prompt_tokens_total": ("counter", "Prompt tokens, computed or served from the prefix cache."),
    "baton_cached_prompt_tokens_total": ("counter", "Prompt tokens served from the prefix cache."),
    "baton_prefill_seconds_total": ("counter", "Seconds prefill spent running its batches."),
}


class Deltas:
    """Counter increments since the last take()."""

    def __init__(self) -> None:
        self._values: dict[str, float] = defaultdict(float)

    def add(self, name: str, value: float) -> None:
        self._values[name] += value

    def take(self) -> dict[str, float]:
        out, self._values = dict(self._values), defaultdict(float)
        return out


class TritonMetrics:
    """The metric families of one spec, created through the stub's `triton_python_backend_utils`."""

    def __init__(self, pb_utils, spec: dict[str, tuple[str, str]], labels: dict[str, str]) -> None:  # noqa: ANN001
        kinds = {"counter": pb_utils.MetricFamily.COUNTER, "gauge": pb_utils.MetricFamily.GAUGE}
        self._families = {n: pb_utils.MetricFamily(name=n, description=h, kind=kinds[k]) for n, (k, h) in spec.items()}
        self._metrics = {n: (spec[n][0], f.Metric(labels=labels)) for n, f in self._families.items()}

    def update(self, values: dict[str, float]) -> None:
        for name, v in values.items():
            kind, metric = self._metrics[name]
            if kind == "gauge":
                metric.set(v)
            elif v:
                metric.increment(v)

    def close(self) -> None:
        self._metrics.clear()        # Triton wants the metrics gone before their families
        self._families.clear()
