"""Classification heads against PEFT and transformers: adapters that PEFT 0.21.2 creates with random weights for
task_type SEQ_CLS and TOKEN_CLS (prompt tuning, P-tuning with an MLP or an LSTM, prefix tuning with and without
its projection) on random tiny Llama (GQA) and GPT-2 models load through `jaxprompt.load_prompted` and give the
head's logits of PEFT within 1e-4; T5's heads match transformers' T5ForSequenceClassification /
T5ForTokenClassification fed the prompt.

Where PEFT's own forward runs (prompt tuning, P-tuning) it is the reference. Prefix tuning with a classification
task type fails there on transformers 5 ("Model does not support past key values which are required for prefix
tuning": PEFT looks for a `past_key_values` argument, which transformers 5 renamed `cache`), so those adapters are
checked against transformers' own model fed PEFT's prefix as its cache (`PeftModel.get_prompt`: the key/value
cache PEFT would pass), with the mask extended by P ones, exactly what PEFT's prefix-tuning forward does.

Positions: PEFT runs a sequence classifier on `inputs_embeds` (the prompt in front), so transformers cannot find
the last non-pad token and reads the last position; rows are left-padded here, where that is each row's last real
token, and jaxprompt counts the padding's positions as PEFT does. Token classification compares real tokens only.
"""

import numpy as np
import pytest
import torch

from jaxprompt import load_prompted
from jaxprompt.models import load_model
from tests.helpers_hf import write_decoder, write_encoder, write_t5

TOL = 1e-4  # whole-model float32 tolerance (DESIGN.md); never loosened
P = 4  # virtual tokens
C = 3  # classes
IDS = np.array([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14], [0, 0, 0, 0, 15, 16]])  # left-padded (pad 0)


def _peft_configs(tt):
  from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

  return {
    "prompt_tuning": PromptTuningConfig(task_type=tt, num_virtual_tokens=P),
    "p_tuning_mlp": PromptEncoderConfig(task_type=tt, num_virtual_tokens=P, encoder_hidden_size=24),
    "p_tuning_lstm": PromptEncoderConfig(
      task_type=tt, num_virtual_tokens=P, encoder_hidden_size=24, encoder_reparameterization_type="LSTM"
    ),
    "prefix": PrefixTuningConfig(task_type=tt, num_virtual_tokens=P),
    "prefix_projection": PrefixTuningConfig(
      task_type=tt, num_virtual_tokens=P, prefix_projection=True, encoder_hidden_size=24
    ),
  }


METHODS = ["prompt_tuning", "p_tuning_mlp", "p_tuning_lstm", "prefix", "prefix_projection"]


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
  root = tmp_path_factory.mktemp("head_bases")
  out = {}
  for name, variant, seed in (("llama", "llama3-gqa-untied", 41), ("gpt2", "gpt2", 42)):
    folder = write_decoder(root / name, variant, seed=seed)
    out[name] = (folder, load_model(folder))
  for name, seed in (("bert", 44), ("roberta", 45)):
    folder = write_encoder(root / name, name, seed=seed)
    out[name] = (folder, load_model(folder))
  # a DebertaV2ForSequenceClassification checkpoint: its ContextPooler (pooler.dense) is loaded with the body
  folder = write_encoder(root / "deberta", "deberta-v2-seqcls", seed=46, num_labels=C)
  out["deberta"] = (folder, load_model(folder))
  return out


def hf_class(model: str, per_token: bool):
  import transformers

  family = {"llama": "Llama", "gpt2": "GPT2", "bert": "Bert", "roberta": "Roberta", "deberta": "DebertaV2"}[model]
  return getattr(transformers, f"{family}For{'Token' if per_token else 'Sequence'}Classification")


def peft_reference(pm, ids: torch.Tensor, mask: torch.Tensor, prefix: bool) -> np.ndarray:
  """PEFT's logits; for a prefix (PEFT's forward fails on transformers 5), transformers' model with PEFT's prefix
  as its cache and the mask extended by P ones (what PEFT's prefix-tuning forward passes)."""
  with torch.no_grad():
    if not prefix:
      return pm(input_ids=ids, attention_mask=mask).logits.numpy()
    model = pm.base_model
    cache = pm.get_prompt(batch_size=ids.shape[0])
    full = torch.cat([torch.ones(ids.shape[0], P, dtype=mask.dtype), mask], 1)
    out = model(input_ids=ids, attention_mask=full, cache=cache).logits.numpy()
    plain = model(input_ids=ids, attention_mask=mask).logits.numpy()
    assert np.abs(out - plain).max() > 1e-3  # the prefix is really read
    return out


def make_adapter(folder, model, per_token, method, out_dir, seed):
  """A PEFT adapter with random weights (prompt, encoder, the head's modules_to_save) saved to `out_dir` -> the
  PEFT model."""
  from peft import TaskType, get_peft_model

  torch.manual_seed(seed)
  base = hf_class(model, per_token).from_pretrained(folder, num_labels=C).eval()
  tt = TaskType.TOKEN_CLS if per_token else TaskType.SEQ_CLS
  pm = get_peft_model(base, _peft_configs(tt)[method]).eval()
  with torch.no_grad():
    for p in pm.parameters():
      if p.requires_grad:
        p.add_(torch.randn_like(p) * 0.3)
  pm.save_pretrained(out_dir)
  return pm


def _inputs(model: str, per_token: bool):
  """Decoders' sequence heads: left-padded rows (PEFT reads the last position); the rest right-padded, with the
  model's pad id."""
  right = per_token or model in ("bert", "roberta", "deberta")
  ids = np.flip(IDS, axis=1).copy() if right else IDS.copy()
  mask = (ids != 0).astype(np.int64)
  return np.where(mask > 0, ids, PADS[model]), mask


# every method on Llama (GQA); on GPT-2 (its own head names: `classifier` for tokens) one input and one key/value
# method: P-tuning reaches a model through the same input embeddings as prompt tuning
CASES = [("llama", m) for m in METHODS] + [("gpt2", "prompt_tuning"), ("gpt2", "prefix_projection")]
# encoders: BERT reads its pooler (position 0), RoBERTa its classification head's dense + tanh on <s>
CASES += [("bert", m) for m in ("prompt_tuning", "p_tuning_lstm", "prefix", "prefix_projection")]
CASES += [("roberta", "prompt_tuning"), ("roberta", "prefix")]
# DeBERTa-v2: its ContextPooler (dense + GELU on position 0) then `classifier`; input prompts only (no model defines
# a relative position for key/value prefix slots: transformers' DeBERTa takes no cache, ours refuses a prefix)
CASES += [("deberta", "prompt_tuning"), ("deberta", "p_tuning_mlp")]
PADS = {"llama": 0, "gpt2": 0, "bert": 0, "roberta": 1, "deberta": 0}


@pytest.mark.parametrize("per_token", [False, True], ids=["seq_cls", "token_cls"])
@pytest.mark.parametrize("model,method", CASES)
def test_peft_adapters_with_heads_load_and_give_peft_logits(decoders, tmp_path, model, per_token, method):
  folder, base = decoders[model]
  pm = make_adapter(folder, model, per_token, method, tmp_path / "adapter", seed=hash((model, method)) % 1000)
  ids, mask = _inputs(model, per_token)
  ref = peft_reference(pm, torch.tensor(ids), torch.tensor(mask), method.startswith("prefix"))
  ours = np.asarray(load_prompted(base, tmp_path / "adapter")(ids, mask))
  if per_token:
    ref = ref[:, ref.shape[1] - ids.shape[1] :]  # PEFT's logits include the virtual tokens' positions
    ref, ours = ref[mask > 0], ours[mask > 0]
  assert ours.shape == ref.shape
  np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)


def test_a_classification_adapter_without_its_head_is_refused_in_one_line(decoders, tmp_path):
  from jaxprompt.errors import PromptError
  from jaxprompt.models import hf

  folder, base = decoders["llama"]
  make_adapter(folder, "llama", False, "prompt_tuning", tmp_path / "a", seed=5)
  f = hf.SafetensorsFile(tmp_path / "a" / "adapter_model.safetensors")
  names = f.keys()
  assert "base_model.score.weight" in names  # PEFT 0.21.2 saves the head from modules_to_save under this name
  tensors = {k: np.array(f.get(k)) for k in names if not k.startswith("base_model.")}
  del f
  hf.save_safetensors(tensors, tmp_path / "a" / "adapter_model.safetensors", metadata={"format": "pt"})
  with pytest.raises(PromptError, match=r"a SEQ_CLS adapter needs its head's tensors \(modules_to_save\), found \[\]"):
    load_prompted(base, tmp_path / "a")


# -- T5: transformers' own classification models fed the prompt --------------------------------------------------


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
  folder = write_t5(tmp_path_factory.mktemp("head_t5") / "m", "t5v11-gated-untied", seed=43)
  return folder, load_model(folder)


def test_t5_heads_match_transformers_t5_classification_models(t5):
  import jax
  import jax.numpy as jnp
  import transformers

  from jaxprompt.prompts import heads as HD
  from jaxprompt.prompts.soft import PromptedModel, SoftPrompt

  folder, base = t5
  ids = np.array([[5, 6, 7, 1, 0, 0], [8, 9, 10, 11, 12, 1]])  # right-padded, EOS 1 in each row
  mask = (ids != 0).astype(np.int64)
  prompt = np.asarray(jax.random.normal(jax.random.key(3), (P, base.hidden_size)), np.float32)
  for per_token in (False, True):
    torch.manual_seed(7)
    cls = transformers.T5ForTokenClassification if per_token else transformers.T5ForSequenceClassification
    hf_model = cls.from_pretrained(folder, num_labels=C).eval()
    spec = HD.HeadSpec("token" if per_token else "sequence", ("a", "b", "c"))
    prefix = "classifier." if per_token else "classification_head."
    tensors = {k: v.detach().numpy() for k, v in hf_model.state_dict().items() if k.startswith(prefix)}
    head = HD.from_hf(spec, base, tensors, "t5")
    ours = np.asarray(PromptedModel(base, SoftPrompt(prompt), head)(jnp.asarray(ids), jnp.asarray(mask)))
    t_ids, t_mask = torch.tensor(ids), torch.tensor(mask)
    embeds = torch.cat([torch.tensor(prompt)[None].expand(2, -1, -1), hf_model.get_input_embeddings()(t_ids)], 1)
    full = torch.cat([torch.ones(2, P, dtype=t_mask.dtype), t_mask], 1)
    with torch.no_grad():
      if per_token:  # T5ForTokenClassification takes inputs_embeds: the prompt in front, its positions dropped
        ref = hf_model(inputs_embeds=embeds, attention_mask=full).logits[:, P:].numpy()
        ours, ref = ours[mask > 0], ref[mask > 0]
      else:  # T5ForSequenceClassification refuses inputs_embeds: its forward, step by step (transformers' modules)
        tr = hf_model.transformer
        enc = tr.encoder(inputs_embeds=embeds, attention_mask=full).last_hidden_state
        dec = tr.decoder(input_ids=hf_model._shift_right(t_ids), encoder_hidden_states=enc, encoder_attention_mask=full)
        h = dec.last_hidden_state[t_ids.eq(1)].view(2, -1, base.hidden_size)[:, -1]
        ref = hf_model.classification_head(h).numpy()
        plain = hf_model(input_ids=t_ids, attention_mask=t_mask).logits.numpy()  # and without a prompt, whole
        bare = np.asarray(PromptedModel(base, SoftPrompt(np.zeros((0, base.hidden_size))), head)(ids, mask))
        np.testing.assert_allclose(bare, plain, atol=TOL, rtol=0)
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)
