"""Multi-host runtime: `jax.distributed.initialize` from flags or the environment.

* TPU VMs and SLURM jobs: `--distributed auto` (or JAXPROMPT_DISTRIBUTED=auto); JAX finds the coordinator,
  process count and process id itself.
* Anything else: an explicit coordinator, `--coordinator HOST:PORT --num-processes N --process-id I`
  (or JAXPROMPT_COORDINATOR / JAXPROMPT_NUM_PROCESSES / JAXPROMPT_PROCESS_ID).
CPU processes use gloo collectives. Every process runs the same command; each reads only its share of every
global batch, and only process 0 writes logs, plots and exports.
"""

from __future__ import annotations

import os

import jax

from jaxprompt.errors import UsageError


def initialize(
  mode: str | None = None,
  coordinator: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> bool:
  """Initialise multi-process JAX if asked to; returns whether it did."""
  mode = mode or os.environ.get("JAXPROMPT_DISTRIBUTED")
  coordinator = coordinator or os.environ.get("JAXPROMPT_COORDINATOR")
  if num_processes is None and os.environ.get("JAXPROMPT_NUM_PROCESSES"):
    num_processes = int(os.environ["JAXPROMPT_NUM_PROCESSES"])
  if process_id is None and os.environ.get("JAXPROMPT_PROCESS_ID"):
    process_id = int(os.environ["JAXPROMPT_PROCESS_ID"])
  if coordinator:
    if num_processes is None or process_id is None:
      raise UsageError("--coordinator needs --num-processes and --process-id (or their JAXPROMPT_* variables)")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    return True
  if mode == "auto":
    jax.distributed.initialize()
    return True
  if mode not in (None, "", "none", "off"):
    raise UsageError(f"--distributed must be 'auto' or 'none', got {mode!r}")
  return False
