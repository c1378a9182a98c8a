"""Serving metrics the stages export on Triton's metrics port (Prometheus text, beside Triton's own
`nv_inference_*`, which cannot time a decoupled model's tokens).

Stages count into `Deltas`; the Triton model hands them to `TritonMetrics`. Every update of a Triton
metric is an IPC round trip from the stub to the server, so nothing is updated per token: decode's
worker sends its deltas about once a second and when it goes idle, prefill once per execute."""

from __future__ import annotations

import threading
from collections import defaultdict

# name: (kind, help[, buckets]). Counters take deltas, gauges the current value, histograms lists of
# observations.
DECODE = {
    "baton:decode_steps_total": ("counter", "Decode engine steps."),
    "baton:decode_step_seconds_total": ("counter", "Seconds inside decode engine steps (mean step time: "
                                                   "rate of this over rate of baton:decode_steps_total)."),
    "baton:generation_tokens_total": ("counter", "Generated tokens, the first one (sampled by prefill) included."),
    "baton:decode_preemptions_total": ("counter", "Requests preempted for want of KV blocks (their KV freed, "
                                                  "recomputed when readmitted)."),
    "baton:decode_running_requests": ("gauge", "Requests in the decode batch."),
    "baton:num_requests_waiting": ("gauge", "Requests at decode not yet stepping (waiting for blocks or their KV)."),
    "baton:kv_blocks_used": ("gauge", "KV blocks of the node's pool in use, as decode last heard from the KV manager."),
    "baton:kv_blocks_free": ("gauge", "KV blocks of the node's pool free, as decode last heard from the KV manager."),
    "baton:spec_drafts_total": ("counter", "Speculative decoding: target steps of a request that verified drafts."),
    "baton:spec_draft_tokens_total": ("counter", "Speculative draft tokens verified by the target."),
    "baton:spec_accepted_tokens_total": ("counter", "Draft tokens accepted (acceptance rate: the rate of this "
                                                    "over the rate of baton:spec_draft_tokens_total)."),
    "baton:kv_transfer_blocks_read_total": ("counter", "PD: KV blocks read from prefill nodes."),
    "baton:kv_transfer_blocks_reused_total": ("counter", "PD: KV blocks a handle named that this node already "
                                                          "cached (not read)."),
    "baton:kv_transfer_bytes_total": ("counter", "PD: bytes read from prefill nodes."),
    "baton:kv_transfer_seconds_total": ("counter", "PD: seconds spent reading and acknowledging KV blocks."),
    "baton:kv_transfer_failures_total": ("counter", "PD: transfers that failed; the prompt was recomputed here."),
    # one series per draft position (position="1" is the first draft token after the verified ones)
    "baton:spec_accepted_tokens_per_position_total": ("counter", "Draft tokens accepted at each draft position "
                                                                 "(label position)."),
    "baton:spec_draft_tokens_per_position_total": ("counter", "Draft tokens verified at each draft position "
                                                              "(label position)."),
    # KV tiers (kv/tiers.py), one series per tier: tier="device" (the pool), "host", "store", "disk"
    "baton:kv_tier_lookups_total": ("counter", "KV tiers: blocks looked up (device: at admission; a lower tier: "
                                               "the ones the tiers above did not have)."),
    "baton:kv_tier_hits_total": ("counter", "KV tiers: blocks found (device) or loaded into the pool (lower tiers)."),
    "baton:kv_tier_bytes_read_total": ("counter", "KV tiers: bytes loaded from the tier into the pool."),
    "baton:kv_tier_bytes_written_total": ("counter", "KV tiers: bytes written to the tier."),
    "baton:kv_tier_puts_total": ("counter", "KV tiers: blocks written to the tier."),
    "baton:kv_tier_failures_total": ("counter", "KV tiers: failed reads and writes (a failed read: the request "
                                                "computed the rest of its prompt)."),
    "baton:kv_tier_used_bytes": ("gauge", "KV tiers: bytes the tier holds."),
}
# families whose every series has its own label (tier=...): created as they are first updated
LABELLED = {n for n in DECODE if n.startswith("baton:kv_tier_") or n.endswith("_per_position_total")}
DRAFT = {
    "baton:draft_calls_total": ("counter", "Draft stage: calls (one per decode step that drafted)."),
    "baton:draft_tokens_total": ("counter", "Draft stage: draft tokens proposed."),
    "baton:draft_kv_blocks_used": ("gauge", "Draft stage: blocks of the draft model's own KV pool in use."),
}
ENCODE = {
    "baton:encode_images_total": ("counter", "Images that reached the encode stage."),
    "baton:encode_cache_hits_total": ("counter", "Of those, images whose embeddings the node's embedding cache "
                                                 "already held (not encoded again)."),
    "baton:encode_seconds_total": ("counter", "Seconds the encode stage spent on its batches."),
}
PREFILL = {
    "baton:prefill_requests_total": ("counter", "Requests prefilled."),
    "baton:prompt_tokens_total": ("counter", "Prompt tokens, computed or served from the prefix cache."),
    "baton:cached_prompt_tokens_total": ("counter", "Prompt tokens served from the prefix cache."),
    "baton:prefill_seconds_total": ("counter", "Seconds prefill spent running its batches."),
}


# The llm front's per-request histograms (seconds, tokens), in vLLM's style; observed once per request
# when it ends, so they cost a few IPC calls per request, none per token.
_SECONDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]
_TOKENS = [1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
FRONT = {
    "baton:time_to_first_token_seconds": ("histogram", "From the request's arrival at the front to its first token.",
                                          _SECONDS),
    "baton:time_per_output_token_seconds": ("histogram", "(last - first response) / the tokens after the first, "
                                            "per request.", [0.001, 0.0025] + _SECONDS[:12]),
    "baton:e2e_request_latency_seconds": ("histogram", "From arrival to the last response.", _SECONDS),
    "baton:request_prompt_tokens": ("histogram", "Prompt tokens per request.", _TOKENS),
    "baton:request_generation_tokens": ("histogram", "Generated tokens per request.", _TOKENS),
    "baton:inter_token_latency_seconds": ("histogram", "Per streamed response after the first: the gap since "
                                          "the previous one over the tokens it carries (at most 256 evenly spaced "
                                          "per request).", [0.001, 0.0025] + _SECONDS[:12]),
    "baton:request_queue_time_seconds": ("histogram", "From arrival to prefill starting on the request (tokenizing "
                                         "and waiting in prefill's queue).", _SECONDS),
    # fronts that find nodes in the name service: pd_router, epd_llm without --encode-address
    "baton:name_service_errors_total": ("counter", "Polls of the name service that failed (routing went on "
                                                    "with the last membership it saw)."),
    "baton:name_service_up": ("gauge", "1 while the name service answers, 0 while it does not."),
    "baton:route_retries_total": ("counter", "Calls retried on another node (PD: prefill or decode; EPD: "
                                             "encode) after a node failed."),
}


ITL_SAMPLES = 256                    # inter-token latencies observed per request at most


class RequestTimer:
    """One request's timings through the front: fed each response's token count, it gives the
    FRONT histograms' observations when the request ends (nothing for a request that streamed none)."""

    def __init__(self, now: float) -> None:
        self.t0, self.first, self.last = now, None, now
        self.first_tokens = self.tokens = self.prompt_tokens = 0
        self.itl: list[float] = []
        self.queue: float | None = None

    def prefilled(self, now: float, prefill_seconds: float) -> None:
        """Prefill answered at `now` after computing for `prefill_seconds`: the rest was waiting."""
        self.queue = max(0.0, now - self.t0 - prefill_seconds)

    def response(self, n_tokens: int, prompt_tokens: int, now: float) -> None:
        if self.first is None:
            self.first, self.first_tokens = now, n_tokens
        elif n_tokens:
            self.itl.append((now - self.last) / n_tokens)
        self.last, self.tokens, self.prompt_tokens = now, self.tokens + n_tokens, prompt_tokens

    def observations(self) -> dict[str, list[float]]:
        if self.first is None:
            return {}
        out = {"baton:time_to_first_token_seconds": [self.first - self.t0],
               "baton:e2e_request_latency_seconds": [self.last - self.t0],
               "baton:request_prompt_tokens": [self.prompt_tokens],
               "baton:request_generation_tokens": [self.tokens]}
        if self.tokens > self.first_tokens:
            out["baton:time_per_output_token_seconds"] = [(self.last - self.first) / (self.tokens - self.first_tokens)]
        if self.itl:                 # each observation is an IPC call: a long stream gives an even sample
            step = -(-len(self.itl) // ITL_SAMPLES)
            out["baton:inter_token_latency_seconds"] = self.itl[::step]
        if self.queue is not None:
            out["baton:request_queue_time_seconds"] = [self.queue]
        return out


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
    """The metric families of one spec, created through the stub's `triton_python_backend_utils`.
    Updates are serialised: Triton 2.51's stub crashes (SIGSEGV, then boost lock_exception in the
    server) when two threads update metrics at once, as the llm front's request threads would."""

    def __init__(self, pb_utils, spec: dict[str, tuple], labels: dict[str, str]) -> None:  # noqa: ANN001
        kinds = {"counter": pb_utils.MetricFamily.COUNTER, "gauge": pb_utils.MetricFamily.GAUGE,
                 "histogram": pb_utils.MetricFamily.HISTOGRAM}
        self._families = {n: pb_utils.MetricFamily(name=n, description=d[1], kind=kinds[d[0]]) for n, d in spec.items()}
        self._spec, self._labels = spec, labels
        self._metrics = {n: (spec[n][0], f.Metric(labels=labels, buckets=spec[n][2]) if spec[n][0] == "histogram"
                             else f.Metric(labels=labels)) for n, f in self._families.items() if n not in LABELLED}
        self._lock = threading.Lock()

    def update(self, values: dict) -> None:
        with self._lock:
            self._update(values)

    def _update(self, values: dict) -> None:
        for name, v in values.items():
            if name not in self._metrics:          # "family|label=value": another series of the family
                family, _, label = name.partition("|")
                key, _, value = label.partition("=")
                self._metrics[name] = (self._spec[family][0],
                                       self._families[family].Metric(labels=self._labels | {key: value}))
            kind, metric = self._metrics[name]
            if kind == "gauge":
                metric.set(v)
            elif kind == "histogram":
                for x in v:
                    metric.observe(x)
            elif v:
                metric.increment(v)

    def close(self) -> None:
        self._metrics.clear()        # Triton wants the metrics gone before their families
        self._families.clear()
