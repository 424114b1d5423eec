"""Test helpers (not a test module): run configs, meshes, the CLI and tiny byte-vocabulary models that several test
modules share. Shared fixtures live in conftest.py; tiny transformers reference models in helpers_hf.py."""

import contextlib
import os
from pathlib import Path

import jax

from jaxprompt import cli
from jaxprompt import config as C
from jaxprompt import sharding as shd
from jaxprompt.training.step import make_train_step
from jaxprompt.training.trainer import train
from tests.helpers_hf import write_decoder

# Inputs of real lengths 0..7 (of a limit of 32) for length-bucket and packing tests.
BUCKET_EXAMPLES = [
  {"inputs": " ".join(str(3 + (i * 7 + j) % 80) for j in range(n)), "targets": f"{10 + i} {20 + i}"}
  for i, n in enumerate([5, 1, 0, 7, 3, 2, 6, 4])
]


@contextlib.contextmanager
def fully_optimized():
  """XLA's full optimization for the programs compiled inside (and the processes started inside): trainings of many
  steps, which the suite's default (`JAX_DISABLE_MOST_OPTIMIZATIONS`, tests/conftest.py: compile-bound tiny
  programs) would slow down."""
  before = (jax.config.read("jax_disable_most_optimizations"), os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS"))
  jax.config.update("jax_disable_most_optimizations", False)
  os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "0"
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", before[0])
    if before[1] is None:
      os.environ.pop("JAX_DISABLE_MOST_OPTIMIZATIONS", None)
    else:
      os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = before[1]


def _with_overrides(raw: dict, over: dict) -> dict:
  for k, v in over.items():
    sec, key = k.split(".")
    raw.setdefault(sec, {})[key] = v
  return raw


def small_cfg(folder, **over) -> C.Config:
  """A tiny T5 run: the taskless quickstart digit task, 6 steps, logs every 2, no eval; `section.key` overrides."""
  raw = {
    "model": {"path": str(folder)},
    "prompt": {"length": 4, "init": "sampled_vocab", "vocab_sample_size": 300},
    "data": {"task": "quickstart", "taskless": True, "input_length": 12, "target_length": 3},
    "optimizer": {"name": "adafactor", "learning_rate": 0.3},
    "train": {"steps": 6, "batch_size": 8, "log_every": 2, "plot": False},
    "eval": {"every": 0, "at_end": False, "max_examples": 16, "batch_size": 8},
    "checkpoint": {"every": 3, "keep": 5, "async_save": False},
  }
  return C.from_dict(_with_overrides(raw, over))


def tiny_cfg(folder, **over) -> C.Config:
  """A tiny run on any base folder: the taskless quickstart digit task, 6 steps, no eval; `section.key` overrides."""
  raw = {
    "model": {"path": str(folder)},
    "prompt": {"length": 4, "init": "sampled_vocab", "vocab_sample_size": 300},
    "data": {"task": "quickstart", "taskless": True, "input_length": 12, "target_length": 3},
    "optimizer": {"name": "adafactor", "learning_rate": 0.3},
    "train": {"steps": 6, "batch_size": 8, "log_every": 3, "plot": False},
    "eval": {"every": 0, "at_end": False, "max_examples": 16, "batch_size": 8},
    "checkpoint": {"every": 3, "keep": 5, "async_save": False},
  }
  return C.from_dict(_with_overrides(raw, over))


def write_config(folder, path: Path, steps: int, **extra) -> Path:
  """A validated YAML config for a CLI training process on `folder` (async checkpoints every 5 steps)."""
  raw = {
    "model": {"path": str(folder), "dropout": 0.1},
    "prompt": {"length": 4, "init": "sampled_vocab", "vocab_sample_size": 300},
    "data": {"task": "quickstart", "taskless": True, "input_length": 12, "target_length": 3},
    "train": {"steps": steps, "batch_size": 8, "log_every": 5, "plot": False},
    "eval": {"every": 0, "at_end": False},
    "checkpoint": {"every": 5, "keep": 2, "async_save": True},
    "mesh": {"data": 1},
  }
  C.from_dict(_with_overrides(raw, extra))  # validate
  import yaml

  path.write_text(yaml.safe_dump(raw))
  return path


def train_interrupted(full, killed, root, mesh):
  """`full` trained in root/full without a stop; in root/split first `killed` (the same run "killed" at its
  train.steps), then `full` again, which resumes from the checkpoint and runs to the end."""
  train(full, root / "full", progress=False, mesh=mesh)
  train(killed, root / "split", progress=False, mesh=mesh)
  train(full, root / "split", progress=False, mesh=mesh)


def one_device():
  return shd.make_mesh(devices=jax.devices()[:1])


def jit_train_step(run, tx, **kw):
  """`run`'s train step jitted with the trainer's shardings (outputs placed as the inputs, so later steps reuse the
  first step's program instead of compiling a second one) and a fresh optimizer state placed to match."""
  rep = shd.replicated(run.mesh)
  opt = jax.jit(tx.init, out_shardings=rep)(run.prompt)
  p_sh, o_sh = run.prompt_shardings(), jax.tree.map(lambda _: rep, opt)
  step = jax.jit(
    make_train_step(run.graphdef, tx, **kw),
    in_shardings=(p_sh, o_sh, run.frozen_shardings(), None, None),
    out_shardings=(p_sh, o_sh, rep),
  )
  return step, opt


def run_cli(capsys, *argv) -> list[str]:
  capsys.readouterr()
  assert cli.main(list(map(str, argv))) == 0
  return capsys.readouterr().out.splitlines()


def write_byte_decoder(folder, variant: str, seed: int = 0, **over):
  """A tiny random decoder over ByT5's byte vocabulary (pad 0, EOS 1; no BOS), with that tokenizer saved beside
  it, so the quickstart digit tasks and free text run on it."""
  from transformers import ByT5Tokenizer

  kw = dict(vocab_size=384, pad_token_id=0, eos_token_id=1, bos_token_id=None)
  kw.update(over)
  folder = write_decoder(folder, variant, seed=seed, **kw)
  ByT5Tokenizer().save_pretrained(folder)
  return folder
