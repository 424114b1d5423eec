"""FLOP counts of jitted steps. XLA's cost analysis counts a `lax.scan` body once, not once per layer, so the
count comes from a trace with the layer scan unrolled (lowered only, never compiled)."""

from __future__ import annotations

from typing import Any, Callable

import jax

from jaxprompt.models.layers import unrolled_layers


def flops(fn: Callable, *args: Any, **jit_kwargs) -> float:
  """Total FLOPs of one call of `fn(*args)` (args may be ShapeDtypeStructs), summed over devices' programs."""
  with unrolled_layers():
    # a fresh wrapper: jit's trace cache must not hand back a trace made with the rolled-up scan
    lowered = jax.jit(lambda *a: fn(*a), **jit_kwargs).lower(*args)
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", 0.0))
