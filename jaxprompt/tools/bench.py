"""`jaxprompt bench`: the prompt-tuning train step measured — step time, tokens/s, XLA FLOPs, achieved
FLOP/s against the device's peak, compile time, memory — optionally against PyTorch + PEFT on the same
shapes in the same invocation, plus the structural checks that make prompt tuning cheap.

Presets use random weights (no downloads); shapes follow the named checkpoints.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprompt import config as C
from jaxprompt.data import encoding
from jaxprompt.inference.decoding import generate
from jaxprompt.models.layers import unrolls
from jaxprompt.models.loading import build_model, config_from_dict
from jaxprompt.prompts import PromptedModel, PromptParam, SoftPrompt, prompt_bank
from jaxprompt.prompts.io import PEFT_TASK_TYPES
from jaxprompt.tools import costs
from jaxprompt.training.optim import build_optimizer
from jaxprompt.training.step import make_train_step

# bf16 dense peak FLOP/s per device (vendor figures)
PEAK_FLOPS = {
  "TPU v2": 45e12,
  "TPU v3": 123e12,
  "TPU v4": 275e12,
  "TPU v5 lite": 197e12,
  "TPU v5e": 197e12,
  "TPU v5p": 459e12,
  "TPU v6 lite": 918e12,
  "TPU v6e": 918e12,
  "NVIDIA A100": 312e12,
  "NVIDIA H100": 989e12,
  "NVIDIA H200": 989e12,
  "NVIDIA L4": 121e12,
  "NVIDIA A10G": 125e12,
  "Tesla T4": 65e12,
  "Tesla V100": 125e12,
}


@dataclasses.dataclass(frozen=True)
class Preset:
  hf_config: dict
  batch_size: int
  input_length: int
  target_length: int
  prompt_length: int


PRESETS: dict[str, Preset] = {
  "llama-small": Preset(
    dict(
      model_type="llama",
      vocab_size=32000,
      hidden_size=512,
      intermediate_size=1376,
      num_hidden_layers=8,
      num_attention_heads=8,
      num_key_value_heads=4,
      rms_norm_eps=1e-5,
      rope_theta=10000.0,
      tie_word_embeddings=False,
      max_position_embeddings=2048,
      bos_token_id=1,
      eos_token_id=2,
    ),
    batch_size=8,
    input_length=128,
    target_length=8,
    prompt_length=100,
  ),
  "t5-v1_1-small": Preset(
    dict(
      model_type="t5",
      vocab_size=32128,
      d_model=512,
      d_kv=64,
      d_ff=1024,
      num_layers=8,
      num_decoder_layers=8,
      num_heads=6,
      feed_forward_proj="gated-gelu",
      tie_word_embeddings=False,
      dropout_rate=0.0,
      decoder_start_token_id=0,
    ),
    batch_size=8,
    input_length=128,
    target_length=8,
    prompt_length=100,
  ),
}


def _median_time(fn: Callable, warmup: int, iters: int) -> tuple[float, list[float]]:
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times), times


def device_peak(dtype: str = "float32") -> tuple[float, str]:
  """(peak FLOP/s, how it was obtained) for the default device; on CPU, a matmul measured now."""
  dev = jax.devices()[0]
  kind = getattr(dev, "device_kind", "")
  for name, peak in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return peak, f"{kind} bf16 spec sheet"
  n = 2048
  a = jnp.ones((n, n), jnp.dtype(dtype))
  f = jax.jit(lambda x: x @ x)
  t, _ = _median_time(lambda: f(a), 2, 5)
  return 2 * n**3 / t, f"measured {n}x{n} {dtype} matmul on {kind or dev.platform}"


def random_base(
  preset: Preset,
  dtype: str = "float32",
  layers: int | None = None,
  layer_loop: str = "auto",
  share_prompt: bool = True,
  attention: str = "auto",
):
  """A randomly initialised base model of the preset's shape (`layer_loop`, `attention`: the model section's;
  `share_prompt`: `models.interface.ModelOptions`)."""
  hf_cfg = dict(preset.hf_config)
  if layers is not None:
    hf_cfg.update({k: layers for k in ("num_layers", "num_decoder_layers", "num_hidden_layers") if k in hf_cfg})
  return build_model(
    config_from_dict(hf_cfg),
    dtype=jnp.dtype(dtype),
    layer_loop=layer_loop,
    share_prompt=share_prompt,
    attention=attention,
  )


class _IdTokenizer:
  """A "tokenizer" whose texts are space-separated token ids: random presets need no vocabulary."""

  pad_token_id, eos_token_id, bos_token_id = 0, None, None

  def __call__(self, text: str | list[str], add_special_tokens: bool = True) -> dict:
    ids = lambda t: [int(w) for w in t.split()]  # noqa: E731
    return {"input_ids": ids(text) if isinstance(text, str) else [ids(t) for t in text]}


def random_batch(base, preset: Preset, seed: int = 0):
  """Random tokens (ids 2..999) in the model kind's batch layout, inputs and targets filling their lengths."""
  rng = np.random.default_rng(seed)

  def words(n):
    return " ".join(map(str, rng.integers(2, 1000, n)))

  examples = [
    {"inputs": words(preset.input_length), "targets": words(preset.target_length)} for _ in range(preset.batch_size)
  ]
  batch = encoding.encode(
    base.batch_type,
    examples,
    _IdTokenizer(),
    input_length=preset.input_length,
    target_length=preset.target_length,
    name="bench",
  )
  return jax.tree.map(jnp.asarray, batch)


def setup(
  preset: Preset,
  dtype: str,
  layers: int | None = None,
  full_finetune: bool = False,
  share_prompt: bool = True,
  layer_loop: str = "auto",
):
  """(step_fn, prompt, opt_state, frozen, batch) for the preset's shapes, random weights. `share_prompt=False`:
  a causal model runs the prompt in every row (PEFT's computation) instead of once per batch."""
  base = random_base(preset, dtype, layers, layer_loop, share_prompt=share_prompt)
  model = PromptedModel(base, SoftPrompt(jnp.zeros((preset.prompt_length, base.hidden_size)) + 0.1))
  batch = random_batch(base, preset)
  tx = build_optimizer(C.OptimizerConfig(), 1000)
  if full_finetune:  # every parameter trainable: the cost prompt tuning avoids
    graphdef, params = nnx.split(model, nnx.Param)
    prompt, frozen = params.to_pure_dict(), {}
  else:
    graphdef, ps, fs = nnx.split(model, PromptParam, ...)
    prompt, frozen = ps.to_pure_dict(), fs.to_pure_dict()
  step_fn = make_train_step(graphdef, tx, z_loss=1e-4, microbatches=C.TrainConfig().microbatches)  # the default
  return step_fn, prompt, tx.init(prompt), frozen, batch


def bench_train_step(
  preset: Preset,
  *,
  dtype: str = "float32",
  warmup: int = 2,
  iters: int = 5,
  layers: int | None = None,
  share_prompt: bool = True,
  layer_loop: str = "auto",
) -> dict:
  step_fn, prompt, opt, frozen, batch = setup(preset, dtype, layers, share_prompt=share_prompt, layer_loop=layer_loop)
  jitted = jax.jit(step_fn, donate_argnums=(0, 1))
  t0 = time.perf_counter()
  compiled = jitted.lower(prompt, opt, frozen, batch, jnp.asarray(0, jnp.int32)).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  flops = costs.flops(step_fn, prompt, opt, frozen, batch, jnp.asarray(0, jnp.int32))
  state = {"p": prompt, "o": opt}

  def one():
    state["p"], state["o"], m = compiled(state["p"], state["o"], frozen, batch, jnp.asarray(0, jnp.int32))
    return m["loss"]

  med, times = _median_time(one, warmup, iters)
  tokens = preset.batch_size * (preset.input_length + preset.prompt_length + preset.target_length)
  return dict(
    step_seconds=med,
    step_times=times,
    tokens_per_second=tokens / med,
    flops_per_step=flops,
    achieved_flops=flops / med,
    compile_seconds=compile_s,
    device_memory_gib=(
      mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    )
    / 2**30,
  )


def full_finetune_flops(preset: Preset, dtype: str = "float32") -> float:
  step_fn, prompt, opt, frozen, batch = setup(preset, dtype, full_finetune=True)
  return costs.flops(step_fn, prompt, opt, frozen, batch, jnp.asarray(0, jnp.int32))


def compile_seconds(preset: Preset, layers: int, dtype: str = "float32", layer_loop: str = "scan") -> float:
  step_fn, prompt, opt, frozen, batch = setup(preset, dtype, layers, layer_loop=layer_loop)
  jax.clear_caches()
  t0 = time.perf_counter()
  jax.jit(step_fn).lower(prompt, opt, frozen, batch, jnp.asarray(0, jnp.int32)).compile()
  return time.perf_counter() - t0


def peft_model(preset: Preset, base, **prompt_tuning):
  """The preset as a random transformers model wrapped by PEFT prompt tuning (task type from our model kind)."""
  from peft import PromptTuningConfig, get_peft_model

  task = PEFT_TASK_TYPES[base.kind]
  return get_peft_model(
    _torch_model(preset, task),
    PromptTuningConfig(task_type=task, num_virtual_tokens=preset.prompt_length, **prompt_tuning),
    adapter_name="p0",
  ), task


def peft_trainable(preset: Preset, base, threads: int):
  """(PEFT prompt-tuning model in train mode, its Adafactor as the paper's) for the preset, on `threads` threads."""
  import torch
  from transformers.optimization import Adafactor

  torch.set_num_threads(threads)
  model, _ = peft_model(preset, base)
  model.train()
  opt = Adafactor(
    [p for p in model.parameters() if p.requires_grad],
    lr=0.3,
    relative_step=False,
    scale_parameter=False,
    warmup_init=False,
    decay_rate=-0.8,
    clip_threshold=1.0,
    weight_decay=1e-5,
  )
  return model, opt


def bench_peft_train_step(preset: Preset, *, threads: int, warmup: int = 1, iters: int = 3) -> dict:
  """The same shapes through PyTorch + PEFT prompt tuning (forward, backward, optimizer step)."""
  import torch

  base = random_base(preset)
  model, opt = peft_trainable(preset, base, threads)
  inputs = {
    k: torch.as_tensor(np.asarray(v), dtype=torch.long)
    for k, v in jax.device_get(random_batch(base, preset)).hf_inputs().items()
  }

  def one():
    model(**inputs).loss.backward()
    opt.step()
    opt.zero_grad()

  med, times = _median_time(one, warmup, iters)
  tokens = preset.batch_size * (preset.input_length + preset.prompt_length + preset.target_length)
  return dict(step_seconds=med, step_times=times, tokens_per_second=tokens / med, threads=threads)


def cpu_threads() -> int:
  """The CPU threads this process may run on."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def run_bench(
  preset_name: str,
  *,
  vs_peft: bool = False,
  dtype: str = "float32",
  iters: int = 5,
  structural: bool = True,
  generation: bool = True,
  layer_loop: str = "auto",
  log=print,
) -> dict:
  """The whole benchmark as a dict (also printed as a table by `log`)."""
  preset = PRESETS[preset_name]
  threads = cpu_threads()
  out = _run_setting(preset_name, dtype=dtype, threads=threads, layer_loop=layer_loop, log=log)
  r = _bench_ours(preset, out, dtype=dtype, iters=iters, layer_loop=layer_loop, log=log)
  if "num_hidden_layers" in preset.hf_config:  # causal: the same step with the prompt run in every row, as PEFT does
    _bench_per_row_prompt(preset, r, out, dtype=dtype, iters=iters, layer_loop=layer_loop, log=log)
  if vs_peft:
    _bench_peft(preset, r, out, threads=threads, iters=iters, log=log)
  if structural:
    _flops_vs_full_finetune(preset, r, out, dtype=dtype, log=log)
    _compile_scaling(preset, out, dtype=dtype, layer_loop=layer_loop, log=log)
  if generation:
    _bench_mixed_prompt_generation(preset, out, threads=threads, vs_peft=vs_peft, layer_loop=layer_loop, log=log)
  return out


def _run_setting(preset_name: str, *, dtype: str, threads: int, layer_loop: str, log) -> dict:
  """The run's setting (device, its peak FLOP/s, the preset's shape), logged: the start of `run_bench`'s dict."""
  dev = jax.devices()[0]
  peak, how = device_peak(dtype if dev.platform == "cpu" else "bfloat16")
  out: dict = dict(
    preset=preset_name,
    dtype=dtype,
    device=getattr(dev, "device_kind", dev.platform),
    devices=jax.device_count(),
    threads=threads,
    peak_flops=peak,
    peak_source=how,
    shape=dataclasses.asdict(PRESETS[preset_name]),
    layer_loop=layer_loop,
    layers_unrolled=unrolls(layer_loop),
  )
  log(f"device: {out['device']} x{out['devices']} ({threads} CPU threads); peak {peak / 1e9:.0f} GFLOP/s ({how})")
  return out


def _bench_ours(preset: Preset, out: dict, *, dtype: str, iters: int, layer_loop: str, log) -> dict:
  """jaxprompt's train step against the device's peak, into `out["jaxprompt"]` (also returned)."""
  r = bench_train_step(preset, dtype=dtype, iters=iters, layer_loop=layer_loop)
  r["utilization"] = r["achieved_flops"] / out["peak_flops"]
  out["jaxprompt"] = r
  log(
    f"jaxprompt train step: {r['step_seconds'] * 1e3:.0f} ms median, {r['tokens_per_second']:.0f} tokens/s, "
    f"{r['flops_per_step'] / 1e9:.1f} GFLOP/step, {r['achieved_flops'] / 1e9:.1f} GFLOP/s "
    f"({100 * r['utilization']:.0f}% of peak), compile {r['compile_seconds']:.1f} s, "
    f"{r['device_memory_gib']:.2f} GiB device memory"
  )
  return r


def _bench_per_row_prompt(preset: Preset, r: dict, out: dict, *, dtype: str, iters: int, layer_loop: str, log):
  """A causal model's step with the prompt run in every row (PEFT's work) against `r`, the shared prompt's."""
  rr = bench_train_step(preset, dtype=dtype, iters=max(3, iters // 2), share_prompt=False, layer_loop=layer_loop)
  out["jaxprompt_per_row_prompt"] = rr
  out["shared_prompt_speedup"] = rr["step_seconds"] / r["step_seconds"]
  log(
    f"jaxprompt with the prompt in every row (PEFT's work): {rr['step_seconds'] * 1e3:.0f} ms, "
    f"{rr['flops_per_step'] / 1e9:.1f} GFLOP/step -> the shared prompt is {out['shared_prompt_speedup']:.2f}x"
  )


def _bench_peft(preset: Preset, r: dict, out: dict, *, threads: int, iters: int, log) -> None:
  """PyTorch + PEFT's train step on the same shapes against `r`, jaxprompt's."""
  pr = bench_peft_train_step(preset, threads=threads, iters=max(3, iters // 2))
  out["peft"] = pr
  out["speedup_vs_peft"] = r["tokens_per_second"] / pr["tokens_per_second"]
  log(
    f"PyTorch + PEFT train step: {pr['step_seconds'] * 1e3:.0f} ms median, {pr['tokens_per_second']:.0f} "
    f"tokens/s ({threads} threads) -> jaxprompt is {out['speedup_vs_peft']:.2f}x"
  )


def _flops_vs_full_finetune(preset: Preset, r: dict, out: dict, *, dtype: str, log) -> None:
  """XLA FLOPs of `r`'s prompt-tuning step over those of a full fine-tuning step."""
  ff = full_finetune_flops(preset, dtype)
  out["full_finetune_flops"] = ff
  out["prompt_vs_full_flops"] = r["flops_per_step"] / ff
  log(
    f"XLA FLOPs: prompt-tuning step / full fine-tuning step = {out['prompt_vs_full_flops']:.2f} "
    "(frozen weights get no weight-gradient matmuls)"
  )


def _compile_scaling(preset: Preset, out: dict, *, dtype: str, layer_loop: str, log) -> None:
  """Compile time at 6 and 24 layers in a scan (and, when this run unrolls them, unrolled)."""
  c6, c24 = compile_seconds(preset, 6, dtype), compile_seconds(preset, 24, dtype)
  out.update(compile_6_layers=c6, compile_24_layers=c24, compile_ratio_24_vs_6=c24 / c6)
  log(
    f"compile time, layers in a scan (GPU/TPU's default): 6 layers {c6:.1f} s, 24 layers {c24:.1f} s ({c24 / c6:.2f}x)"
  )
  if unrolls(layer_loop):  # what unrolling costs in compile time
    u6, u24 = compile_seconds(preset, 6, dtype, "unroll"), compile_seconds(preset, 24, dtype, "unroll")
    out.update(compile_6_layers_unrolled=u6, compile_24_layers_unrolled=u24)
    log(f"compile time, layers unrolled (this run's): 6 layers {u6:.1f} s, 24 layers {u24:.1f} s ({u24 / u6:.2f}x)")


def _bench_mixed_prompt_generation(preset: Preset, out: dict, *, threads: int, vs_peft: bool, layer_loop: str, log):
  """`bench_generation` into `out["generation"]`, logged."""
  g = bench_generation(preset, threads=threads, vs_peft=vs_peft, layer_loop=layer_loop)
  out["generation"] = g
  log(
    f"generation, {g['num_prompts']} prompts x {g['per_prompt']} examples x {g['new_tokens']} new tokens: "
    f"jaxprompt one mixed-prompt batch {g['jaxprompt_seconds']:.2f} s ({g['jaxprompt_tokens_per_second']:.0f} "
    "tokens/s)"
    + (
      f"; PEFT one call per prompt {g['peft_seconds']:.2f} s ({g['peft_tokens_per_second']:.0f} "
      f"tokens/s) -> {g['speedup_vs_peft']:.2f}x"
      if vs_peft
      else ""
    )
  )


def _torch_model(preset: Preset, task: str):
  import torch
  import transformers

  torch.manual_seed(0)
  cfg = dict(preset.hf_config)
  config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
  auto = {"SEQ_2_SEQ_LM": transformers.AutoModelForSeq2SeqLM, "CAUSAL_LM": transformers.AutoModelForCausalLM}[task]
  return auto.from_config(config)


def bench_generation(
  preset: Preset,
  *,
  num_prompts: int = 4,
  per_prompt: int = 8,
  new_tokens: int = 32,
  input_length: int = 32,
  threads: int = 2,
  vs_peft: bool = True,
  iters: int = 3,
  layer_loop: str = "auto",
) -> dict:
  """K prompts x N examples: one jitted mixed-prompt batch (jaxprompt) vs PEFT generating per prompt."""
  base = random_base(preset, layer_loop=layer_loop)
  rng = np.random.default_rng(0)
  prompts = [
    rng.normal(size=(preset.prompt_length, base.hidden_size)).astype(np.float32) * 0.5 for _ in range(num_prompts)
  ]
  ids = rng.integers(3, 1000, (per_prompt, input_length)).astype(np.int32)
  med = _mixed_prompt_seconds(base, prompts, ids, new_tokens=new_tokens, iters=iters)
  total = num_prompts * per_prompt * new_tokens
  out = dict(
    num_prompts=num_prompts,
    per_prompt=per_prompt,
    new_tokens=new_tokens,
    input_length=input_length,
    jaxprompt_seconds=med,
    jaxprompt_tokens_per_second=total / med,
  )
  if vs_peft:
    pmed = _peft_per_prompt_seconds(preset, base, ids, num_prompts, new_tokens=new_tokens, threads=threads, iters=iters)
    out.update(peft_seconds=pmed, peft_tokens_per_second=total / pmed, speedup_vs_peft=pmed / med)
  return out


def _mixed_prompt_seconds(base, prompts: list[np.ndarray], ids: np.ndarray, *, new_tokens: int, iters: int) -> float:
  """Median seconds of jaxprompt generating `ids` under every prompt in one mixed-prompt batch."""
  model = PromptedModel(base, prompt_bank(prompts))
  which = jnp.asarray(np.repeat(np.arange(len(prompts)), len(ids)))
  all_ids = jnp.asarray(np.tile(ids, (len(prompts), 1)))
  mask = jnp.ones_like(all_ids)

  def ours():
    return generate(
      base,
      input_ids=all_ids,
      attention_mask=mask,
      prefix=model.prefix(len(which), which),
      max_new_tokens=new_tokens,
      eos_id=-1,
    )["tokens"]

  med, _ = _median_time(ours, 1, iters)
  return med


def _peft_per_prompt_seconds(
  preset: Preset, base, ids: np.ndarray, num_prompts: int, *, new_tokens: int, threads: int, iters: int
) -> float:
  """Median seconds of PEFT generating `ids` under each of `num_prompts` adapters, one call per prompt."""
  import torch
  from peft import PromptTuningConfig

  torch.set_num_threads(threads)
  pm, task = peft_model(preset, base, num_transformer_submodules=1)
  for k in range(1, num_prompts):
    pm.add_adapter(
      f"p{k}", PromptTuningConfig(task_type=task, num_virtual_tokens=preset.prompt_length, num_transformer_submodules=1)
    )
  pm.eval()
  t_ids = torch.tensor(ids, dtype=torch.long)

  def peft_all():
    with torch.no_grad():
      for k in range(num_prompts):  # PEFT prompt tuning serves one prompt per call
        pm.set_adapter(f"p{k}")
        pm.generate(
          input_ids=t_ids,
          attention_mask=torch.ones_like(t_ids),
          max_new_tokens=new_tokens,
          min_new_tokens=new_tokens,
          do_sample=False,
        )

  peft_all()
  times = []
  for _ in range(iters):
    s = time.perf_counter()
    peft_all()
    times.append(time.perf_counter() - s)
  return statistics.median(times)
