"""BERT / RoBERTa / DeBERTa-v2 encoders: hidden states and pooled outputs against transformers' PyTorch models (the
reference), prompts against PEFT's own forward (prompt tuning and prefix tuning), strict loading, the real BERT
vocabulary, and the interface's refusal of text-to-text work."""

import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxprompt
from jaxprompt.errors import ModelError, WeightError
from jaxprompt.models import interface as I
from jaxprompt.models.encoder import Encoder, EncoderConfig
from jaxprompt.prompts.prefix import PrefixTuning
from jaxprompt.prompts.soft import PromptedModel, SoftPrompt
from tests.helpers_hf import (
  DEBERTA_VARIANTS,
  ENCODER_VARIANTS,
  encoder_with_prefix,
  load_encoder,
  rewrite_checkpoint,
  write_encoder,
)

TOL = 1e-4  # whole-model float32 tolerance (DESIGN.md); never loosened
P = 3  # virtual tokens


@pytest.fixture(scope="module")
def encoder_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("encoders")
  return {v: write_encoder(root / v, v, seed=i) for i, v in enumerate(ENCODER_VARIANTS)}


@pytest.fixture(scope="module")
def loaded(encoder_dirs):
  """(transformers model, ours) per variant, loaded once."""
  return {v: (load_encoder(d), jaxprompt.load_model(d)) for v, d in encoder_dirs.items()}


def _batch(pad_id: int, types: int, b=3, length=9, seed=0):
  """ids, mask, token types [B, L]: row 1 right-padded (padding ids where masked), row 2 a two-segment pair."""
  g = torch.Generator().manual_seed(seed)
  ids = torch.randint(3, 99, (b, length), generator=g)
  mask = torch.ones(b, length, dtype=torch.long)
  mask[1, 6:] = 0
  ids[1, 6:] = pad_id
  tt = torch.zeros(b, length, dtype=torch.long)
  if types > 1:
    tt[2, 5:] = 1
    tt[1, 3:6] = 1
  return ids, mask, tt


def j(t):
  return jnp.asarray(t.numpy())


def _body(ref):
  """The bare BertModel / RobertaModel inside a task model."""
  return getattr(ref, ref.base_model_prefix, ref)


def _close(got, want):
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=TOL, rtol=TOL)


@pytest.mark.parametrize("variant", list(ENCODER_VARIANTS))
def test_hidden_and_pooled_match_transformers(loaded, variant):
  ref, ours = loaded[variant]
  body, c = _body(ref), ours.config
  assert ours.kind == "encoder" and not ours.has_lm_head and isinstance(ours, I.EncoderModel)
  ids, mask, tt = _batch(c.pad_token_id, c.type_vocab_size)
  with torch.no_grad():
    want = body(input_ids=ids, attention_mask=mask, token_type_ids=tt)
  got = ours.encode(j(ids), j(mask), j(tt))
  assert got.hidden.shape == (3, 9, 32) and got.prefix_length == 0
  _close(got.hidden, want.last_hidden_state)  # every position, padding included: all attend to real keys
  if c.pooler:
    _close(got.pooled, want.pooler_output)
  else:  # a masked-LM checkpoint has no pooler
    assert got.pooled is None and want.pooler_output is None
    with pytest.raises(ModelError, match="no pooler"):
      ours.pool(got.hidden[:, 0])
  # embeddings in: transformers' inputs_embeds path (RoBERTa then numbers positions sequentially)
  with torch.no_grad():
    embeds = body.get_input_embeddings()(ids[:1, :6]) * 1.0
    want_e = body(inputs_embeds=embeds).last_hidden_state
  _close(ours.encode(inputs_embeds=j(embeds)).hidden, want_e)
  np.testing.assert_allclose(np.asarray(ours.embed(j(ids))), body.get_input_embeddings()(ids).detach(), atol=1e-6)


@pytest.mark.parametrize("variant", ["roberta-mlm", "bert-pretraining"])
def test_masked_lm_head_matches_transformers(loaded, variant):
  """The masked-LM head over its tied decoder (RoBERTa: exact GELU whatever hidden_act; BERT: hidden_act)."""
  ref, ours = loaded[variant]
  ids, mask, tt = _batch(ours.config.pad_token_id, ours.config.type_vocab_size, seed=6)
  with torch.no_grad():
    out = ref(input_ids=ids, attention_mask=mask, token_type_ids=tt)
  want = out.logits if variant == "roberta-mlm" else out.prediction_logits
  got = ours.mlm_logits(ours.encode(j(ids), j(mask), j(tt)).hidden)
  assert got.shape == (3, 9, 99) and got.dtype == jnp.float32
  _close(got, want)


def test_config_and_strict_loading(encoder_dirs, loaded, tmp_path):
  bert, roberta = loaded["bert"][1].config, loaded["roberta"][1].config
  assert (bert.weight_prefix, bert.pooler, bert.layer_norm_eps, bert.type_vocab_size) == ("", True, 1e-12, 2)
  assert (roberta.pad_token_id, roberta.positions_from_ids, roberta.layer_norm_eps) == (1, True, 1e-5)
  seqcls, mlm = loaded["bert-seqcls"][1].config, loaded["roberta-mlm"][1].config
  assert (seqcls.weight_prefix, seqcls.pooler) == ("bert.", True)  # classifier.* consumed, not loaded
  assert (mlm.weight_prefix, mlm.pooler, mlm.mlm_head) == ("roberta.", False, True)
  assert not (bert.mlm_head or seqcls.mlm_head) and loaded["bert-pretraining"][1].config.mlm_head
  with pytest.raises(ModelError, match="no masked-LM head"):
    loaded["bert"][1].mlm_logits(jnp.zeros((1, 2, 32)))

  def extra(t):
    t["encoder.layer.0.attention.self.rotary.weight"] = np.zeros(3, np.float32)

  bad = rewrite_checkpoint(encoder_dirs["bert"], tmp_path / "extra", extra)
  with pytest.raises(WeightError, match="unexpected tensor 'encoder.layer.0.attention.self.rotary.weight'"):
    jaxprompt.load_model(bad)
  gone = rewrite_checkpoint(
    encoder_dirs["bert"], tmp_path / "gone", lambda t: t.pop("encoder.layer.1.output.dense.bias")
  )
  with pytest.raises(WeightError, match="missing tensor 'encoder.layer.1.output.dense.bias'"):
    jaxprompt.load_model(gone)

  def old_format(t):  # older BERT checkpoints store the tied decoder and its bias under their own names too
    t["cls.predictions.decoder.weight"] = t["bert.embeddings.word_embeddings.weight"].copy()
    t["cls.predictions.decoder.bias"] = t["cls.predictions.bias"].copy()

  old = rewrite_checkpoint(encoder_dirs["bert-pretraining"], tmp_path / "old", old_format)
  np.testing.assert_array_equal(jaxprompt.load_model(old).mlm_bias[...], loaded["bert-pretraining"][1].mlm_bias[...])

  def untied(t):
    old_format(t)
    t["cls.predictions.decoder.weight"] += 1.0

  bad = rewrite_checkpoint(encoder_dirs["bert-pretraining"], tmp_path / "untied", untied)
  with pytest.raises(WeightError, match="tied tensors 'bert.embeddings.word_embeddings.weight' and 'cls.predictions"):
    jaxprompt.load_model(bad)
  with pytest.raises(ModelError, match="position_embedding_type='relative_key'"):
    EncoderConfig.from_hf({**bert.to_hf(), "position_embedding_type": "relative_key"})


def test_save_pretrained_reloads_in_transformers(loaded, tmp_path):
  _, ours = loaded["roberta"]
  folder = jaxprompt.save_pretrained(ours, tmp_path / "saved")
  ref = load_encoder(folder)
  ids, mask, tt = _batch(1, 1, seed=2)
  with torch.no_grad():
    want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
  _close(ours.encode(j(ids), j(mask)).hidden, want)


def _peft(base, config, seed):
  """A PEFT model over `base` with its prompt's weights drawn at random (PEFT's init is not under test)."""
  from peft import get_peft_model

  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    m = get_peft_model(base, config).eval()
  table = m.prompt_encoder["default"].embedding.weight
  with torch.no_grad():
    table.copy_(torch.randn(table.shape, generator=torch.Generator().manual_seed(seed)))
  return m, table.detach().clone()


@pytest.mark.parametrize("variant", ["bert", "roberta"])
def test_input_prompt_matches_peft_prompt_tuning(encoder_dirs, loaded, variant):
  """PEFT's PROMPT_TUNING on a bare encoder (FEATURE_EXTRACTION: token types dropped): the prompt goes before
  [CLS], positions run over P + L, the pooler reads the first virtual token."""
  from peft import PromptTuningConfig

  _, ours = loaded[variant]
  peft, prompt = _peft(
    load_encoder(encoder_dirs[variant]), PromptTuningConfig("FEATURE_EXTRACTION", num_virtual_tokens=P), 1
  )
  ids, mask, _ = _batch(ours.config.pad_token_id, 1)
  with torch.no_grad():
    want = peft(input_ids=ids, attention_mask=mask)
  got = ours.encode(j(ids), j(mask), prefix=I.Prefix(embeds=j(prompt)[None]))
  assert got.hidden.shape == (3, P + 9, 32) and got.prefix_length == P and got.mask.shape == (3, P + 9)
  _close(got.hidden, want.last_hidden_state)
  _close(got.pooled, want.pooler_output)


def test_input_prompt_with_token_types_matches_peft_sequence_classification(encoder_dirs, loaded):
  """PEFT's SEQ_CLS model keeps token types and gives the virtual tokens type 0; its classifier reads the pooled
  position 0 (the first virtual token)."""
  from peft import PromptTuningConfig

  _, ours = loaded["bert-seqcls"]
  ref = load_encoder(encoder_dirs["bert-seqcls"])
  w, b = ref.classifier.weight.detach().numpy(), ref.classifier.bias.detach().numpy()
  peft, prompt = _peft(ref, PromptTuningConfig("SEQ_CLS", num_virtual_tokens=P), 2)
  ids, mask, tt = _batch(0, 2, seed=3)
  with torch.no_grad():
    want = peft(input_ids=ids, attention_mask=mask, token_type_ids=tt, output_hidden_states=True)
  got = ours.encode(j(ids), j(mask), j(tt), prefix=I.Prefix(embeds=j(prompt)[None]))
  _close(got.hidden, want.hidden_states[-1])
  _close(np.asarray(got.pooled) @ w.T + b, want.logits)


@pytest.mark.parametrize("variant", ["bert", "roberta"])
def test_key_value_prefix_matches_peft_prefix_tuning(encoder_dirs, loaded, variant):
  """PEFT's PREFIX_TUNING on a bare encoder (its forward runs for FEATURE_EXTRACTION with transformers 5.25): P
  key/value slots before every layer's own, every query attending to them, token positions shifted by P (BERT:
  P..P+L-1; RoBERTa: from the ids, plus P) as transformers shifts them by the cache length. The table is read through
  the model's `prefix_slots` (PEFT's flat layout [P, layers * 2 * heads * head_dim])."""
  from peft import PrefixTuningConfig

  _, ours = loaded[variant]
  peft, table = _peft(
    load_encoder(encoder_dirs[variant]), PrefixTuningConfig("FEATURE_EXTRACTION", num_virtual_tokens=P), 4
  )
  s = ours.prefix_slots()
  assert (s.layers, s.heads, s.head_dim, s.layer_of) == (2, 4, 8, (0, 1))
  prefix = PrefixTuning(s, table=table.numpy().reshape(P, s.layers, 2, s.heads, s.head_dim)).prefix(3)
  ids, mask, _ = _batch(ours.config.pad_token_id, 1, seed=5)
  body = _body(load_encoder(encoder_dirs[variant]))
  with torch.no_grad():
    want = peft(input_ids=ids, attention_mask=mask)
    plain = body(input_ids=ids, attention_mask=mask).last_hidden_state
    # the oracle the heads' tests use where PEFT's forward refuses a prefix: the same table without PEFT
    oracle = encoder_with_prefix(body, ids, mask, table.reshape(P, s.layers, 2, s.heads, s.head_dim))
  _close(oracle.last_hidden_state, want.last_hidden_state)
  got = ours.encode(j(ids), j(mask), prefix=prefix)
  assert got.hidden.shape == (3, 9, 32) and got.prefix_length == 0
  assert np.abs(want.last_hidden_state.numpy() - plain.numpy()).max() > 1e-2  # PEFT's prefix does act
  _close(got.hidden, want.last_hidden_state)
  _close(got.pooled, want.pooler_output)


def test_text_to_text_work_is_refused_in_one_line(encoder_dirs, loaded, capsys):
  from jaxprompt import config as C
  from jaxprompt import run
  from jaxprompt.cli import main

  assert main(["generate", "--model", str(encoder_dirs["roberta"]), "--input", "hi"]) == 2
  err = capsys.readouterr().err.strip()
  assert err == (
    "jaxprompt: error: generate needs a language-model head, and this roberta encoder model has none (an encoder "
    "gives hidden states and a pooled output: Encoder.encode)"
  )

  _, ours = loaded["bert"]
  with pytest.raises(ModelError, match="^generation needs a language-model head, and this bert encoder model has none"):
    ours.prefill(None, max_new_tokens=1)
  with pytest.raises(ModelError, match="^training and evaluation on text targets needs a language-model head"):
    run.load_base(C.ModelConfig(path=str(encoder_dirs["bert"])))
  with pytest.raises(ModelError, match="language-model head"):
    PromptedModel(ours, SoftPrompt(np.zeros((P, 32), np.float32)))(jnp.ones((1, 2), jnp.int32))
  assert not isinstance(ours, (I.CausalLM, I.Seq2SeqLM))


def test_positions_past_the_table_are_refused(loaded):
  _, ours = loaded["roberta"]  # 40 positions, the first real one at padding_idx + 1 = 2
  ids = jnp.full((1, 38), 5)
  assert ours.encode(ids).hidden.shape == (1, 38, 32)
  with pytest.raises(ModelError, match="need position 40, past the model's max_position_embeddings 40"):
    ours.encode(ids, prefix=I.Prefix(embeds=jnp.zeros((1, 1, 32))))


def test_real_bert_vocabulary_tokenizes_as_transformers(fixtures_dir):
  from transformers import BertTokenizerFast

  folder = fixtures_dir / "tokenizers" / "bert-uncased"
  ours = jaxprompt.load_tokenizer(folder)  # a bare vocab.txt: AutoTokenizer cannot load it
  ref = BertTokenizerFast.from_pretrained(str(folder))
  assert len(ours) == 30522
  assert ours("The capital of France is [MASK].")["input_ids"] == [101, 1996, 3007, 1997, 2605, 2003, 103, 1012, 102]
  texts = ["Héllo, WORLD! Tokenizers aren't trivial.", "unaffable jaxprompt 12,345.6", "x" * 120, ""]
  for t in texts:
    assert ours(t)["input_ids"] == ref(t)["input_ids"], t
  pair = ours("Is it raining?", "No, it is sunny.")
  want = ref("Is it raining?", "No, it is sunny.")
  assert pair["input_ids"] == want["input_ids"] and pair["token_type_ids"] == want["token_type_ids"]


def test_encoder_builds_from_a_config_alone():
  c = EncoderConfig(
    model_type="bert", vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2
  )
  m = jaxprompt.models.build_model(c)
  assert isinstance(m, Encoder) and m.pooler.shape == (8, 8) and m.embed_types.shape == (2, 8)
  assert jaxprompt.models.loading.config_from_dict(c.to_hf()) == c


# -- DeBERTa-v2 ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def debertas(tmp_path_factory):
  root = tmp_path_factory.mktemp("debertas")
  dirs = {v: write_encoder(root / v, v, seed=10 + i) for i, v in enumerate(DEBERTA_VARIANTS)}
  return {v: (d, load_encoder(d), jaxprompt.load_model(d)) for v, d in dirs.items()}


@pytest.mark.parametrize("variant", list(DEBERTA_VARIANTS))
def test_deberta_matches_transformers_with_and_without_an_input_prompt(debertas, variant):
  """Disentangled attention (c2p + p2c over bucketed relative distances), then PEFT's PROMPT_TUNING forward: the
  prompt before every token, relative distances over P + L. Real positions only: transformers' padded queries
  attend nowhere (its mask is query x key), ours attend to the real keys; neither is used."""
  from peft import PromptTuningConfig

  folder, ref, ours = debertas[variant]
  c = ours.config
  assert ours.kind == "encoder" and c.weight_prefix == ("deberta." if "seqcls" in variant else "")
  ids, mask, tt = _batch(0, c.type_vocab_size or 1, length=11, seed=7)
  real = mask.numpy().astype(bool)
  with torch.no_grad():
    want = _body(ref)(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state.numpy()
  got = ours.encode(j(ids), j(mask), j(tt))
  _close(np.asarray(got.hidden)[real], want[real])
  if "seqcls" in variant:  # DebertaV2ForSequenceClassification's ContextPooler (dense + GELU), loaded with the body
    assert c.pooler and c.pooler_hidden_act == "gelu"
    with torch.no_grad():
      _close(np.asarray(got.pooled), ref.pooler(torch.tensor(np.asarray(got.hidden))).numpy())
  else:
    assert got.pooled is None and not c.pooler  # a DebertaV2Model checkpoint has none
  peft, prompt = _peft(_body(load_encoder(folder)), PromptTuningConfig("FEATURE_EXTRACTION", num_virtual_tokens=P), 8)
  with torch.no_grad():
    want = peft(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
  got = np.asarray(ours.encode(j(ids), j(mask), prefix=I.Prefix(embeds=j(prompt)[None])).hidden)
  real = np.concatenate([np.ones((3, P), bool), real], axis=1)
  _close(got[real], want[real])


def test_deberta_refuses_what_it_cannot_run(debertas):
  from jaxprompt.models.deberta import DebertaV2Config

  _, _, ours = debertas["deberta-v3"]
  prefix = PrefixTuning(ours.prefix_slots(), table=np.zeros((P, 2, 2, 4, 8), np.float32)).prefix(1)
  with pytest.raises(ModelError, match="^deberta-v2 takes no key/value prefix"):
    ours.encode(jnp.ones((1, 4), jnp.int32), prefix=prefix)
  with pytest.raises(
    ModelError, match=r"^deberta-v2: a sequence head reads .* ContextPooler, and this checkpoint has no"
  ):
    ours.sequence_head()
  assert ours.token_head().name == "classifier"
  hf_cfg = ours.config.to_hf()
  assert DebertaV2Config.from_hf(hf_cfg) == ours.config
  with pytest.raises(ModelError, match="conv_kernel_size"):
    DebertaV2Config.from_hf({**hf_cfg, "conv_kernel_size": 3})
