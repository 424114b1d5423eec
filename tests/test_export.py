"""Prompts to PyTorch and back: PEFT adapters that PEFT loads and that give our logits, numpy/safetensors
formats, round trips, provenance, and refusals."""

import json
import os
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxprompt import sharding as shd
from jaxprompt.errors import ExportError, PromptError
from jaxprompt.prompts.export import export_prompt
from jaxprompt.prompts.io import load_trained_prompt, read_prompt_file
from jaxprompt.run import build_run
from jaxprompt.training.trainer import train
from tests.helpers import small_cfg

TOL = 1e-4


@pytest.fixture(scope="module")
def trained_t5(byte_t5, tmp_path_factory):
  work = tmp_path_factory.mktemp("trained_t5")
  cfg = small_cfg(byte_t5, **{"train.steps": 3, "prompt.length": 5})
  train(cfg, work, progress=False, mesh=shd.make_mesh(devices=jax.devices()[:1]))
  return cfg, work


def _ours_logits(cfg, prompt_value, ids, mask, dec):
  from flax import nnx

  run, _ = build_run(cfg, mesh=shd.make_mesh(devices=jax.devices()[:1]), with_train_data=False)
  model = nnx.merge(run.graphdef, {"prompt": {"embeddings": jnp.asarray(prompt_value)}}, run.frozen)
  return np.asarray(model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(dec)))


def test_peft_loads_our_t5_adapter_and_gives_our_logits(trained_t5, byte_t5, tmp_path):
  from peft import PeftModel
  from transformers import T5ForConditionalGeneration

  cfg, work = trained_t5
  out = export_prompt(work, "peft", tmp_path / "adapter", step="latest")
  acfg = json.loads((out / "adapter_config.json").read_text())
  assert acfg["peft_type"] == "PROMPT_TUNING" and acfg["task_type"] == "SEQ_2_SEQ_LM"
  assert acfg["num_virtual_tokens"] == 5 and acfg["token_dim"] == 32 and acfg["inference_mode"] is True
  assert (acfg["num_layers"], acfg["num_attention_heads"]) == (2, 4)
  prov = json.loads((out / "jaxprompt.json").read_text())
  assert prov["base_model"]["fingerprint"] and prov["step"] == 3
  value, _ = load_trained_prompt(work, "latest")
  base = T5ForConditionalGeneration.from_pretrained(byte_t5).eval()
  peft_model = PeftModel.from_pretrained(base, out).eval()
  np.testing.assert_array_equal(peft_model.get_prompt_embedding_to_save("default").numpy(), value)
  g = torch.Generator().manual_seed(0)
  ids = torch.randint(3, 300, (3, 9), generator=g)
  mask = torch.ones_like(ids)
  mask[1, 6:] = 0
  dec = torch.randint(3, 300, (3, 4), generator=g)
  with torch.no_grad():
    ref = peft_model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits.numpy()
  ours = _ours_logits(cfg, value, ids.numpy(), mask.numpy(), dec.numpy())
  np.testing.assert_allclose(ours, ref, atol=TOL, rtol=TOL)


def test_export_records_the_init_that_made_the_prompt(trained_t5, byte_t5, tmp_path):
  from peft import PeftModel
  from transformers import T5ForConditionalGeneration

  _, work = trained_t5  # prompt.init: sampled_vocab
  acfg = json.loads((export_prompt(work, "peft", tmp_path / "a", step="latest") / "adapter_config.json").read_text())
  assert (acfg["prompt_tuning_init"], acfg["prompt_tuning_init_text"]) == ("SAMPLE_VOCAB", None)
  cfg = small_cfg(byte_t5, **{"train.steps": 1, "prompt.init": "text", "prompt.init_text": "the largest digit"})
  train(cfg, tmp_path / "w", progress=False, mesh=shd.make_mesh(devices=jax.devices()[:1]))
  out = export_prompt(tmp_path / "w", "peft", tmp_path / "b")
  acfg = json.loads((out / "adapter_config.json").read_text())
  assert (acfg["prompt_tuning_init"], acfg["prompt_tuning_init_text"], acfg["tokenizer_name_or_path"]) == (
    "TEXT",
    "the largest digit",
    str(byte_t5),
  )
  prov = json.loads((out / "jaxprompt.json").read_text())["prompt_config"]
  assert (prov["init"], prov["init_text"], prov["length"]) == ("text", "the largest digit", 4)
  # PEFT validates those fields and loads the trained values (inference mode never re-initialises from text)
  peft_model = PeftModel.from_pretrained(T5ForConditionalGeneration.from_pretrained(byte_t5), out)
  np.testing.assert_array_equal(
    peft_model.get_prompt_embedding_to_save("default").numpy(), load_trained_prompt(tmp_path / "w")[0]
  )


def test_numpy_and_safetensors_round_trips_are_exact(trained_t5, tmp_path):
  _, work = trained_t5
  value, _ = load_trained_prompt(work, "latest")
  npy = export_prompt(work, "numpy", tmp_path / "p.npy", step="latest")
  loaded = np.load(npy, allow_pickle=False)
  assert loaded.dtype == np.float32 and loaded.shape == (5, 32)
  np.testing.assert_array_equal(loaded, value)
  again, info = load_trained_prompt(npy)
  np.testing.assert_array_equal(again, value)
  assert info["base_model"]["fingerprint"]  # provenance travels in p.json
  st = export_prompt(npy, "safetensors", tmp_path / "p.safetensors")
  np.testing.assert_array_equal(load_trained_prompt(st)[0], value)
  # PEFT -> jaxprompt -> PEFT
  a = export_prompt(st, "peft", tmp_path / "a")
  b = export_prompt(a, "peft", tmp_path / "b")
  np.testing.assert_array_equal(read_prompt_file(b)[0], value)
  assert json.loads((a / "adapter_config.json").read_text()) == json.loads((b / "adapter_config.json").read_text())
  # exports get the permissions a plain open()/mkdir() gives, not the private ones of a temporary file
  mask = os.umask(0)
  os.umask(mask)
  for p in (npy, st, a, a / "adapter_config.json", a / "adapter_model.safetensors"):
    assert stat.S_IMODE(p.stat().st_mode) == (0o777 if p.is_dir() else 0o666) & ~mask, p


def test_existing_output_is_not_clobbered_and_failed_exports_leave_nothing(trained_t5, tmp_path, monkeypatch):
  _, work = trained_t5
  out = export_prompt(work, "peft", tmp_path / "adapter", step="latest")
  before = (out / "adapter_model.safetensors").read_bytes()
  with pytest.raises(FileExistsError, match="already exists"):
    export_prompt(work, "peft", out, step="latest")
  from jaxprompt.models import hf

  def boom(*a, **k):
    raise OSError("No space left on device")

  monkeypatch.setattr(hf, "save_safetensors", boom)
  with pytest.raises(OSError, match="No space"):
    export_prompt(work, "peft", out, step="latest", overwrite=True)
  with pytest.raises(OSError):
    export_prompt(work, "peft", tmp_path / "fresh", step="latest")
  assert (out / "adapter_model.safetensors").read_bytes() == before  # the old export survives intact
  assert not (tmp_path / "fresh").exists()
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary leftovers


def test_bad_adapters_fail_with_clear_errors(trained_t5, tmp_path):
  _, work = trained_t5
  out = export_prompt(work, "peft", tmp_path / "adapter", step="latest")
  cfg = json.loads((out / "adapter_config.json").read_text())
  del cfg["task_type"]
  (out / "adapter_config.json").write_text(json.dumps(cfg))
  with pytest.raises(PromptError, match="no task_type"):
    load_trained_prompt(out)
  (out / "adapter_config.json").write_text("{not json")
  with pytest.raises(PromptError, match="invalid JSON"):
    load_trained_prompt(out)
  with pytest.raises(ExportError, match="numpy writes a .npy"):
    export_prompt(work, "numpy", tmp_path / "p.bin", step="latest")
