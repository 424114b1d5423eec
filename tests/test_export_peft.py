"""Prompts trained in JAX, used in PyTorch through HF PEFT (and back): for T5 (ReLU + tied head, gated-GELU +
untied head), Llama (GQA) and GPT-2 bases, PEFT loads our export and gives our logits (1e-4), our loss and our
greedy generations; the quickstart exported `--with-base` runs in PyTorch alone; adapters that PEFT itself
created import into jaxprompt (`prompt.init: file`, `jaxprompt generate --prompt DIR`) and give PEFT's logits.

PEFT and positions (decoders): PEFT prepends the prompt to every row and drops any `position_ids` ("Position ids
are not supported for parameter efficient tuning"), so a model counts positions by slot: 0..P+L-1 in a forward
pass, exactly as jaxprompt trains. In a *left-padded* batch that means PEFT's `generate` counts the padding too,
and a padded row decodes differently from the same row alone. jaxprompt's `generate` counts positions from each
row's first real token (as transformers' generate does without PEFT), so every row decodes as it would alone:
the same as PEFT on that row alone, and as PEFT on unpadded rows of the batch. The padded rows of PEFT's batch are
checked against our model run with slot positions, which is what PEFT does.
"""

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxprompt import config as C
from jaxprompt.batches import Seq2SeqBatch
from jaxprompt.data import encoding
from jaxprompt.inference import text as inference
from jaxprompt.losses import cross_entropy
from jaxprompt.prompts.export import export_prompt
from jaxprompt.prompts.io import load_trained_prompt
from jaxprompt.run import build_run
from jaxprompt.training.trainer import train
from tests.helpers import one_device, run_cli, tiny_cfg, write_byte_decoder
from tests.helpers_hf import write_t5

TOL = 1e-4  # whole-model float32 tolerance (DESIGN.md); never loosened
P_LEN = 4
NEW = 8  # new tokens in generation tests
TEXTS = ["3 7 1 8 2", "hi", "a somewhat longer input, 42"]  # different lengths: padded batches


def _byte_t5(folder, variant, seed):
  from transformers import ByT5Tokenizer

  folder = write_t5(folder, variant, vocab_size=384, seed=seed)
  ByT5Tokenizer().save_pretrained(folder)
  return folder


BASES = {
  "t5-relu-tied": ("seq2seq", lambda f: _byte_t5(f, "t5-relu-tied", 21)),
  "t5v11-gated-untied": ("seq2seq", lambda f: _byte_t5(f, "t5v11-gated-untied", 22)),
  "llama-gqa": ("causal", lambda f: write_byte_decoder(f, "llama3-gqa-untied", seed=23)),
  "gpt2": ("causal", lambda f: write_byte_decoder(f, "gpt2", seed=24)),
}


@pytest.fixture(scope="module", params=list(BASES))
def trained(request, tmp_path_factory):
  """A base written by transformers, a prompt trained on it for a few steps by `jaxprompt.loop.train`, and
  its PEFT export."""
  name = request.param
  kind, write = BASES[name]
  root = tmp_path_factory.mktemp(name)
  folder = write(root / "base")
  cfg = tiny_cfg(folder, **{"prompt.length": P_LEN, "train.steps": 3})
  train(cfg, root / "work", progress=False, mesh=one_device())
  adapter = export_prompt(root / "work", "peft", root / "adapter")
  value, _ = load_trained_prompt(root / "work")
  run, _ = build_run(cfg, mesh=one_device(), with_train_data=False)
  return dict(name=name, kind=kind, folder=folder, cfg=cfg, work=root / "work", adapter=adapter, value=value, run=run)


def _torch_base(kind, folder):
  from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

  cls = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
  return cls.from_pretrained(folder).eval()


def _peft(kind, folder, adapter):
  from peft import PeftModel

  return PeftModel.from_pretrained(_torch_base(kind, folder), adapter).eval()


def _ours(run, value):
  return nnx.merge(run.graphdef, {"prompt": {"embeddings": jnp.asarray(value)}}, run.frozen)


def _t(a):
  return torch.tensor(np.asarray(a), dtype=torch.long)


def _until_eos(row, eos) -> list[int]:
  row = list(map(int, row))
  return row[: row.index(eos) + 1] if eos in row else row


def test_peft_gives_our_logits_and_loss(trained):
  kind, run, value = trained["kind"], trained["run"], trained["value"]
  acfg = json.loads((trained["adapter"] / "adapter_config.json").read_text())
  assert acfg["task_type"] == {"seq2seq": "SEQ_2_SEQ_LM", "causal": "CAUSAL_LM"}[kind]
  assert (acfg["peft_type"], acfg["num_virtual_tokens"], acfg["token_dim"]) == ("PROMPT_TUNING", P_LEN, 32)
  peft_model = _peft(kind, trained["folder"], trained["adapter"])
  np.testing.assert_array_equal(peft_model.get_prompt_embedding_to_save("default").numpy(), value)
  model = _ours(run, value)
  tok = run.tokenizer
  examples = [{"inputs": t, "targets": y} for t, y in zip(TEXTS, ["8", "hello", "x y"], strict=True)]
  arrays = encoding.encode(run.base.batch_type, examples, tok, input_length=16, target_length=6)
  logits, targets, mask = nnx.jit(lambda m, b: m.score_targets(b))(model, jax.tree.map(jnp.asarray, arrays))
  sums = jax.jit(cross_entropy)(logits, targets, mask)
  ours_loss = float(sums.ce / sums.tokens)
  labels = arrays.hf_inputs()["labels"]  # -100 where there is no loss
  with torch.no_grad():
    if kind == "seq2seq":
      ids, m = arrays.input_ids, arrays.input_mask  # right-padded
      dec = np.concatenate([np.zeros((3, 1), np.int32), arrays.target_ids[:, :-1]], axis=1)
      ref = peft_model(input_ids=_t(ids), attention_mask=_t(m), decoder_input_ids=_t(dec)).logits.numpy()
      ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(m), jnp.asarray(dec)))
      ref_loss = peft_model(input_ids=_t(ids), attention_mask=_t(m), labels=_t(labels)).loss.item()
    else:
      # the training layout (right padding) and the generation layout (left padding): all positions see the
      # prompt, so every logit is defined, prompt positions included ([B, P + L, V])
      ids, m = arrays.tokens, arrays.token_mask
      left_ids, left_m = encoding.encode_inputs(run.base.batch_type, tok, TEXTS)
      ref = [
        peft_model(input_ids=_t(i), attention_mask=_t(mm)).logits.numpy() for i, mm in ((ids, m), (left_ids, left_m))
      ]
      ours = [
        np.asarray(model.full_logits(jnp.asarray(i), jnp.asarray(mm))) for i, mm in ((ids, m), (left_ids, left_m))
      ]
      assert ours[0].shape == (3, P_LEN + ids.shape[1], 384)
      # PEFT labels the prompt positions -100; HF shifts the labels inside the loss
      ref_loss = peft_model(input_ids=_t(ids), attention_mask=_t(m), labels=_t(labels)).loss.item()
  if kind == "causal":
    diff = max(np.abs(np.asarray(o) - np.asarray(r)).max() for o, r in zip(ours, ref, strict=True))
  else:
    diff = np.abs(ours - ref).max()
  print(f"{trained['name']}: PEFT vs ours max |logit diff| {diff:.2e}, loss {ref_loss:.6f} vs {ours_loss:.6f}")
  if kind == "causal":
    for o, r in zip(ours, ref, strict=True):
      np.testing.assert_allclose(o, r, atol=TOL, rtol=TOL)
  else:
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=TOL)
  np.testing.assert_allclose(ours_loss, ref_loss, rtol=TOL)


def _slot_position_greedy(model, ids, mask, steps):
  """Greedy decoding as PEFT does it on a left-padded batch: [prompt, padding, input, new tokens] at positions
  0, 1, 2, ... by slot (padding counted), recomputed without a cache."""
  b, length = ids.shape
  m = jnp.concatenate([jnp.ones((b, P_LEN), jnp.int32), jnp.asarray(mask), jnp.ones((b, steps), jnp.int32)], 1)
  fwd = nnx.jit(lambda model, seq: model.full_logits(seq, m[:, P_LEN:]))  # the prompt goes in front
  seq = np.concatenate([ids, np.zeros((b, steps), ids.dtype)], axis=1)
  for t in range(steps):
    seq[:, length + t] = np.asarray(fwd(model, jnp.asarray(seq)))[:, P_LEN + length + t - 1].argmax(-1)
  return seq[:, length:]


def peft_greedy(peft_model, ids, mask, eos) -> list[tuple[list[int], float]]:
  """PEFT's greedy generations (new tokens up to EOS) and the sum of their log-probabilities."""
  # Decoders without PEFT's KV cache: with transformers 5.24 (PEFT 0.21) a causal prompt-tuning model's cached
  # generate() drops the soft prompt after the first new token (5.23 is fine; cf. huggingface/peft#2123).
  causal = not peft_model.config.is_encoder_decoder
  with torch.no_grad():
    out = peft_model.generate(
      input_ids=_t(ids),
      attention_mask=_t(mask),
      max_new_tokens=NEW,
      do_sample=False,
      output_logits=True,
      return_dict_in_generate=True,
      use_cache=not causal,
    )
  logp = torch.stack(out.logits, 1).log_softmax(-1).numpy()  # [B, T, V]
  new = out.sequences.numpy()[:, -logp.shape[1] :]  # T5: after the decoder start; decoders: after the input
  rows = []
  for b in range(len(new)):
    toks = _until_eos(new[b], eos)
    rows.append((toks, float(sum(logp[b, t, k] for t, k in enumerate(toks)))))
  return rows


def check_generations(ours: list[dict], ref: list[tuple[list[int], float]]):
  """Same tokens, and scores (summed log-probabilities: they see any difference in the logits) within TOL."""
  assert [r["tokens"] for r in ours] == [toks for toks, _ in ref]
  np.testing.assert_allclose([r["score"] for r in ours], [sc for _, sc in ref], atol=TOL, rtol=TOL)


def test_peft_greedy_generation_equals_ours(trained):
  kind, run, value = trained["kind"], trained["run"], trained["value"]
  tok = run.tokenizer
  eos = tok.eos_token_id
  peft_model = _peft(kind, trained["folder"], trained["adapter"])
  ours = inference.generate_text(run.base, tok, TEXTS, [value], max_new_tokens=NEW)
  if kind == "seq2seq":
    enc = tok(TEXTS, padding=True, return_tensors="np")  # right padding, as in training
    check_generations(ours, peft_greedy(peft_model, enc["input_ids"], enc["attention_mask"], eos))
    return
  ids, mask = encoding.encode_inputs(run.base.batch_type, tok, TEXTS)  # left padding
  batch = peft_greedy(peft_model, ids, mask, eos)
  alone = [
    peft_greedy(peft_model, ids[i : i + 1, mask[i] == 1], mask[i : i + 1, mask[i] == 1], eos)[0]
    for i in range(len(TEXTS))
  ]
  check_generations(ours, alone)  # every row decodes as it does alone
  for i in range(len(TEXTS)):
    if mask[i].all():  # unpadded rows of PEFT's batch agree with ours as they are
      check_generations(ours[i : i + 1], batch[i : i + 1])
  # PEFT's padded rows: positions count the padding
  slots = _slot_position_greedy(_ours(run, value), ids, mask, NEW)
  assert [toks for toks, _ in batch] == [_until_eos(r, eos) for r in slots]
  print(
    f"{trained['name']}: left-padded rows PEFT decodes differently from alone: "
    f"{sum(batch[i][0] != ours[i]['tokens'] for i in range(len(TEXTS)))}/{len(TEXTS)}"
  )


# -- the quickstart, exported --with-base, in PyTorch alone --------------------------------------------


@pytest.fixture(scope="module")
def quickstart_export(tmp_path_factory):
  """A short quickstart run (its base model pre-trained at most once, into the user's cache) exported with
  --with-base."""
  mp = pytest.MonkeyPatch()
  mp.setenv(
    "JAXPROMPT_CACHE",
    os.environ.get("JAXPROMPT_CACHE")
    or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "jaxprompt"),
  )
  root = tmp_path_factory.mktemp("quickstart_export")
  root_dir = Path(__file__).resolve().parent.parent
  cfg = C.load(
    root_dir / "configs" / "quickstart.yaml",
    ["train.steps=100", "eval.every=0", "checkpoint.async_save=false", "train.plot=false"],
  )
  summary = train(cfg, root / "work", progress=False, mesh=one_device())
  out = export_prompt(root / "work", "peft", root / "adapter", with_base=True)
  yield cfg, root / "work", out, summary
  mp.undo()


@pytest.mark.slow
def test_quickstart_with_base_runs_in_pytorch_and_predicts_as_jaxprompt_generate(quickstart_export, tmp_path, capsys):
  from peft import PeftModel
  from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

  from jaxprompt.run import task_data

  cfg, work, out, summary = quickstart_export
  acfg = json.loads((out / "adapter_config.json").read_text())
  assert acfg["base_model_name_or_path"] == str((out / "base").absolute())
  assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= {p.name for p in (out / "base").iterdir()}
  # PyTorch alone: base, tokenizer and adapter from the export folder
  tok = AutoTokenizer.from_pretrained(out / "base")
  peft_model = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(out / "base").eval(), out).eval()
  dev = task_data(cfg.data, "validation").examples[:48]
  texts = [ex["inputs"] for ex in dev]
  enc = tok(texts, padding=True, return_tensors="pt")
  with torch.no_grad():
    gen = peft_model.generate(
      input_ids=enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=4, do_sample=False
    )
  torch_preds = tok.batch_decode(gen, skip_special_tokens=True)
  (tmp_path / "dev.txt").write_text("\n".join(texts) + "\n")
  jax_preds = run_cli(capsys, "generate", "--prompt", work, "--input-file", tmp_path / "dev.txt", "--max-new-tokens", 4)
  assert jax_preds == torch_preds
  # and from the export folder (its provenance names the built-in base)
  assert (
    run_cli(capsys, "generate", "--prompt", out, "--input-file", tmp_path / "dev.txt", "--max-new-tokens", 4)
    == torch_preds
  )
  acc = np.mean([p == ex["targets"] for p, ex in zip(torch_preds, dev, strict=True)])
  print(
    f"quickstart (100 steps, dev accuracy {summary.best_value:.3f}) in PyTorch + PEFT: {acc:.3f} of "
    f"{len(dev)} dev examples right, predictions identical to `jaxprompt generate`"
  )
  # logits on the dev examples
  run, _ = build_run(cfg, mesh=one_device(), with_train_data=False)
  value, _ = load_trained_prompt(out)
  arrays = encoding.encode(Seq2SeqBatch, dev[:8], run.tokenizer, input_length=20, target_length=4)
  dec = np.concatenate([np.zeros((8, 1), np.int32), arrays.target_ids[:, :-1]], axis=1)
  with torch.no_grad():
    ref = peft_model(
      input_ids=_t(arrays.input_ids), attention_mask=_t(arrays.input_mask), decoder_input_ids=_t(dec)
    ).logits.numpy()
  ours = np.asarray(_ours(run, value)(jnp.asarray(arrays.input_ids), jnp.asarray(arrays.input_mask), jnp.asarray(dec)))
  print(f"quickstart: PEFT vs ours max |logit diff| {np.abs(ours - ref).max():.2e}")
  np.testing.assert_allclose(ours, ref, atol=TOL, rtol=TOL)


# -- adapters made by PEFT, imported into jaxprompt -----------------------------------------------------


@pytest.fixture(scope="module")
def peft_made(tmp_path_factory):
  """Adapters created by PEFT itself (random init, save_pretrained) on a T5 and a Llama base."""
  from peft import PromptTuningConfig, TaskType, get_peft_model

  root = tmp_path_factory.mktemp("peft_made")
  out = {}
  for name, task in (("t5v11-gated-untied", TaskType.SEQ_2_SEQ_LM), ("llama-gqa", TaskType.CAUSAL_LM)):
    kind, write = BASES[name]
    folder = write(root / name)
    torch.manual_seed(0)
    peft_model = get_peft_model(_torch_base(kind, folder), PromptTuningConfig(task_type=task, num_virtual_tokens=5))
    peft_model.save_pretrained(root / f"{name}-adapter")
    out[name] = (kind, folder, root / f"{name}-adapter")
  return out


@pytest.mark.parametrize("name", ["t5v11-gated-untied", "llama-gqa"])
def test_peft_made_adapter_imports_and_gives_peft_logits(peft_made, name, tmp_path, capsys):
  from peft import PeftModel
  from safetensors.numpy import load_file

  kind, folder, adapter = peft_made[name]
  stored = load_file(adapter / "adapter_model.safetensors")["prompt_embeddings"]
  # PEFT's seq2seq default num_transformer_submodules=2 stores [2P, H]; PROMPT_TUNING reads the first P rows
  assert stored.shape == ((10 if kind == "seq2seq" else 5), 32)
  peft_model = PeftModel.from_pretrained(_torch_base(kind, folder), adapter).eval()
  cfg = tiny_cfg(folder, **{"prompt.length": 5, "prompt.init": "file", "prompt.init_file": str(adapter)})
  run, _ = build_run(cfg, mesh=one_device(), with_train_data=False)
  np.testing.assert_array_equal(_prompt_value(run), stored[:5])
  model = _ours(run, _prompt_value(run))
  tok = run.tokenizer
  if kind == "seq2seq":
    enc = tok(TEXTS, padding=True, return_tensors="np")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    dec = np.random.default_rng(0).integers(3, 300, (3, 5))
    with torch.no_grad():
      ref = peft_model(input_ids=_t(ids), attention_mask=_t(mask), decoder_input_ids=_t(dec)).logits.numpy()
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(dec)))
  else:
    ids, mask = encoding.encode_inputs(run.base.batch_type, tok, TEXTS)
    with torch.no_grad():
      ref = peft_model(input_ids=_t(ids), attention_mask=_t(mask)).logits.numpy()[:, 5:]  # real positions only
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  print(f"PEFT-made {name} adapter: PEFT vs ours max |logit diff| {np.abs(ours - ref).max():.2e}")
  np.testing.assert_allclose(ours, ref, atol=TOL, rtol=TOL)
  # `jaxprompt generate --prompt DIR`: base (PEFT's base_model_name_or_path) and tokenizer found from the adapter
  (tmp_path / "in.txt").write_text("\n".join(TEXTS) + "\n")
  got = [
    json.loads(line)
    for line in run_cli(
      capsys, "generate", "--prompt", adapter, "--input-file", tmp_path / "in.txt", "--max-new-tokens", NEW, "--jsonl"
    )
  ]
  eos = tok.eos_token_id
  if kind == "seq2seq":
    check_generations(got, peft_greedy(peft_model, ids, mask, eos))
  else:  # row by row (see the module docstring on PEFT and left padding)
    check_generations(
      got,
      [peft_greedy(peft_model, ids[i : i + 1, mask[i] == 1], mask[i : i + 1, mask[i] == 1], eos)[0] for i in range(3)],
    )


def _prompt_value(run) -> np.ndarray:
  """The run's prompt as inference uses it."""
  return np.asarray(nnx.merge(run.graphdef, run.prompt, run.frozen).prompt.inference_value())
