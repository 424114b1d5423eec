"""`jaxprompt bench --data FILE --task TASK`: prompt tuning on real rows, the paper's recipe shape (prompt 100,
batch 32, inputs up to 512 tokens, targets 8) on a preset model, against PyTorch + PEFT in the same process.

Both sides get the same batches in the same order. jaxprompt packs a seq2seq model's examples several to a row
(`data.pack`, each with its prompt; `pack=False`: each batch padded to its length bucket, `data.length_buckets`)
and, for a causal model, pads each batch to its length bucket and runs the shared soft prompt once per batch; PEFT
gets what a
careful PyTorch user gets from `DataCollatorWithPadding`: each batch padded to its own longest row. Reported:
examples/s and real (non-pad) tokens/s — the input and target tokens of the examples, no prompt, no padding.

`evaluate=True` also times rank classification (the eval loss and every label's score) on the same batches:
jaxprompt's one pass (`eval_scores`: T5 encodes once; a causal model runs the input once, then the target and each
label from its cache) against PEFT scoring every (example, label) pair as its own sequence, as lm-eval-harness
does, plus its loss pass.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprompt import config as C
from jaxprompt.data import encoding
from jaxprompt.data.pipeline import BatchStream, Packing, bucket_lengths
from jaxprompt.data.sources import load_split
from jaxprompt.data.tasks import get_task
from jaxprompt.errors import UsageError
from jaxprompt.evaluation.evaluator import make_eval_fns
from jaxprompt.models.loading import load_tokenizer
from jaxprompt.prompts import PromptedModel, PromptParam, SoftPrompt
from jaxprompt.tools import bench as BN
from jaxprompt.training.step import make_packing

RECIPE = dict(batch_size=32, input_length=512, target_length=8, prompt_length=100)  # Lester et al. (2021)


def _real_tokens(batch) -> int:
  return int(batch.input_lengths().sum() + np.asarray(batch.loss_mask).sum())


def _longest_row(inputs: dict) -> dict:
  """Trim the columns every row pads (per-batch dynamic padding, as `DataCollatorWithPadding` pads)."""
  out = dict(inputs)
  keep = int(np.flatnonzero(inputs["attention_mask"].any(axis=0)).max()) + 1
  for k in ("input_ids", "attention_mask"):
    out[k] = inputs[k][:, :keep]
  if inputs["labels"].shape[1] == inputs["input_ids"].shape[1]:  # causal: labels align with the tokens
    out["labels"] = inputs["labels"][:, :keep]
  else:  # seq2seq: labels padded to the longest target
    out["labels"] = inputs["labels"][:, : int(np.flatnonzero((inputs["labels"] != -100).any(axis=0)).max()) + 1]
  return out


def _packing(preset: BN.Preset, base) -> Packing:
  """What `data.pack` does with the preset's shapes and the default `train.microbatches` on one device."""
  return make_packing(
    preset.prompt_length, base.config.decoder_start_token_id, microbatches=C.TrainConfig().microbatches
  )


def _batches(preset: BN.Preset, base, data_file, task: str, tokenizer, steps: int, buckets, group: int, pack: bool):
  examples = load_split(task, "train", files={"train": data_file})
  tok = load_tokenizer(tokenizer)
  if len(tok) > base.config.vocab_size:
    raise UsageError(f"tokenizer {tokenizer} has {len(tok)} tokens but preset vocab is {base.config.vocab_size}")
  rows = encoding.encode(
    base.batch_type,
    examples,
    tok,
    input_length=preset.input_length,
    target_length=preset.target_length,
    name=f"{task} {data_file}",
  )
  kw = dict(seed=0, buckets=bucket_lengths(buckets, preset.input_length), group_by_length=group)
  plain = BatchStream(rows, preset.batch_size, **kw)  # what PEFT gets
  unpacked = [next(plain) for _ in range(steps)]
  ours = unpacked
  if pack:
    stream = BatchStream(rows, preset.batch_size, packing=_packing(preset, base), **kw)
    ours = [next(stream) for _ in range(steps)]
  return ours, unpacked, len(examples), float(rows.input_lengths().mean()), tok


def _time_ours(preset: BN.Preset, batches) -> dict:
  step_fn, prompt, opt, frozen, _ = BN.setup(preset, "float32")
  jitted = jax.jit(step_fn, donate_argnums=(0, 1))
  state = {"p": prompt, "o": opt}

  def run(b):
    state["p"], state["o"], m = jitted(
      state["p"], state["o"], frozen, jax.tree.map(jnp.asarray, b), jnp.asarray(0, jnp.int32)
    )
    return m["loss"]

  shapes = {jax.tree.map(np.shape, b): b for b in batches}
  t0 = time.perf_counter()
  for b in shapes.values():  # one compile per bucket, before the clock starts
    jax.block_until_ready(run(b))
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for b in batches:
    loss = run(b)
  jax.block_until_ready(loss)
  return dict(
    seconds=time.perf_counter() - t0,
    compile_and_warmup_seconds=compile_s,
    input_lengths=[b.input_length for b in batches],
    rows=[b.size for b in batches],
    slots=sum(b.size * b.tokens_per_row(preset.prompt_length) for b in batches),
  )


def _time_peft(preset: BN.Preset, base, batches, threads: int) -> dict:
  import torch

  model, opt = BN.peft_trainable(preset, base, threads)
  hf = [{k: torch.as_tensor(v, dtype=torch.long) for k, v in _longest_row(b.hf_inputs()).items()} for b in batches]

  def step(inputs):
    model(**inputs).loss.backward()
    opt.step()
    opt.zero_grad()

  step(hf[0])  # warm-up
  t0 = time.perf_counter()
  for inputs in hf:
    step(inputs)

  def slots(x):  # prompt + input (+ decoder targets) per row
    n = x["input_ids"].shape[1] + (0 if x["labels"].shape[1] == x["input_ids"].shape[1] else x["labels"].shape[1])
    return x["input_ids"].shape[0] * (preset.prompt_length + n)

  return dict(
    seconds=time.perf_counter() - t0,
    input_lengths=[int(x["input_ids"].shape[1]) for x in hf],
    slots=sum(slots(x) for x in hf),
  )


def _time_eval_ours(preset: BN.Preset, base, batches, label_ids, label_mask) -> dict:
  """The evaluator's rank step (loss sums and [B, C] label scores in one pass) over `batches`."""
  model = PromptedModel(base, SoftPrompt(jnp.zeros((preset.prompt_length, base.hidden_size)) + 0.1))
  graphdef, ps, fs = nnx.split(model, PromptParam, ...)
  prompt, frozen = ps.to_pure_dict(), fs.to_pure_dict()
  rank = jax.jit(make_eval_fns(graphdef, z_loss=1e-4)[1])
  ids, mask = jnp.asarray(label_ids), jnp.asarray(label_mask)
  run = lambda b: rank(prompt, frozen, jax.tree.map(jnp.asarray, b), jnp.ones((b.size,)), ids, mask)  # noqa: E731
  for b in {jax.tree.map(np.shape, b): b for b in batches}.values():  # one compile per bucket
    jax.block_until_ready(run(b))
  t0 = time.perf_counter()
  out = [run(b) for b in batches]
  jax.block_until_ready(out)
  return dict(seconds=time.perf_counter() - t0)


def _time_eval_peft(preset: BN.Preset, base, batches, label_ids, label_mask, threads: int) -> dict:
  """PEFT's evaluation of the same batches: the loss pass (dynamic padding), then one pass per label scoring
  it as every row's target (the label log-likelihoods summed per row, as rank classification needs them)."""
  import torch

  torch.set_num_threads(threads)
  model, _ = BN.peft_model(preset, base)
  model.eval()
  as_torch = lambda d: {k: torch.as_tensor(v, dtype=torch.long) for k, v in d.items()}  # noqa: E731
  labels = [
    [int(t) for t, m in zip(ids, mask, strict=False) if m] for ids, mask in zip(label_ids, label_mask, strict=False)
  ]
  work = [
    (as_torch(_longest_row(b.hf_inputs())), [as_torch(_longest_row(b.hf_with_target(t))) for t in labels])
    for b in batches
  ]

  def score(inputs):
    logits = model(**inputs).logits
    labels = inputs["labels"]
    if labels.shape[1] == inputs["input_ids"].shape[1]:  # causal: PEFT returns the virtual tokens' positions too,
      logits, labels = logits[:, -labels.shape[1] : -1], labels[:, 1:]  # and position t predicts t + 1
    logp = torch.log_softmax(logits.float(), -1)
    keep = labels >= 0
    return (logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * keep).sum(-1)

  with torch.no_grad():
    model(**work[0][0])  # warm-up
    t0 = time.perf_counter()
    for loss_inputs, per_label in work:
      model(**loss_inputs).loss.item()
      torch.stack([score(x) for x in per_label], -1)
    return dict(seconds=time.perf_counter() - t0)


def run_data_bench(
  preset_name: str,
  data_file,
  task: str,
  tokenizer,
  *,
  vs_peft: bool = False,
  steps: int = 6,
  buckets="auto",
  group_by_length: int = 0,
  pack: bool | None = None,
  evaluate: bool = False,
  log=print,
) -> dict:
  """The real-data benchmark as a dict (also printed by `log`). `pack`: pack a seq2seq model's rows (None: when
  the model is seq2seq). `evaluate`: also time rank classification (the task's labels) on the unpacked batches."""
  preset = dataclasses.replace(BN.PRESETS[preset_name], **RECIPE)
  threads = BN.cpu_threads()
  base = BN.random_base(preset)
  pack = _resolve_pack(pack, base, preset_name)
  labels = _eval_labels(task) if evaluate else None
  batches, unpacked, n, mean_len, tok = _batches(
    preset, base, data_file, task, tokenizer, steps, buckets, group_by_length, pack
  )
  real = sum(_real_tokens(b) for b in unpacked)
  examples = steps * preset.batch_size
  out = dict(
    preset=preset_name,
    task=task,
    data=str(data_file),
    examples_in_file=n,
    mean_input_tokens=mean_len,
    steps=steps,
    threads=threads,
    shape=dataclasses.asdict(preset),
    real_tokens=real,
    length_buckets=buckets,
    group_by_length=group_by_length,
    pack=pack,
  )
  log(
    f"{task}: {n} rows from {data_file}, mean input {mean_len:.0f} tokens (limit {preset.input_length}); "
    f"{steps} steps of {preset.batch_size}, prompt {preset.prompt_length}, {threads} threads; buckets {buckets}, "
    f"group_by_length {group_by_length}, {'packed' if pack else 'not packed'}"
  )
  r = _train_ours(preset, batches, out, examples=examples, log=log)
  if vs_peft:
    _train_peft(preset, base, unpacked, r, out, examples=examples, threads=threads, log=log)
  if evaluate:
    label_ids, label_mask = encoding.encode_labels(base.batch_type, tok, labels, preset.target_length)
    ev = _rank_ours(preset, base, unpacked, labels, label_ids, label_mask, out, examples=examples, log=log)
    if vs_peft:
      _rank_peft(preset, base, unpacked, label_ids, label_mask, ev, out, examples=examples, threads=threads, log=log)
  return out


def _resolve_pack(pack: bool | None, base, preset_name: str) -> bool:
  """`pack` with None resolved to whether the model packs (seq2seq); a UsageError for packing a causal model."""
  if pack is None:
    return base.supports_packing
  if pack and not base.supports_packing:
    raise UsageError(f"--pack packs seq2seq rows; {preset_name} is a {base.kind} model")
  return pack


def _eval_labels(task: str):
  """The task's label strings for rank classification; a UsageError for a generative task."""
  labels = get_task(task).labels
  if not labels:  # before minutes of training benchmark, not after
    raise UsageError(f"--eval ranks label strings; task {task!r} is generative")
  return labels


def _with_rates(r: dict, examples: int, real: int | None = None) -> dict:
  """`r` with examples/s (and, given `real`, real tokens/s) from its seconds."""
  r["examples_per_second"] = examples / r["seconds"]
  if real is not None:
    r["real_tokens_per_second"] = real / r["seconds"]
  return r


def _train_ours(preset: BN.Preset, batches, out: dict, *, examples: int, log) -> dict:
  """jaxprompt's train steps over `batches`, into `out["jaxprompt"]` (also returned)."""
  r = _with_rates(_time_ours(preset, batches), examples, out["real_tokens"])
  out["jaxprompt"] = r
  shape = (
    f"packed rows x length {sorted(set(zip(r['rows'], r['input_lengths'], strict=False)))}"
    if out["pack"]
    else f"input buckets {sorted(set(r['input_lengths']))}"
  )
  log(
    f"jaxprompt: {r['examples_per_second']:.2f} examples/s, {r['real_tokens_per_second']:.0f} real tokens/s "
    f"({shape}; {r['slots']} token slots; compile + warm-up {r['compile_and_warmup_seconds']:.0f} s)"
  )
  return r


def _train_peft(preset: BN.Preset, base, unpacked, r: dict, out: dict, *, examples: int, threads: int, log) -> None:
  """PyTorch + PEFT's train steps over the unpacked batches against `r`, jaxprompt's."""
  pr = _with_rates(_time_peft(preset, base, unpacked, threads), examples, out["real_tokens"])
  out["peft"] = pr
  out["speedup_vs_peft"] = pr["seconds"] / r["seconds"]
  log(
    f"PyTorch + PEFT (per-batch dynamic padding, longest rows {min(pr['input_lengths'])}-"
    f"{max(pr['input_lengths'])}; {pr['slots']} token slots): {pr['examples_per_second']:.2f} examples/s, "
    f"{pr['real_tokens_per_second']:.0f} real tokens/s -> jaxprompt is {out['speedup_vs_peft']:.2f}x"
  )


def _rank_ours(preset: BN.Preset, base, unpacked, labels, label_ids, label_mask, out: dict, *, examples: int, log):
  """jaxprompt's rank classification over the unpacked batches, into `out["eval"]`; returns its timing."""
  ev = _with_rates(_time_eval_ours(preset, base, unpacked, label_ids, label_mask), examples)
  out["eval"] = dict(labels=list(labels), jaxprompt=ev)
  log(
    f"rank classification ({len(labels)} labels; loss + every label's score, one pass): "
    f"{ev['examples_per_second']:.2f} examples/s"
  )
  return ev


def _rank_peft(
  preset: BN.Preset, base, unpacked, label_ids, label_mask, ev: dict, out: dict, *, examples, threads, log
):
  """PEFT's rank classification over the unpacked batches against `ev`, jaxprompt's, into `out["eval"]`."""
  pe = _with_rates(_time_eval_peft(preset, base, unpacked, label_ids, label_mask, threads), examples)
  out["eval"].update(peft=pe, speedup_vs_peft=pe["seconds"] / ev["seconds"])
  log(
    f"PyTorch + PEFT rank classification (a loss pass, then each (example, label) as its own sequence): "
    f"{pe['examples_per_second']:.2f} examples/s -> jaxprompt is {out['eval']['speedup_vs_peft']:.2f}x"
  )
