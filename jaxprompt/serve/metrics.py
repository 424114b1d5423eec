"""The server's Prometheus metrics (one registry per server, so tests and several servers in a process do not mix)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class Metrics:
  def __init__(self):
    r = self.registry = CollectorRegistry()
    self.requests = Counter(
      "jaxprompt_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
    )
    self.latency = Histogram(
      "jaxprompt_request_latency_seconds",
      "HTTP request latency",
      ["endpoint"],
      registry=r,
      buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    )
    self.batch_size = Histogram(
      "jaxprompt_batch_size", "requests per model call", registry=r, buckets=(1, 2, 4, 8, 16, 32, 64, 128)
    )
    self.batches = Counter("jaxprompt_batches", "model calls (batches)", registry=r)
    self.queue_depth = Gauge("jaxprompt_queue_depth", "requests waiting for a batch", registry=r)
    self.generated_tokens = Counter("jaxprompt_generated_tokens", "completion tokens generated", registry=r)
    self.tokens_per_second = Gauge(
      "jaxprompt_tokens_per_second", "completion tokens per second of the last batch", registry=r
    )
    self.prompts = Gauge("jaxprompt_prompts", "prompts served", registry=r)
    seconds = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
    self.time_to_first_token = Histogram(
      "jaxprompt_time_to_first_token_seconds",
      "from a request's arrival to its first token",
      registry=r,
      buckets=seconds,
    )
    self.inter_token_latency = Histogram(
      "jaxprompt_inter_token_latency_seconds", "between a request's consecutive tokens", registry=r, buckets=seconds
    )
    self.slots = Gauge("jaxprompt_slots", "decode slots (continuous scheduler)", registry=r)
    self.slots_busy = Gauge("jaxprompt_slots_busy", "decode slots holding a request", registry=r)
    self.step_slots = Histogram(
      "jaxprompt_step_busy_slots",
      "busy decode slots per generate step (slot occupancy)",
      registry=r,
      buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
    )
    self.steps_per_call = Histogram(
      "jaxprompt_decode_steps_per_call",
      "decode steps run by one device call (continuous scheduler: several while every slot is busy)",
      registry=r,
      buckets=(1, 2, 4, 8, 16, 32, 64),
    )

  def watch_prompts(self, stats: Callable) -> None:
    """Report the prompt tiers (`PromptStore.stats`: host prompts, device cache hits / misses / evictions / bytes)
    whenever the metrics are read."""
    self.registry.register(_PromptTiers(stats))

  def render(self) -> bytes:
    return generate_latest(self.registry)


class _PromptTiers:
  """A collector reading `PromptStore.stats()` at each scrape."""

  def __init__(self, stats: Callable):
    self.stats = stats

  def collect(self):
    s = self.stats()
    c = s.cache
    for name, doc, value in (
      ("hits", "admitted batches' prompts found in the device cache", c.hits),
      ("misses", "admitted batches' prompts copied from the host to the device", c.misses),
      ("evictions", "prompts evicted from the device cache (least recently used)", c.evictions),
    ):
      yield CounterMetricFamily(f"jaxprompt_prompt_cache_{name}", doc, value=value)
    limit = c.limit_bytes if c.limit_bytes is not None else float("inf")
    for name, doc, value in (
      ("jaxprompt_prompt_cache_bytes", "bytes of prompts in the device cache", c.device_bytes),
      ("jaxprompt_prompt_cache_peak_bytes", "the most bytes the device cache has held at once", c.peak_bytes),
      ("jaxprompt_prompt_cache_limit_bytes", "the device cache's limit (--prompt-cache-mb; +Inf: none)", limit),
      ("jaxprompt_prompt_cache_prompts", "prompts in the device cache", c.device_prompts),
      ("jaxprompt_prompts_host", "prompts on the host (every served prompt's precomputed form)", s.host_prompts),
      ("jaxprompt_prompts_host_bytes", "bytes of the prompts on the host", s.host_bytes),
    ):
      yield GaugeMetricFamily(name, doc, value=value)
