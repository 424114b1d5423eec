"""Cartridges (PEFT's CARTRIDGE) on a tiny random Llama with grouped-query attention: a cartridge initialised from a
text is exactly the model with that text in front; an adapter PEFT made with random weights gives PEFT's logits
(left- and right-padded batches); one trained here exports to PEFT with our logits and greedy generations; its
frozen attention sink does not move, it has no optimizer state, and training resumes exactly. The same on the tiny
byte-level T5, where a cartridge sits in the decoder's self-attention (a text's keys/values there, exact for the
empty encoder input they were computed with); `jaxprompt distill` refuses T5 in one line."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxprompt import load_prompted
from jaxprompt.checkpoint import Checkpointer
from jaxprompt.cli import main
from jaxprompt.data import encoding
from jaxprompt.errors import ExportError, PromptError
from jaxprompt.inference import text as inference
from jaxprompt.prompts.cartridge import CartridgeSpec
from jaxprompt.prompts.export import export_prompt
from jaxprompt.prompts.io import load_prompt_source
from jaxprompt.run import build_run
from jaxprompt.training.optim import build_optimizer
from tests.helpers import one_device, run_cli, tiny_cfg, train_interrupted

TOL = 1e-4  # whole-model float32 tolerance (DESIGN.md)
P = 6  # cartridge length
TEXT = "Once upon a time, a cat sat on a mat."
TEXTS = ["3 7 1 8 2", "hi", "a somewhat longer input, 42"]
CARTRIDGE = {"prompt.method": "cartridge", "prompt.length": P, "prompt.init": "text", "prompt.init_text": TEXT}


def run_tokenizer(folder):
  from jaxprompt.models.loading import load_tokenizer

  return load_tokenizer(str(folder))


def _t(a):
  return torch.tensor(np.asarray(a), dtype=torch.long)


def _peft(folder, adapter):
  from peft import PeftModel
  from transformers import AutoModelForCausalLM

  return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder).eval(), adapter).eval()


def _check_logits(model, peft_model, tok) -> float:
  """Ours against PEFT's at every real position, left- and right-padded (both count positions by slot, after the
  cartridge's P)."""
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


def test_a_cartridge_from_a_text_is_that_text_in_front(byte_llama):
  from jaxprompt.models.loading import load_tokenizer

  run, _ = build_run(tiny_cfg(byte_llama, **CARTRIDGE), mesh=one_device(), with_train_data=False)
  p = run.prompt["prompt"]
  assert p["sink"].shape == (1, 2, 2, 2, 8) and p["table"].shape == (P - 1, 2, 2, 2, 8)
  tok = load_tokenizer(str(byte_llama))
  text = tok(TEXT)["input_ids"][:P]
  query = jnp.asarray([tok("3 7 1 8 2")["input_ids"], tok("hello wor")["input_ids"]])  # two rows, no padding
  prompted = nnx.merge(run.graphdef, run.prompt, run.frozen)
  ours = np.asarray(prompted.full_logits(query, jnp.ones_like(query)))
  whole = jnp.concatenate([jnp.asarray([text, text]), query], axis=1)
  ref = np.asarray(run.base(whole, jnp.ones_like(whole)))[:, P:]
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
  print(f"cartridge from text vs the text in front: max |logit diff| {np.abs(ours - ref).max():.2e}")
  with pytest.raises(PromptError, match="prompt.init_text is 3 tokens; a cartridge of prompt.length 6"):
    build_run(tiny_cfg(byte_llama, **{**CARTRIDGE, "prompt.init_text": "ab"}), mesh=one_device(), with_train_data=False)


def test_a_peft_made_cartridge_gives_peft_logits(byte_llama, tmp_path):
  from peft import CartridgeConfig, TaskType, get_peft_model
  from transformers import AutoModelForCausalLM

  from jaxprompt.models.loading import load_tokenizer

  torch.manual_seed(0)
  cfg = CartridgeConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=P, num_frozen_tokens=2)
  get_peft_model(AutoModelForCausalLM.from_pretrained(byte_llama), cfg).save_pretrained(tmp_path / "adapter")
  tp = load_prompt_source(tmp_path / "adapter")
  assert tp.value.shape == (P, 2, 2, 2, 8) and tp.spec == CartridgeSpec(frozen_tokens=2)
  ours = load_prompted(byte_llama, tmp_path / "adapter")
  diff = _check_logits(ours, _peft(byte_llama, tmp_path / "adapter"), load_tokenizer(str(byte_llama)))
  print(f"PEFT-made cartridge (random N(0, 1)): max |logit diff| {diff:.2e}")


# -- T5: the decoder's self-attention, where PEFT puts a key/value prefix -------------------------------------


def _t5_batch():
  """Right-padded encoder inputs, decoder inputs from the start token with a padded row (PEFT puts P ones in front
  of the decoder mask)."""
  g = torch.Generator().manual_seed(0)
  ids = torch.randint(3, 250, (3, 7), generator=g)
  mask = torch.ones_like(ids)
  mask[1, 5:] = 0
  dec = torch.cat([torch.zeros((3, 1), dtype=torch.long), torch.randint(3, 250, (3, 4), generator=g)], 1)
  dmask = torch.ones_like(dec)
  dmask[2, 3:] = 0
  return ids, mask, dec, dmask


def _check_t5_logits(model, peft_model) -> float:
  """Ours against PEFT's at every real decoder position."""
  ids, mask, dec, dmask = _t5_batch()
  with torch.no_grad():
    ref = peft_model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dmask).logits
  ours = np.asarray(model(*(jnp.asarray(a.numpy()) for a in (ids, mask, dec, dmask))))
  real = dmask.numpy().astype(bool)
  np.testing.assert_allclose(ours[real], ref.numpy()[real], atol=TOL, rtol=TOL)
  return float(np.abs(ours[real] - ref.numpy()[real]).max())


def test_a_t5_cartridge_from_a_text_is_that_text_in_front_of_the_decoder(byte_t5):
  """T5 (where PEFT's initialiser fails): the keys/values of the decoder start token and the text in the decoder's
  self-attention, reading an empty encoder input, one table layer per decoder layer (PEFT's T5 layout gives both
  decoder layers table layer 0, so its export is refused). Exact for that encoder input: past the first layer the
  decoder's keys/values read the encoder."""
  from jaxprompt.prompts import PromptedModel
  from jaxprompt.prompts.cartridge import text_table
  from jaxprompt.prompts.export import peft_config
  from jaxprompt.prompts.methods import bank, fixed
  from jaxprompt.prompts.record import PromptRecord

  run, _ = build_run(tiny_cfg(byte_t5, **CARTRIDGE), mesh=one_device(), with_train_data=False)
  spec, tok = run.prompt_spec, run.tokenizer
  assert run.base.prefix_slots().layer_of == (0, 0) and spec.slots.layer_of == (0, 1)
  assert run.prompt["prompt"]["sink"].shape == (1, 2, 2, 4, 8)
  assert CartridgeSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec  # the layout travels in records
  text = [0] + tok(TEXT)["input_ids"][: P - 1]  # the decoder start token, then the text
  enc = jnp.asarray([tok("")["input_ids"]] * 2)
  dec = jnp.asarray([[0] + tok("3 7")["input_ids"], [0] + tok("hi!")["input_ids"]])
  prompted = nnx.merge(run.graphdef, run.prompt, run.frozen)
  ours = np.asarray(prompted(enc, jnp.ones_like(enc), dec))
  ref = np.asarray(run.base(enc, jnp.ones_like(enc), jnp.concatenate([jnp.asarray([text, text]), dec], 1)))[:, P:]
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
  print(f"T5 cartridge from text vs the text in front of the decoder: max |logit diff| {np.abs(ours - ref).max():.2e}")
  # beside a cartridge in PEFT's layout in one batch, each row as alone
  value = np.asarray(prompted.prompt.inference_value())
  other = np.random.default_rng(0).normal(size=value.shape).astype(np.float32)
  specs = [spec, CartridgeSpec()]
  mixed = PromptedModel(run.base, bank([value, other], specs, run.base.prefix_slots()))
  got = np.asarray(mixed(enc, jnp.ones_like(enc), dec, prompt_ids=jnp.asarray([0, 1])))
  alone = PromptedModel(run.base, fixed(other, specs[1], run.base.prefix_slots()))
  np.testing.assert_allclose(got[0], ours[0], atol=1e-5, rtol=0)
  np.testing.assert_allclose(got[1], np.asarray(alone(enc, jnp.ones_like(enc), dec))[1], atol=1e-5, rtol=0)
  record = PromptRecord(spec=spec, base=run.identity, architecture=run.architecture())
  with pytest.raises(ExportError, match="PEFT cannot run this prefix: it holds each of the 2 attention layers' own"):
    peft_config(value, record, None)
  with pytest.raises(PromptError, match="is 3 tokens; a cartridge of prompt.length 6 on T5 needs 5"):
    text_table(run.base, tok, "ab", P)


def test_a_peft_made_t5_cartridge_gives_peft_logits(byte_t5, tmp_path):
  from peft import CartridgeConfig, PeftModel, TaskType, get_peft_model, initialize_kv_prefix_from_text

  from tests.helpers_hf import load_t5

  torch.manual_seed(0)
  cfg = CartridgeConfig(task_type=TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=P, num_frozen_tokens=2)
  made = get_peft_model(load_t5(byte_t5), cfg)
  with pytest.raises(ValueError):  # PEFT's initialiser runs the model without decoder inputs
    initialize_kv_prefix_from_text(made, run_tokenizer(byte_t5), text=TEXT, use_chat_template=False)
  made.save_pretrained(tmp_path / "adapter")
  tp = load_prompt_source(tmp_path / "adapter")
  assert tp.value.shape == (P, 2, 2, 4, 8) and tp.spec == CartridgeSpec(frozen_tokens=2)
  peft_model = PeftModel.from_pretrained(load_t5(byte_t5), tmp_path / "adapter").eval()
  diff = _check_t5_logits(load_prompted(byte_t5, tmp_path / "adapter"), peft_model)
  print(f"PEFT-made T5 cartridge (random N(0, 1)): max |logit diff| {diff:.2e}")


def test_a_t5_cartridge_trained_here_gives_our_logits_and_greedy_tokens_in_peft(byte_t5, tmp_path):
  """Randomly initialised (PEFT's layout), 3 Adam steps, exported to PEFT."""
  from peft import PeftModel

  from jaxprompt.training.trainer import train
  from tests.helpers_hf import load_t5

  over = {**CARTRIDGE, "prompt.init": "random_normal", "optimizer.name": "adam", "optimizer.learning_rate": 0.05}
  train(tiny_cfg(byte_t5, **over, **{"train.steps": 3}), tmp_path / "w", progress=False, mesh=one_device())
  out = export_prompt(tmp_path / "w", "peft", tmp_path / "adapter")
  acfg = json.loads((out / "adapter_config.json").read_text())
  assert (acfg["peft_type"], acfg["task_type"], acfg["num_transformer_submodules"]) == ("CARTRIDGE", "SEQ_2_SEQ_LM", 2)
  peft_model = PeftModel.from_pretrained(load_t5(byte_t5), out).eval()
  ours = load_prompted(byte_t5, tmp_path / "w")
  print(f"T5 cartridge trained here, in PEFT: max |logit diff| {_check_t5_logits(ours, peft_model):.2e}")
  tok = run_tokenizer(byte_t5)
  got = inference.generate_text(ours.base, tok, TEXTS, [load_prompt_source(out)], max_new_tokens=5)
  for i, text in enumerate(TEXTS):  # PEFT's greedy tokens by its forward, each row alone
    ids, dec = _t([tok(text)["input_ids"]]), torch.zeros((1, 1), dtype=torch.long)
    while dec.shape[1] <= 5 and int(dec[0, -1]) != tok.eos_token_id:
      with torch.no_grad():
        nxt = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=dec).logits[:, -1]
      dec = torch.cat([dec, nxt.argmax(-1, keepdim=True)], 1)
    assert got[i]["tokens"] == dec[0, 1:].tolist()


@pytest.fixture(scope="module")
def trained(byte_llama, tmp_path_factory):
  """A cartridge run interrupted at step 3 and resumed, the same run uninterrupted, its PEFT export."""
  root = tmp_path_factory.mktemp("cartridge")
  over = {**CARTRIDGE, "optimizer.name": "adam", "optimizer.learning_rate": 0.05}
  train_interrupted(
    tiny_cfg(byte_llama, **over), tiny_cfg(byte_llama, **over, **{"train.steps": 3}), root, one_device()
  )
  return root, export_prompt(root / "full", "peft", root / "adapter")


def test_training_keeps_the_sink_has_no_state_for_it_and_resumes_exactly(byte_llama, trained):
  root, _ = trained
  a, b = (Checkpointer.reader(root / w / "checkpoints").restore_prompt(6)[0] for w in ("full", "split"))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
  run, _ = build_run(tiny_cfg(byte_llama, **CARTRIDGE), mesh=one_device(), with_train_data=False)
  start = run.prompt["prompt"]
  np.testing.assert_array_equal(a["prompt"]["sink"], np.asarray(start["sink"]))  # the attention sink: bitwise
  assert float(np.abs(a["prompt"]["table"] - np.asarray(start["table"])).max()) > 1e-3  # the rest trained
  cfg = tiny_cfg(byte_llama, **CARTRIDGE, **{"optimizer.name": "adamw"})
  opt = build_optimizer(cfg.optimizer, 6, {"sink": 0.0}).init(run.prompt)
  sizes = sorted(x.size for x in jax.tree.leaves(opt) if x.size > 1)
  assert sizes == [start["table"].size] * 2  # Adam's two moments of the table, nothing of the sink


def test_the_peft_export_gives_our_logits_and_greedy_generations(byte_llama, trained):
  from jaxprompt.models.loading import load_tokenizer

  root, out = trained
  acfg = json.loads((out / "adapter_config.json").read_text())
  assert {k: acfg[k] for k in ("peft_type", "num_virtual_tokens", "num_frozen_tokens", "num_layers", "token_dim")} == {
    "peft_type": "CARTRIDGE",
    "num_virtual_tokens": P,
    "num_frozen_tokens": 1,
    "num_layers": 2,
    "token_dim": 16,
  }
  tok = load_tokenizer(str(byte_llama))
  peft_model = _peft(byte_llama, out)
  ours = load_prompted(byte_llama, root / "full")
  print(f"cartridge trained here, in PEFT: max |logit diff| {_check_logits(ours, peft_model, tok):.2e}")
  np.testing.assert_array_equal(load_prompt_source(out).value, load_prompt_source(root / "full").value)
  tp = load_prompt_source(out)
  got = inference.generate_text(ours.base, tok, TEXTS, [tp], max_new_tokens=6)
  ids, mask = encoding.encode_inputs(ours.base.batch_type, tok, TEXTS)
  eos = tok.eos_token_id
  # each row alone in PEFT against our padded batch, greedy by PEFT's forward: with transformers 5.25 PEFT's
  # generate() loses the prefix (cached: the model takes its own `cache` and ignores PEFT's `past_key_values`;
  # uncached: its tokens leave those of its own forward after 3 here)
  for i in range(len(TEXTS)):
    seq = list(map(int, ids[i, mask[i] == 1]))
    new = []
    while len(new) < 6 and eos not in new:
      with torch.no_grad():
        new.append(int(peft_model(input_ids=_t([seq + new])).logits[0, -1].argmax()))
    assert got[i]["tokens"] == new


def test_distillation_lowers_the_kl_to_the_model_with_the_context(byte_llama):
  from jaxprompt.models.loading import load_model, load_tokenizer
  from jaxprompt.prompts.cartridge import Cartridge, text_table
  from jaxprompt.training.distill import distill_cartridge

  base, tok = load_model(str(byte_llama)), load_tokenizer(str(byte_llama))
  context = tok("The cat sat on the mat. The dog ran to the park. A bird sang.")["input_ids"]  # 63 bytes + EOS
  cartridge = Cartridge(base.prefix_slots(), table=text_table(base, tok, "The cat sat", 8), frozen_tokens=1)
  sink = np.asarray(cartridge.sink[...])
  _, kls = distill_cartridge(base, cartridge, context, chunk=16, steps=8, learning_rate=0.05)
  print(f"distillation (P 8 vs a context of {len(context)} tokens), KL per step: {[round(k, 4) for k in kls]}")
  assert kls[-1] < 0.5 * kls[0]
  np.testing.assert_array_equal(np.asarray(cartridge.sink[...]), sink)


CONTEXT = "The cat sat on the mat. The dog ran to the park. A bird sang in the old tree by the river."


@pytest.fixture(scope="module")
def distilled(byte_llama, tmp_path_factory):
  """`jaxprompt distill` on the tiny Llama: a context file, P = 6 from its first tokens, its 16-token chunks plus 2
  sampled continuations as queries, 6 Adam steps (checkpoints at 3 and 6)."""
  import yaml

  root = tmp_path_factory.mktemp("distill")
  (root / "context.txt").write_text(CONTEXT)
  raw = {
    "model": {"path": str(byte_llama)},
    "prompt": {"method": "cartridge", "length": P, "init": "text"},
    "distill": {"context_file": "context.txt", "chunk": 16, "samples": 2},
    "optimizer": {"name": "adam", "learning_rate": 0.05, "weight_decay": 0.0},
    "train": {"steps": 6, "log_every": 3},
    "checkpoint": {"every": 3, "async_save": False},
  }
  (root / "distill.yaml").write_text(yaml.safe_dump(raw))
  assert main(["distill", str(root / "distill.yaml"), "--workdir", str(root / "w"), "--no-progress"]) == 0
  return root, root / "distill.yaml", root / "w"


def test_the_distill_command_writes_a_workdir_and_lowers_the_kl(byte_llama, distilled, capsys):
  from jaxprompt.models.loading import load_tokenizer

  root, cfg, w = distilled
  out = json.loads((w / "summary.json").read_text())
  print(f"jaxprompt distill (P {P}, {out['context_tokens']} tokens): KL {out['kl_start']:.4f} -> {out['kl_final']:.4f}")
  assert out["final_step"] == 6 and out["queries"] == out["context_tokens"] // 16 + 2
  assert out["kl_final"] < 0.8 * out["kl_start"]
  assert {"config.yaml", "base_model.json", "summary.json", "metrics.jsonl"} <= {p.name for p in w.iterdir()}
  assert [json.loads(line)["step"] for line in (w / "metrics.jsonl").read_text().splitlines()] == [3, 6]
  tp = load_prompt_source(w)
  assert tp.record.step == 6 and tp.spec == CartridgeSpec(frozen_tokens=1, slots=tp.spec.slots)
  assert tp.record.task.name == "distill:context.txt" and tp.record.task.input is None  # inputs as raw text
  assert tp.value.shape == (P, 2, 2, 2, 8)
  rows = [json.loads(line) for line in run_cli(capsys, "inspect", w)]
  assert len(rows) == P and len(rows[0]["key_norms"]) == 2 and (w / "similarity.png").is_file()
  args = ["--prompt", w, "--input", TEXTS[0], "--input", TEXTS[1], "--greedy", "--max-new-tokens", 6, "--jsonl"]
  printed = [json.loads(line)["output"] for line in run_cli(capsys, "generate", *args)]
  ours = load_prompted(byte_llama, w)
  want = inference.generate_text(ours.base, load_tokenizer(str(byte_llama)), TEXTS[:2], [tp], max_new_tokens=6)
  assert printed == [r["output"] for r in want]
  resumed = json.loads(run_cli(capsys, "distill", cfg, "--workdir", w, "--no-progress", "--set", "train.steps=7")[-1])
  assert resumed["final_step"] == 7 and resumed["kl_start"] == out["kl_final"]  # from step 6's checkpoint, exactly


def test_bad_distill_input_is_one_line(distilled, byte_t5, capsys):
  root, cfg, w = distilled
  for over, want in (
    ("distill.context_file=nowhere.txt", "distill.context_file nowhere.txt does not exist"),
    ("distill.context_file=null", "distill.context_file: give the text file"),
    ("prompt.method=prefix_tuning", "jaxprompt distill trains a cartridge: set prompt.method cartridge"),
    (f"model.path={byte_t5}", "cartridge distillation needs a decoder-only model: its teacher reads the context"),
  ):
    extra = ["--set", "prompt.init=random_uniform"] if "prefix" in over else []
    capsys.readouterr()
    assert main(["distill", str(cfg), "--workdir", str(root / "bad"), "--set", over, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and want in err[0], err


def test_a_distilled_cartridge_is_served_as_generate_makes_it(byte_llama, distilled, tmp_path):
  openai = pytest.importorskip("openai")
  from jaxprompt.serve.server import build, serving

  _, _, w = distilled
  prompts = tmp_path / "prompts"
  prompts.mkdir()
  export_prompt(w, "safetensors", prompts / "story.safetensors")
  app, engine, problems = build(str(byte_llama), prompts=str(prompts), max_batch=4, max_tokens=8, max_input_tokens=32)
  assert problems == []
  want = inference.generate_text(engine.base, engine.tokenizer, TEXTS, [load_prompt_source(w)], max_new_tokens=6)
  with serving(app) as url:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    got = client.completions.create(model="story", prompt=TEXTS, max_tokens=6, temperature=0)
  assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == [r["output"] for r in want]
