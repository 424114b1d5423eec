"""Adaption prompts (LLaMA-Adapter, PEFT's ADAPTION_PROMPT): adapters PEFT made on a tiny Llama (GQA), a Llama with
attention biases (o_proj's bias reaches the adapter's output, as in PEFT) and GPT-2 (no o-projection there) give
PEFT's logits; a fresh adaption prompt leaves the base as it was (zero gate); training here moves only the prompts
and gates, resumes exactly, and exports to PEFT with our logits and greedy generations; served prompts (both
schedulers) generate what `generate` does; T5 and PEFT-less model types are refused in one line."""

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxprompt import load_prompted
from jaxprompt.checkpoint import Checkpointer
from jaxprompt.cli import main
from jaxprompt.data import encoding
from jaxprompt.errors import ExportError, PromptError
from jaxprompt.inference import text as inference
from jaxprompt.models.hf import Architecture
from jaxprompt.prompts.adaption import AdaptionSpec
from jaxprompt.prompts.export import export_prompt, peft_config
from jaxprompt.prompts.io import load_prompt_source
from jaxprompt.prompts.record import PromptRecord
from jaxprompt.run import build_run
from jaxprompt.training.optim import build_optimizer
from tests.helpers import one_device, tiny_cfg, train_interrupted, write_byte_decoder

TOL = 1e-4  # whole-model float32 tolerance (DESIGN.md)
A = 3  # adapter length
TEXTS = ["3 7 1 8 2", "hi", "a somewhat longer input, 42"]
ADAPTION = {
  "prompt.method": "adaption",
  "prompt.length": A,
  "prompt.init": "random_normal",
  "prompt.adaption_layers": 1,
}


def _t(a):
  return torch.tensor(np.asarray(a), dtype=torch.long)


def _torch(folder):
  from transformers import AutoModelForCausalLM

  return AutoModelForCausalLM.from_pretrained(folder).eval()


def _peft(folder, adapter):
  from peft import PeftModel

  return PeftModel.from_pretrained(_torch(folder), adapter).eval()


def _check_logits(model, peft_model, tok) -> float:
  """Ours against PEFT's at every real position, left- and right-padded (a padded query position attends to no
  key: there the two frameworks' conventions differ, and nothing reads it)."""
  right = tok(TEXTS, padding=True, return_tensors="np")
  diff = 0.0
  for ids, mask in (
    encoding.encode_inputs(model.base.batch_type, tok, TEXTS),
    (right["input_ids"], right["attention_mask"]),
  ):
    with torch.no_grad():
      ref = peft_model(input_ids=_t(ids), attention_mask=_t(mask)).logits.numpy()
    ours = np.asarray(model.full_logits(jnp.asarray(ids), jnp.asarray(mask)))
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=TOL, rtol=TOL)
    diff = max(diff, float(np.abs(ours[real] - ref[real]).max()))
  return diff


@pytest.mark.parametrize("variant, layers", [("llama3-gqa-untied", 1), ("llama-tied-bias", 2), ("gpt2", 1)])
def test_a_peft_made_adapter_gives_peft_logits(variant, layers, tmp_path):
  from peft import AdaptionPromptConfig, TaskType, get_peft_model

  from jaxprompt.models.loading import load_tokenizer

  folder = write_byte_decoder(tmp_path / "m", variant, seed=7)
  torch.manual_seed(0)
  cfg = AdaptionPromptConfig(task_type=TaskType.CAUSAL_LM, adapter_len=A, adapter_layers=layers)
  model = get_peft_model(_torch(folder), cfg)
  with torch.no_grad():  # PEFT's gates start at 0 (the base model exactly): give each layer its own
    for k, (_, p) in enumerate(n for n in model.named_parameters() if "adaption_gate" in n[0]):
      p.fill_(0.5 + 0.3 * k)
  model.save_pretrained(tmp_path / "adapter")
  ours = load_prompted(folder, tmp_path / "adapter")
  tp = load_prompt_source(tmp_path / "adapter")
  assert tp.value.shape == (layers, A + 1, 32) and tp.spec == AdaptionSpec(num_layers=2)
  diff = _check_logits(ours, _peft(folder, tmp_path / "adapter"), load_tokenizer(str(folder)))
  print(f"PEFT-made adaption prompt on {variant} (top {layers} layers): max |logit diff| {diff:.2e}")


def test_a_fresh_adaption_prompt_is_the_base_model_and_t5_is_refused(byte_llama, byte_t5):
  run, _ = build_run(tiny_cfg(byte_llama, **ADAPTION), mesh=one_device(), with_train_data=False)
  p = run.prompt["prompt"]
  assert p["prompt"].shape == (1, A, 32) and np.all(np.asarray(p["gate"]) == 0)
  assert abs(float(np.std(p["prompt"])) - 1.0) < 0.3  # PEFT's N(0, 1)
  from flax import nnx

  ids = jnp.asarray([[5, 6, 7, 8], [0, 0, 9, 10]])
  mask = jnp.asarray([[1, 1, 1, 1], [0, 0, 1, 1]])
  prompted = nnx.merge(run.graphdef, run.prompt, run.frozen)
  # (up to float rounding: the adapter's zero output changes how XLA fuses the layer, not what it computes)
  np.testing.assert_allclose(
    np.asarray(prompted.full_logits(ids, mask)), np.asarray(run.base(ids, mask)), atol=1e-5, rtol=0
  )
  with pytest.raises(PromptError, match="adaption prompts need a decoder-only model"):
    build_run(tiny_cfg(byte_t5, **ADAPTION), mesh=one_device(), with_train_data=False)


@pytest.fixture(scope="module")
def trained(byte_llama, tmp_path_factory):
  """An adaption run (top layer of 2) interrupted at step 3 and resumed, the same run uninterrupted, its export."""
  root = tmp_path_factory.mktemp("adaption")
  over = {**ADAPTION, "optimizer.name": "adam", "optimizer.learning_rate": 0.05}
  train_interrupted(
    tiny_cfg(byte_llama, **over), tiny_cfg(byte_llama, **over, **{"train.steps": 3}), root, one_device()
  )
  return root, export_prompt(root / "full", "peft", root / "adapter")


def test_training_moves_prompts_and_gates_only_and_resumes_exactly(byte_llama, trained):
  root, _ = trained
  a, b = (Checkpointer.reader(root / w / "checkpoints").restore_prompt(6)[0] for w in ("full", "split"))
  assert {k: np.shape(v) for k, v in a["prompt"].items()} == {"prompt": (1, A, 32), "gate": (1,)}
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
  assert float(np.abs(a["prompt"]["gate"]).max()) > 0  # the gate opened
  from jaxprompt.data.pipeline import BatchStream
  from jaxprompt.training.step import make_train_step

  cfg = tiny_cfg(byte_llama, **ADAPTION, **{"optimizer.name": "adam", "model.dropout": 0.0})
  run, (data,) = build_run(cfg, mesh=one_device())
  tx = build_optimizer(cfg.optimizer, cfg.train.steps, {})
  opt = tx.init(run.prompt)
  shapes = {x.shape for x in jax.tree.leaves(run.prompt)}
  assert all(x.shape in shapes or x.size <= 1 for x in jax.tree.leaves(opt))
  frozen_before = jax.tree.map(np.asarray, run.frozen)
  batch = run.device_batch(next(BatchStream(run.encode(data.examples, "train"), cfg.train.batch_size)))
  prompt, _, _ = jax.jit(make_train_step(run.graphdef, tx, z_loss=0.0, microbatches=1))(
    run.prompt, opt, run.frozen, batch, jnp.asarray(0)
  )
  assert float(np.abs(prompt["prompt"]["gate"]).max()) > 0  # a zero gate still gets a gradient
  for x, y in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(jax.tree.map(np.asarray, run.frozen)), strict=True):
    np.testing.assert_array_equal(x, y)


def test_the_peft_export_gives_our_logits_and_greedy_generations(byte_llama, trained):
  from jaxprompt.models.loading import load_tokenizer

  root, out = trained
  acfg = json.loads((out / "adapter_config.json").read_text())
  assert {k: acfg[k] for k in ("peft_type", "adapter_len", "adapter_layers", "target_modules")} == {
    "peft_type": "ADAPTION_PROMPT",
    "adapter_len": A,
    "adapter_layers": 1,
    "target_modules": "self_attn",
  }
  assert "num_virtual_tokens" not in acfg
  tok = load_tokenizer(str(byte_llama))
  peft_model = _peft(byte_llama, out)
  ours = load_prompted(byte_llama, root / "full")
  print(f"adaption prompt trained here, in PEFT: max |logit diff| {_check_logits(ours, peft_model, tok):.2e}")
  np.testing.assert_array_equal(load_prompt_source(out).value, load_prompt_source(root / "full").value)
  # greedy generation: each row alone in PEFT (KV cache on) against jaxprompt's padded batch
  tp = load_prompt_source(out)
  got = inference.generate_text(ours.base, tok, TEXTS, [tp], max_new_tokens=6)
  ids, mask = encoding.encode_inputs(ours.base.batch_type, tok, TEXTS)
  eos = tok.eos_token_id
  for i in range(len(TEXTS)):
    row = ids[i : i + 1, mask[i] == 1]
    with torch.no_grad():
      out_ids = peft_model.generate(input_ids=_t(row), max_new_tokens=6, do_sample=False)
    new = list(map(int, out_ids[0, row.shape[1] :]))
    assert got[i]["tokens"] == (new[: new.index(eos) + 1] if eos in new else new)


def test_served_adaption_prompts_generate_what_generate_does(byte_llama, trained, tmp_path):
  openai = pytest.importorskip("openai")
  from jaxprompt.serve.engine import Engine, Request
  from jaxprompt.serve.server import build, serving

  root, out = trained
  prompts = tmp_path / "prompts"
  prompts.mkdir()
  export_prompt(root / "full", "safetensors", prompts / "mine.safetensors")
  export_prompt(root / "split", "peft", prompts / "other", step=3)  # a second one: a bank of two in one batch
  app, engine, problems = build(str(byte_llama), prompts=str(prompts), max_batch=4, max_tokens=8, max_input_tokens=32)
  assert problems == []
  static = Engine(engine.base, engine.tokenizer, engine.store, scheduler="static", max_batch=4, max_tokens=8)
  static.start()  # the static batcher: the prompts' keys/values stacked in a bank
  try:
    with serving(app) as url:
      client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
      for name, src in (("mine", prompts / "mine.safetensors"), ("other", prompts / "other")):
        tp = load_prompt_source(src)
        want = [
          r["output"] for r in inference.generate_text(engine.base, engine.tokenizer, TEXTS, [tp], max_new_tokens=6)
        ]
        got = client.completions.create(model=name, prompt=TEXTS, max_tokens=6, temperature=0)
        assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == want
        prompt, results = engine.store.get(name), [[] for _ in TEXTS]
        texts = [inference.model_input(prompt.record, t) for t in TEXTS]
        pairs = zip(texts, results, strict=True)
        static.submit([Request("complete", prompt, t, engine.encode(t), r.append, max_tokens=6) for t, r in pairs])
        assert all(_waited(r) for r in results) and [r[0]["text"] for r in results] == want
  finally:
    static.stop()


def _waited(out: list, seconds: float = 120) -> bool:
  """Has a request's on_done (out.append) been called within `seconds`?"""
  deadline = time.monotonic() + seconds
  while not out and time.monotonic() < deadline:
    time.sleep(0.05)
  return bool(out)


def test_peft_less_model_types_are_refused_in_one_line(trained, tmp_path, capsys):
  root, _ = trained
  value = load_prompt_source(root / "full").value
  record = PromptRecord(spec=AdaptionSpec(num_layers=2), architecture=Architecture(kind="causal", model_type="qwen2"))
  with pytest.raises(
    ExportError, match="PEFT's ADAPTION_PROMPT supports model types llama, mistral, gpt2, not 'qwen2'"
  ):
    peft_config(value, record, None)
  capsys.readouterr()
  assert main(["export", str(root / "full"), "--format", "peft", "--out", str(tmp_path / "a"), "--step", "6"]) == 0
  config = str(Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml")
  over = ["--set", "prompt.method=adaption", "--set", "prompt.encoder_hidden_size=4"]
  assert main(["train", config, "--workdir", str(tmp_path / "w"), *over]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert (
    len(err) == 1 and "prompt.encoder_hidden_size applies to method prefix_tuning / p_tuning, not adaption" in err[0]
  )
