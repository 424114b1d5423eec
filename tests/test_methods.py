"""The soft-prompt family — prefix tuning (with and without its projection; deep prompts / P-tuning v2) and
P-tuning (MLP and LSTM encoders) — checked against HF PEFT in both directions on T5 (ReLU + tied; gated + untied
with a deeper encoder), Llama (GQA) and GPT-2: adapters made in PEFT load with PEFT's logits, adapters trained here
load in PEFT with ours, and generation, mixed batches, resuming and PEFT's limitations behave."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxprompt import config as C
from jaxprompt import load_prompted
from jaxprompt import sharding as shd
from jaxprompt.checkpoint import Checkpointer
from jaxprompt.cli import main
from jaxprompt.data import encoding
from jaxprompt.inference import generate
from jaxprompt.inference import text as inference
from jaxprompt.models import load_model, load_tokenizer
from jaxprompt.prompts import PromptedModel
from jaxprompt.prompts.encoders import PTuning
from jaxprompt.prompts.export import export_prompt
from jaxprompt.prompts.io import load_prompt_source
from jaxprompt.prompts.methods import bank
from jaxprompt.prompts.prefix import PrefixTuning, PrefixTuningSpec
from jaxprompt.run import build_run
from jaxprompt.training.optim import build_optimizer
from jaxprompt.training.trainer import train
from tests.helpers import fully_optimized, jit_train_step, tiny_cfg, write_byte_decoder
from tests.helpers_hf import load_decoder, load_t5, write_decoder, write_t5

TOL = 1e-4  # whole-model float32 tolerance (DESIGN.md); never loosened
P = 3


def one_device():
  return shd.make_mesh(devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("methods")
  return {
    "t5-relu-tied": write_t5(root / "t5r", "t5-relu-tied"),
    # PEFT supports a decoder shallower than the encoder (decoder layer g reads table layer 2g mod 3)
    "t5-gated-deep-encoder": write_t5(root / "t5g", "t5v11-gated-untied", num_layers=3, num_decoder_layers=2),
    "llama-gqa": write_decoder(root / "llama", "llama3-gqa-untied"),
    "gpt2": write_decoder(root / "gpt2", "gpt2"),
  }


def _peft_config(method: str, task: str):
  from peft import PrefixTuningConfig, PromptEncoderConfig

  return {
    "prefix": lambda: PrefixTuningConfig(task_type=task, num_virtual_tokens=P),
    "prefix-projection": lambda: PrefixTuningConfig(
      task_type=task, num_virtual_tokens=P, prefix_projection=True, encoder_hidden_size=16
    ),
    "p-tuning-mlp": lambda: PromptEncoderConfig(task_type=task, num_virtual_tokens=P, encoder_hidden_size=16),
    "p-tuning-lstm": lambda: PromptEncoderConfig(
      task_type=task, num_virtual_tokens=P, encoder_hidden_size=16, encoder_reparameterization_type="LSTM"
    ),
  }[method]()


def _torch_base(folder, seq2seq: bool):
  return (load_t5 if seq2seq else load_decoder)(folder)


def _batch(seq2seq: bool, seed: int = 0):
  g = torch.Generator().manual_seed(seed)
  ids = torch.randint(3, 90, (3, 7), generator=g)
  mask = torch.ones_like(ids)
  mask[1, 5:] = 0  # a padded row
  dec = torch.randint(3, 90, (3, 4), generator=g) if seq2seq else None
  return ids, mask, dec


def _compare(peft_model, ours: PromptedModel, seq2seq: bool, virtual: int):
  ids, mask, dec = _batch(seq2seq)
  with torch.no_grad():
    ref = peft_model(input_ids=ids, attention_mask=mask, **({"decoder_input_ids": dec} if seq2seq else {})).logits
  ref = ref.numpy()[:, virtual:]  # PEFT returns the virtual tokens' logits too (input-embedding prompts, decoders)
  args = [jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy())] + ([jnp.asarray(dec.numpy())] if seq2seq else [])
  got = np.asarray(ours(*args))
  assert got.shape == ref.shape
  np.testing.assert_allclose(got, ref, atol=TOL, rtol=TOL)
  return float(np.abs(got - ref).max())


@pytest.mark.parametrize("method", ["prefix", "prefix-projection", "p-tuning-mlp", "p-tuning-lstm"])
@pytest.mark.parametrize("model", ["t5-relu-tied", "t5-gated-deep-encoder", "llama-gqa", "gpt2"])
def test_adapters_made_in_peft_load_with_peft_logits(folders, tmp_path, model, method):
  """Random PEFT adapters of every type and option, saved by PEFT, loaded by `load_prompted`."""
  from peft import PeftModel, get_peft_model

  seq2seq = model.startswith("t5")
  torch.manual_seed(1)
  get_peft_model(
    _torch_base(folders[model], seq2seq), _peft_config(method, "SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM")
  ).save_pretrained(tmp_path / "a")
  peft_model = PeftModel.from_pretrained(_torch_base(folders[model], seq2seq), tmp_path / "a").eval()
  ours = load_prompted(folders[model], tmp_path / "a")
  virtual = P if (method.startswith("p-tuning") and not seq2seq) else 0
  print(f"{model} {method}: PEFT vs ours max |logit diff| {_compare(peft_model, ours, seq2seq, virtual):.1e}")


@pytest.mark.parametrize("encoder", ["MLP", "LSTM"])
def test_p_tuning_encoder_equals_peft_prompt_encoder(encoder):
  """Our MLP / bidirectional 2-layer LSTM encoder, given PEFT's PromptEncoder weights, gives its output."""
  from peft import PromptEncoderConfig
  from peft.tuners.p_tuning.model import PromptEncoder

  cfg = PromptEncoderConfig(
    task_type="CAUSAL_LM",
    num_virtual_tokens=5,
    token_dim=8,
    num_transformer_submodules=1,
    num_attention_heads=2,
    num_layers=2,
    encoder_reparameterization_type=encoder,
    encoder_hidden_size=6,
    encoder_num_layers=2,
    encoder_dropout=0.0,
  )
  torch.manual_seed(0)
  ref_encoder = PromptEncoder(cfg).eval()
  sd = {k: v.detach().numpy() for k, v in ref_encoder.state_dict().items()}
  ours = PTuning(
    sd["embedding.weight"], encoder=encoder, hidden_size=6, num_layers=2, dropout=0.0, rng=jax.random.key(0)
  )
  st = nnx.state(ours).to_pure_dict()
  heads = (0, 2, 4) if encoder == "MLP" else (0, 2)
  for i, j in enumerate(heads):
    st["mlp"][f"l{i}"] = dict(w=sd[f"mlp_head.{j}.weight"].T, b=sd[f"mlp_head.{j}.bias"])
  for layer in range(2) if encoder == "LSTM" else ():
    for d, suffix in (("fwd", ""), ("bwd", "_reverse")):

      def w(name, layer=layer, suffix=suffix):
        return sd[f"lstm_head.{name}_l{layer}{suffix}"]

      st["lstm"][f"l{layer}_{d}"] = dict(w_ih=w("weight_ih").T, w_hh=w("weight_hh").T, b=w("bias_ih") + w("bias_hh"))
  nnx.update(ours, jax.tree.map(jnp.asarray, st))
  with torch.no_grad():
    ref = ref_encoder(torch.arange(5)[None])[0].numpy()
  np.testing.assert_allclose(np.asarray(ours.encode()), ref, atol=1e-6, rtol=1e-5)


# -- trained here, loaded in PEFT ------------------------------------------------------------------------------

METHOD_OVERRIDES = {
  "prefix": {"prompt.method": "prefix_tuning", "prompt.init": "random_uniform"},
  "prefix-projection": {
    "prompt.method": "prefix_tuning",
    "prompt.init": "random_uniform",
    "prompt.prefix_projection": True,
    "prompt.encoder_hidden_size": 16,
  },
  "p-tuning-mlp": {"prompt.method": "p_tuning", "prompt.encoder_hidden_size": 16},
  "p-tuning-lstm": {
    "prompt.method": "p_tuning",
    "prompt.encoder_reparameterization_type": "LSTM",
    "prompt.encoder_hidden_size": 16,
    "prompt.encoder_dropout": 0.1,
  },
}
TEXTS = ["3 7 1 8 2", "9", "hello there"]


@pytest.fixture(scope="module")
def byte_gpt2(tmp_path_factory):
  return write_byte_decoder(tmp_path_factory.mktemp("byte_gpt2") / "m", "gpt2", seed=2)


def _trained(folder, method, workdir, **over):
  cfg = tiny_cfg(folder, **{"prompt.length": P, "model.dropout": 0.1, **METHOD_OVERRIDES[method], **over})
  train(cfg, workdir, progress=False, mesh=one_device())
  return cfg


@pytest.fixture(scope="module")
def trained_here(tmp_path_factory):
  """-> get(folder, method): the workdir of `_trained(folder, method)`, each trained once for the module (the PEFT
  round trip, the generate CLI test and the resuming test read the same runs)."""
  root, runs = tmp_path_factory.mktemp("trained_here"), {}

  def get(folder, method):
    key = (str(folder), method)
    if key not in runs:
      work = root / str(len(runs))
      _trained(folder, method, work)
      runs[key] = work
    return runs[key]

  return get


def _peft_greedy(peft_model, ids, seq2seq: bool, steps: int) -> np.ndarray:
  """Greedy decoding by PEFT's forward pass, recomputed each step on unpadded rows. (PEFT 0.21's generate() with
  transformers 5.24 does not follow its own forward for prefix tuning, nor with its cache for P-tuning.)"""
  with torch.no_grad():
    if seq2seq:
      dec = torch.zeros((len(ids), 1), dtype=torch.long)
      for _ in range(steps):
        nxt = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=dec).logits[:, -1]
        dec = torch.cat([dec, nxt.argmax(-1, keepdim=True)], 1)
      return dec[:, 1:].numpy()
    seq = ids
    for _ in range(steps):
      nxt = peft_model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[:, -1]
      seq = torch.cat([seq, nxt.argmax(-1, keepdim=True)], 1)
    return seq[:, ids.shape[1] :].numpy()


@pytest.mark.parametrize("method", list(METHOD_OVERRIDES))
@pytest.mark.parametrize("model", ["t5", "llama", "gpt2"])
def test_trained_here_loads_in_peft_with_our_logits_and_greedy_tokens(
  byte_t5, byte_llama, byte_gpt2, trained_here, tmp_path, model, method
):
  from peft import PeftModel

  folder = {"t5": byte_t5, "llama": byte_llama, "gpt2": byte_gpt2}[model]
  seq2seq = model == "t5"
  work = trained_here(folder, method)
  out = export_prompt(work, "peft", tmp_path / "adapter")
  acfg = json.loads((out / "adapter_config.json").read_text())
  src = load_prompt_source(work)
  assert acfg["peft_type"] == {"prefix_tuning": "PREFIX_TUNING", "p_tuning": "P_TUNING"}[src.method]
  if src.method == "p_tuning":  # the checkpoint keeps the encoder; PEFT's file holds its output
    assert "lstm" in src.params or "mlp" in src.params
    assert acfg["encoder_reparameterization_type"] == METHOD_OVERRIDES[method].get(
      "prompt.encoder_reparameterization_type", "MLP"
    )
  else:
    assert acfg["prefix_projection"] == (method == "prefix-projection")
  peft_model = PeftModel.from_pretrained(_torch_base(folder, seq2seq), out).eval()
  ours = load_prompted(folder, work)
  virtual = P if (src.method == "p_tuning" and not seq2seq) else 0
  _compare(peft_model, ours, seq2seq, virtual)
  # greedy generation: the same tokens as PEFT's forward pass picks, each row alone (no padding)
  tok = load_tokenizer(folder)
  for text in TEXTS:
    ids, mask = encoding.encode_inputs(ours.base.batch_type, tok, [text])
    got = generate(
      ours.base,
      input_ids=jnp.asarray(ids),
      attention_mask=jnp.asarray(mask),
      prefix=ours.prefix(1),
      max_new_tokens=5,
      eos_id=-1,
    )["tokens"]
    np.testing.assert_array_equal(
      np.asarray(got), _peft_greedy(peft_model, torch.as_tensor(ids, dtype=torch.long), seq2seq, 5)
    )


def test_peft_limits_refuse_the_export_but_jaxprompt_trains_and_serves(tmp_path, capsys):
  """T5 with a decoder deeper than its encoder: PEFT 0.21's seq2seq prefix tuning fails (IndexError); here it
  trains and generates, and `export --format peft` refuses in one line naming the limitation."""
  from peft import PrefixTuningConfig, get_peft_model
  from transformers import ByT5Tokenizer

  folder = write_t5(tmp_path / "m", "t5v11-gated-untied", vocab_size=384, num_layers=1, num_decoder_layers=2)
  ByT5Tokenizer().save_pretrained(folder)
  pm = get_peft_model(load_t5(folder), PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P))
  with pytest.raises(IndexError):  # what a PEFT user gets
    pm(input_ids=torch.ones((1, 4), dtype=torch.long), decoder_input_ids=torch.zeros((1, 2), dtype=torch.long))
  _trained(folder, "prefix", tmp_path / "w")
  capsys.readouterr()
  code = main(["export", str(tmp_path / "w"), "--format", "peft", "--out", str(tmp_path / "adapter")])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and "PEFT cannot run this prefix: PEFT 0.21's seq2seq prefix tuning" in err[0]
  assert not (tmp_path / "adapter").exists()
  npy = export_prompt(tmp_path / "w", "numpy", tmp_path / "p.npy")
  assert np.load(npy).shape == (P, 1, 2, 4, 8)  # [P, Y, 2, K, D], Y = the encoder's depth as PEFT counts layers
  records = inference.generate_text(
    load_model(folder), load_tokenizer(folder), TEXTS, [load_prompt_source(npy)], max_new_tokens=4
  )
  assert len(records) == 3 and all(len(r["tokens"]) <= 4 for r in records)


# -- generation, mixed batches, resuming --------------------------------------------------------------------


def _random_prefix(base, seed: int, length: int = P) -> np.ndarray:
  s = base.prefix_slots()
  return np.asarray(jax.random.normal(jax.random.key(seed), (length, s.layers, 2, s.heads, s.head_dim)))


@pytest.mark.parametrize("model", ["t5-relu-tied", "llama-gqa", "gpt2"])
def test_mixed_batches_of_prefixes_equal_separate_runs_and_cached_equals_uncached(folders, model):
  base = load_model(folders[model])
  seq2seq = model.startswith("t5")
  tables = [_random_prefix(base, k) for k in range(3)]
  mixed = PromptedModel(base, bank(tables, [PrefixTuningSpec()] * 3, base.prefix_slots()))
  ids, mask, dec = (jnp.asarray(x.numpy()) if x is not None else None for x in _batch(seq2seq, seed=3))
  which = jnp.array([2, 0, 1])
  args = (ids, mask) + ((dec,) if seq2seq else ())
  fwd = nnx.jit(lambda m, *a, **k: m(*a, **k))
  got = np.asarray(fwd(mixed, *args, prompt_ids=which))
  for k in range(3):  # each prefix alone, on the whole batch
    alone = PromptedModel(base, PrefixTuning(base.prefix_slots(), table=tables[k]))
    rows = np.flatnonzero(np.asarray(which) == k)
    np.testing.assert_allclose(got[rows], np.asarray(fwd(alone, *args))[rows], atol=1e-5, rtol=1e-5)
  # cached generation of the mixed batch = greedy decoding that recomputes everything each step (unpadded rows)
  real = np.asarray(mask).all(axis=1)
  ids_r, mask_r, which_r = ids[real], mask[real], which[real]
  cached = generate(
    base,
    input_ids=ids_r,
    attention_mask=mask_r,
    prefix=mixed.prefix(len(which_r), which_r),
    max_new_tokens=5,
    eos_id=-1,
  )["tokens"]
  np.testing.assert_array_equal(np.asarray(cached), _uncached_greedy(mixed, ids_r, mask_r, seq2seq, 5, which_r))


@pytest.mark.parametrize("model", ["t5-relu-tied", "llama-gqa"])
def test_p_tuning_generates_cached_as_uncached(folders, model):
  """P-tuning's prompt (an LSTM encoder's output, computed once per batch) through the KV-cache loop."""
  base = load_model(folders[model])
  seq2seq = model.startswith("t5")
  emb = jax.random.normal(jax.random.key(4), (P, base.hidden_size))
  prompted = PromptedModel(
    base, PTuning(emb, encoder="LSTM", hidden_size=16, num_layers=2, dropout=0.0, rng=jax.random.key(5))
  )
  ids = jnp.asarray(_batch(seq2seq, seed=6)[0].numpy())
  mask = jnp.ones_like(ids)
  cached = generate(
    base, input_ids=ids, attention_mask=mask, prefix=prompted.prefix(len(ids)), max_new_tokens=5, eos_id=-1
  )["tokens"]
  np.testing.assert_array_equal(np.asarray(cached), _uncached_greedy(prompted, ids, mask, seq2seq, 5))


def _uncached_greedy(model: PromptedModel, ids, mask, seq2seq: bool, steps: int, prompt_ids=None) -> np.ndarray:
  """Greedy decoding by full forward passes, no cache: one fixed-shape jitted pass per step over the sequence
  so far (later slots are placeholders that causal attention keeps from the logits read)."""
  b, length = ids.shape
  if seq2seq:
    fwd = nnx.jit(lambda m, dec: m(ids, mask, dec, prompt_ids=prompt_ids))
    dec = jnp.zeros((b, steps + 1), jnp.int32)
    for t in range(steps):
      dec = dec.at[:, t + 1].set(jnp.argmax(fwd(model, dec)[:, t], -1).astype(jnp.int32))
    return np.asarray(dec[:, 1:])
  fwd = nnx.jit(lambda m, seq: m(seq, jnp.ones_like(seq), prompt_ids=prompt_ids))
  seq = jnp.concatenate([ids, jnp.zeros((b, steps), jnp.int32)], 1)
  for t in range(steps):
    seq = seq.at[:, length + t].set(jnp.argmax(fwd(model, seq)[:, length + t - 1], -1).astype(jnp.int32))
  return np.asarray(seq[:, length:])


@pytest.mark.parametrize("method", list(METHOD_OVERRIDES))
def test_only_the_method_trains(byte_t5, method):
  """The optimizer holds state for the method's PromptParams only (encoders included), every one of them moves,
  and the frozen weights stay bitwise unchanged."""
  from jaxprompt.data.pipeline import BatchStream

  cfg = tiny_cfg(byte_t5, **{"prompt.length": P, "model.dropout": 0.1, **METHOD_OVERRIDES[method]})
  run, (data,) = build_run(cfg, mesh=one_device())
  tx = build_optimizer(cfg.optimizer, cfg.train.steps)
  step, opt = jit_train_step(run, tx, z_loss=1e-4)
  shapes = {x.shape for x in jax.tree.leaves(run.prompt)}
  # Adafactor: a second moment per leaf (factored rows/columns for matrices of 128+) and step counters
  assert all(x.size <= 1 or x.shape in shapes or x.ndim == 1 for x in jax.tree.leaves(opt))
  assert sum(x.size for x in jax.tree.leaves(opt)) <= sum(x.size for x in jax.tree.leaves(run.prompt)) + 64
  frozen_before = jax.tree.map(np.asarray, run.frozen)
  stream = BatchStream(run.encode(data.examples, "train"), cfg.train.batch_size)
  prompt = run.prompt
  for i in range(3):
    prompt, opt, m = step(prompt, opt, run.frozen, run.device_batch(next(stream)), jnp.asarray(i))
  moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(prompt), jax.tree.leaves(run.prompt), strict=True)]
  assert all(moved), moved
  for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(jax.tree.map(np.asarray, run.frozen)), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("method", ["prefix-projection", "p-tuning-lstm"])
def test_resuming_a_reparameterised_method_is_exact(byte_t5, trained_here, tmp_path, method):
  """The checkpoint keeps the MLP / LSTM (PEFT's file keeps only their output), with the LSTM's dropout RNG: an
  interrupted run resumes to the uninterrupted one's parameters, bit for bit."""
  over = {"prompt.length": P, "model.dropout": 0.1, **METHOD_OVERRIDES[method]}
  full = trained_here(byte_t5, method)  # `_trained`: this config, 6 steps without a stop
  # the same run "killed" at step 3, then resumed from its checkpoint to the end (helpers.train_interrupted's split)
  train(tiny_cfg(byte_t5, **over, **{"train.steps": 3}), tmp_path / "split", progress=False, mesh=one_device())
  train(tiny_cfg(byte_t5, **over), tmp_path / "split", progress=False, mesh=one_device())

  def final(w):
    return Checkpointer.reader(w / "checkpoints").restore_prompt(6)[0]

  a, b = final(full), final(tmp_path / "split")
  assert jax.tree.structure(a) == jax.tree.structure(b) and len(jax.tree.leaves(a)) > 2  # the encoder is there
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def test_generate_cli_serves_prefix_and_p_tuning_prompts(byte_llama, trained_here, tmp_path, capsys):
  prefix, p_tuning = (trained_here(byte_llama, method) for method in ("prefix", "p-tuning-lstm"))
  (tmp_path / "in.txt").write_text("\n".join(TEXTS) + "\n")
  assert (
    main(
      [
        "generate",
        "--prompt",
        str(prefix),
        "--prompt",
        str(prefix),
        "--input-file",
        str(tmp_path / "in.txt"),
        "--max-new-tokens",
        "4",
        "--jsonl",
      ]
    )
    == 0
  )
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  want = inference.generate_text(
    load_model(byte_llama), load_tokenizer(byte_llama), TEXTS, [load_prompt_source(prefix)], max_new_tokens=4
  )
  assert [r["tokens"] for r in rows] == [w["tokens"] for w in want] * 2  # a bank of two prefixes, prompt-major
  # input-embedding prompts and key/value prefixes cannot share a batch
  code = main(["generate", "--prompt", str(prefix), "--prompt", str(p_tuning), "--input", "9"])
  assert code == 2 and "cannot share a batch" in capsys.readouterr().err


def test_inapplicable_method_options_are_one_line_errors():
  for over, message in [
    (["prompt.prefix_projection=true"], "prompt.prefix_projection applies to method prefix_tuning, not prompt_tuning"),
    (["prompt.method=prefix_tuning"], "prompt.init class_labels does not apply to method prefix_tuning"),
    (["prompt.method=p_tuning", "prompt.encoder_dropout=0.1"], "prompt.encoder_dropout applies to the LSTM encoder"),
    (
      ["prompt.method=prefix_tuning", "prompt.init=random_uniform", "prompt.encoder_hidden_size=8"],
      "prompt.encoder_hidden_size applies to prefix_tuning with prompt.prefix_projection: true",
    ),
    (["prompt.method=deep"], "prompt.method: 'deep' is not one of"),
  ]:
    with pytest.raises(C.ConfigError, match=message):
      C.load(None, over)


# -- the shipped configs on the quickstart model ---------------------------------------------------------------

# the dev accuracy each shipped config must reach on the built-in quickstart model (no prompt: 0.11). Measured
# (README's methods table) on the base a plain `jaxprompt train` pre-trains / the one test processes pre-train:
# prefix_tuning 0.734 / 0.872, p_tuning_v2 0.694 / 0.752, p_tuning 0.980 / 0.910; residual 0.978, dept 0.990
# (the first only)
METHOD_CONFIGS = {"prefix_tuning": 0.65, "p_tuning_v2": 0.62, "p_tuning": 0.85, "residual": 0.9, "dept": 0.9}


@pytest.fixture(scope="module")
def quickstart_cache():
  import os

  mp = pytest.MonkeyPatch()  # the user's cache: the base model is pre-trained at most once
  mp.setenv(
    "JAXPROMPT_CACHE",
    os.environ.get("JAXPROMPT_CACHE")
    or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "jaxprompt"),
  )
  yield
  mp.undo()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(METHOD_CONFIGS))
def test_shipped_method_configs_learn_the_quickstart_task(quickstart_cache, tmp_path, name):
  from pathlib import Path

  root = Path(__file__).resolve().parent.parent
  cfg = C.load(root / "configs" / "methods" / f"{name}.yaml", ["train.plot=false"])
  with fully_optimized():  # the shipped config's steps
    summary = train(cfg, tmp_path, progress=False, mesh=one_device())
  n = sum(x.size for x in jax.tree.leaves(load_prompt_source(tmp_path).params))
  print(
    f"{name}: best dev accuracy {summary.best_value:.3f} at step {summary.best_step}, {n} trained "
    f"parameters, {summary.train_seconds:.0f} s"
  )
  assert summary.best_value >= METHOD_CONFIGS[name]
