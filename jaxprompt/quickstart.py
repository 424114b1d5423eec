"""The built-in quickstart: a tiny T5 that jaxprompt pre-trains itself, and its built-in digit tasks.

No weights can be downloaded offline, so the quickstart's frozen base model comes from the library:
a T5 v1.1-style model (gated-GELU, untied head, byte-level ByT5 vocabulary) pre-trained for about a
minute on a multi-task text-to-text mixture whose inputs carry a task prefix:

    "max: 3 7 1 8 2" -> "8"     "min: ..." -> "1"     "first: ..." -> "3"     "last: ..." -> "2"

It is cached as an ordinary HF folder (config.json + model.safetensors + tokenizer) in the user's cache
directory and reused. The quickstart then freezes it and trains a soft prompt on the `max` task
*without* its prefix (the paper's "taskless" setting): the input alone does not say which task is
wanted, so the prompt has to learn it.

Importing this module registers the model source "builtin:quickstart" (`models.loading.register_source`)
and the tasks "quickstart:max|min|first|last" ("quickstart" = "quickstart:max"; `data.tasks.register`), so the
loaders and the data layer never import it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxprompt.batches import Seq2SeqBatch
from jaxprompt.data import encoding
from jaxprompt.data import tasks as TK
from jaxprompt.data.pipeline import BatchStream
from jaxprompt.errors import DataError
from jaxprompt.models.loading import ModelSource, register_source, save_pretrained
from jaxprompt.models.t5 import T5, T5Config, shift_right

log = logging.getLogger(__name__)

TASKS = ("max", "min", "first", "last")
NUM_DIGITS = 5
LABELS = tuple(str(i) for i in range(10))

MODEL_CONFIG = T5Config(
  vocab_size=384,
  d_model=64,
  d_kv=16,
  d_ff=128,
  num_layers=2,
  num_decoder_layers=2,
  num_heads=4,
  relative_attention_num_buckets=32,
  relative_attention_max_distance=64,
  dropout_rate=0.1,
  feed_forward_proj="gated-gelu",
  tie_word_embeddings=False,
  scale_decoder_outputs=False,
  decoder_start_token_id=0,
  pad_token_id=0,
  eos_token_id=1,
)
PRETRAIN = dict(steps=1500, batch_size=64, learning_rate=3e-3, warmup=50, seed=0, input_length=20, target_length=4)
RECIPE_VERSION = 1


BUILTIN_MODEL = "builtin:quickstart"
SPLITS = {"train": (2000, 1), "validation": (500, 2), "test": (500, 3)}  # examples, seed (disjoint)


def _answer(task: str, digits: list[int]) -> int:
  return {"max": max, "min": min, "first": lambda d: d[0], "last": lambda d: d[-1]}[task](digits)


def digit_rows(n: int, seed: int) -> list[dict]:
  rng = np.random.default_rng(seed)
  return [{"digits": [int(x) for x in rng.integers(0, 10, NUM_DIGITS)]} for _ in range(n)]


def _format(row, split: str, *, task: str) -> list[dict]:
  d = row["digits"]
  if isinstance(d, str):  # a served request's text: "3 7 1 8 2" (anything else: as it is, with no answer)
    if not d.split() or not all(x.isdigit() for x in d.split()):
      return [{"inputs": f"{task}: {d}", "targets": "", "fields": {"digits": d}}]
    d = [int(x) for x in d.split()]
  digits = " ".join(map(str, d))
  return [{"inputs": f"{task}: " + digits, "targets": str(_answer(task, d)), "fields": {"digits": digits}}]


def _split_rows(split: str) -> list[dict]:
  if split not in SPLITS:
    raise DataError(f"quickstart tasks have splits {sorted(SPLITS)}, not {split!r}")
  n, seed = SPLITS[split]
  return digit_rows(n, seed + 100)


def task(name: str) -> TK.Task:
  """One prefixed digit task ("max: 3 7 1 8 2" -> "8"); its taskless variant drops the "max:" prefix."""
  # digits 0-9 are far from balanced for min/max: accuracy only
  return TK.Task(
    f"quickstart:{name}",
    functools.partial(_format, task=name),
    LABELS,
    ("accuracy",),
    splits=tuple(SPLITS),
    generate_rows=_split_rows,
    fields=("digits",),
    input_fields=("digits",),
  )


def examples(task_name: str, n: int, seed: int, *, prefix: bool) -> list[dict]:
  """`n` examples of one digit task; `prefix=False` drops the task name (the taskless variant)."""
  t = task(task_name)
  t = t if prefix else dataclasses.replace(t, taskless=True)
  return [ex for row in digit_rows(n, seed) for ex in t.examples(row, "train")]


def tokenizer():
  from transformers import ByT5Tokenizer

  return ByT5Tokenizer()


def cache_dir() -> Path:
  root = os.environ.get("JAXPROMPT_CACHE") or os.path.join(
    os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "jaxprompt"
  )
  recipe = json.dumps([RECIPE_VERSION, MODEL_CONFIG.to_hf(), PRETRAIN, TASKS, NUM_DIGITS], sort_keys=True)
  return Path(root) / f"quickstart-t5-{hashlib.sha256(recipe.encode()).hexdigest()[:10]}"


def ensure_base_model(progress: bool = True) -> Path:
  """The cached pre-trained quickstart model folder; pre-trains it (about a minute) on first use. Processes that
  start together (several local runs, parallel test workers) pre-train it once: the others wait for it."""
  target = cache_dir()

  def done():
    return (target / "config.json").exists() and (target / "model.safetensors").exists()

  if done():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  with _exclusive(target.with_name(f".{target.name}.lock")):
    if not done():  # nobody finished it while we waited
      model = pretrain(progress=progress)
      with contextlib.suppress(FileExistsError):  # a process without the lock (another platform) finished first
        save_pretrained(model, target, tokenizer=tokenizer())
  return target


@contextlib.contextmanager
def _exclusive(lock_file: Path):
  """An exclusive lock on `lock_file` while the block runs (POSIX advisory locks; elsewhere no lock: a race then
  only pre-trains twice, the folder is written atomically)."""
  try:
    import fcntl
  except ImportError:
    yield
    return
  with open(lock_file, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _mixture(n: int, seed: int) -> list[dict]:
  rng = np.random.default_rng(seed)
  out = []
  for i, k in enumerate(rng.choice(len(TASKS), n)):
    out += examples(TASKS[k], 1, seed * 1_000_003 + i, prefix=True)
  return out


def pretrain(progress: bool = True) -> T5:
  """Full-parameter pre-training of the quickstart model on the prefixed multi-task mixture."""
  from tqdm.auto import tqdm

  p = PRETRAIN
  tok = tokenizer()
  data = encoding.encode(
    Seq2SeqBatch,
    _mixture(20000, p["seed"]),
    tok,
    input_length=p["input_length"],
    target_length=p["target_length"],
    name="quickstart mixture",
  )
  stream = BatchStream(data, p["batch_size"], seed=p["seed"])
  model = T5(MODEL_CONFIG, rngs=nnx.Rngs(p["seed"]))
  graphdef, params = nnx.split(model)
  lr = optax.warmup_cosine_decay_schedule(0.0, p["learning_rate"], p["warmup"], p["steps"], p["learning_rate"] * 0.1)
  tx = optax.adamw(lr, weight_decay=0.01)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, batch):
    def loss_fn(params):
      m = nnx.merge(graphdef, params)
      logits = m(batch.input_ids, batch.input_mask, shift_right(batch.target_ids, 0))
      mask = batch.target_mask
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch.target_ids)
      return jnp.sum(ce * mask) / jnp.sum(mask)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  start = time.time()
  bar = tqdm(range(p["steps"]), desc="pre-training the quickstart base model", disable=not progress, dynamic_ncols=True)
  loss = None
  for i in bar:
    params, opt_state, loss = step(params, opt_state, next(stream))
    if i % 50 == 0 or i == p["steps"] - 1:
      bar.set_postfix(loss=f"{float(loss):.3f}")
  log.info("quickstart base model pre-trained in %.0f s (final loss %.3f)", time.time() - start, float(loss))
  return nnx.merge(graphdef, params)


register_source(BUILTIN_MODEL, ModelSource(folder=ensure_base_model, hf_config=MODEL_CONFIG.to_hf))
for _name in TASKS:
  TK.register(task(_name))
TK.register_alias("quickstart", "quickstart:max")
