"""The method registry, typed specs and `PromptRecord`, against records written before they existed.

tests/data/legacy_records/ holds what jaxprompt 10ebb06 (dict specs and provenance) wrote for the quickstart config
trained 4 steps (prompt tuning, the prefix_tuning and p_tuning method configs, the per-task mixture), exported to
numpy, safetensors and PEFT: checkpoint metadata (checkpoints/4/meta/metadata), jaxprompt.json files, .json side
files, safetensors metadata, and one whole prompt-tuning workdir (its step 4: prompt and metadata only).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from jaxprompt.errors import PromptError
from jaxprompt.models.interface import PrefixSlots
from jaxprompt.prompts import registry
from jaxprompt.prompts.adaption import AdaptionSpec
from jaxprompt.prompts.encoders import PTuningSpec
from jaxprompt.prompts.io import load_prompt_source, load_trained_prompt
from jaxprompt.prompts.multitask import MultitaskSpec
from jaxprompt.prompts.prefix import PrefixTuningSpec
from jaxprompt.prompts.record import PromptRecord, TaskMember, TaskRecord
from jaxprompt.prompts.residual import ResidualSpec
from jaxprompt.prompts.soft import PromptTuningSpec

LEGACY = Path(__file__).resolve().parent / "data" / "legacy_records"
FINGERPRINT = "2efee27d35b92e84"  # the quickstart base the legacy records were trained on
DIGITS = tuple(str(i) for i in range(10))


def _json(name: str) -> dict:
  return json.loads((LEGACY / name).read_text())


def _safetensors_record(name: str) -> dict:
  return json.loads(_json(name)["jaxprompt"])


LEGACY_RECORDS = {  # file -> its JSON record
  **{
    f: _json(f)
    for f in (
      "checkpoint_prompt_tuning.json",
      "checkpoint_prefix_tuning.json",
      "checkpoint_p_tuning.json",
      "checkpoint_mixture.json",
      "prompt_tuning.json",
      "prefix_tuning.json",
      "mixture_member.json",
      "peft_prompt_tuning.jaxprompt.json",
      "peft_prefix_tuning.jaxprompt.json",
      "peft_p_tuning.jaxprompt.json",
      "peft_mixture_member.jaxprompt.json",
    )
  },
  **{
    f: _safetensors_record(f)
    for f in ("safetensors_prompt_tuning.json", "safetensors_p_tuning.json", "safetensors_mixture_bank.json")
  },
}


def test_every_legacy_record_loads_with_its_base_architecture_and_spec():
  for name, d in LEGACY_RECORDS.items():
    r = PromptRecord.from_json(d)
    assert r.base.fingerprint == FINGERPRINT and r.base.path == "builtin:quickstart", name
    assert (r.architecture.kind, r.architecture.hidden_size, r.architecture.num_layers) == ("seq2seq", 64, 2), name
    assert r.spec.to_json() == d["prompt_spec"], name  # the spec's JSON is the dict it always was
    assert r.step == 4 and r.metrics["accuracy"] > 0, name
    # what it says again is what it said (a checkpoint's training counters aside)
    again = r.to_json()
    assert {k: again[k] for k in d if k in again} == {k: v for k, v in d.items() if k in again}, name
    assert all(d.get(k) is not None for k in again if k not in ("prompt_config", "tokenizer")), name


def test_legacy_specs_are_typed_with_their_options():
  pt = PromptRecord.from_json(LEGACY_RECORDS["checkpoint_prompt_tuning.json"])
  assert pt.spec == PromptTuningSpec() and pt.method == "prompt_tuning"
  prefix = PromptRecord.from_json(LEGACY_RECORDS["checkpoint_prefix_tuning.json"]).spec
  assert isinstance(prefix, PrefixTuningSpec) and prefix.prefix_projection and prefix.encoder_hidden_size == 512
  assert prefix.slots == PrefixSlots(layers=2, heads=4, head_dim=16, layer_of=(0, 0))
  assert prefix.describe() == "prefix_tuning (with projection)"
  ptun = PromptRecord.from_json(LEGACY_RECORDS["checkpoint_p_tuning.json"]).spec
  assert ptun == PTuningSpec(
    encoder_reparameterization_type="LSTM", encoder_hidden_size=64, encoder_num_layers=2, encoder_dropout=0.0
  )
  assert PromptRecord.from_json(LEGACY_RECORDS["safetensors_p_tuning.json"]).spec == ptun


def test_legacy_checkpoint_records_carry_the_config_its_tokenizer_and_prompt_section():
  d = LEGACY_RECORDS["checkpoint_p_tuning.json"]
  r = PromptRecord.from_json(d)
  assert r.config == d["config"] and r.prompt_config == d["config"]["prompt"] and r.tokenizer is None
  assert r.task == TaskRecord(name="quickstart", labels=DIGITS) and r.export is None
  # a checkpoint from before tasks were recorded names its task in its config
  old = {k: v for k, v in d.items() if k != "task"}
  assert PromptRecord.from_json(old).task == TaskRecord(name="quickstart")
  # and one from before the soft-prompt family has no spec: prompt tuning
  assert PromptRecord.from_json({k: v for k, v in d.items() if k != "prompt_spec"}).spec == PromptTuningSpec()


def test_legacy_mixture_records_are_banks_of_named_tasks():
  members = (TaskMember("quickstart:max", DIGITS), TaskMember("quickstart:min", DIGITS))
  want = TaskRecord(name="quickstart:max+quickstart:min", labels=DIGITS, mixture=members, per_task=True)
  for name in ("checkpoint_mixture.json", "safetensors_mixture_bank.json"):
    r = PromptRecord.from_json(LEGACY_RECORDS[name])
    assert r.task == want and r.task.bank_tasks == ["quickstart:max", "quickstart:min"], name
  member = PromptRecord.from_json(LEGACY_RECORDS["checkpoint_mixture.json"]).bank_member(1)
  assert member.task == TaskRecord(name="quickstart:min", labels=DIGITS) and member.bank_index == 1
  for name, task in (
    ("mixture_member.json", "quickstart:max"),
    ("peft_mixture_member.jaxprompt.json", "quickstart:min"),
  ):
    r = PromptRecord.from_json(LEGACY_RECORDS[name])
    assert r.task == TaskRecord(name=task, labels=DIGITS) and r.task.bank_tasks is None, name


def test_legacy_export_records_keep_their_stamp_source_and_prompt_section():
  r = PromptRecord.from_json(LEGACY_RECORDS["peft_prompt_tuning.jaxprompt.json"])
  assert (r.export.format, r.export.export_format, r.export.prompt_length, r.export.hidden_size) == (
    "jaxprompt-prompt/1",
    "peft",
    10,
    64,
  )
  assert r.source == "/tmp/legacy/pt/checkpoints/4" and r.prompt_config["init"] == "sampled_vocab"
  assert r.config is None and r.hidden_size == 64
  prefix = PromptRecord.from_json(LEGACY_RECORDS["prefix_tuning.json"])
  assert prefix.export.export_format == "numpy" and prefix.spec.prefix_projection


def test_a_legacy_workdir_and_its_exports_still_load(tmp_path):
  work = tmp_path / "work"  # a copy: reading a workdir must not depend on where it was written
  shutil.copytree(LEGACY / "workdir_prompt_tuning", work)
  tp = load_prompt_source(work)
  exported = np.load(LEGACY / "prompt_tuning.npy")  # the same step, exported by the legacy code
  np.testing.assert_array_equal(tp.value, exported)
  assert tp.spec == PromptTuningSpec() and tp.record.step == 4 and tp.record.source == str(work / "checkpoints" / "4")
  assert tp.record.base.fingerprint == FINGERPRINT and tp.record.task.name == "quickstart"
  assert set(tp.params) == {"embeddings"}
  npy = load_prompt_source(LEGACY / "prompt_tuning.npy")
  np.testing.assert_array_equal(npy.value, exported)
  assert npy.record.base.fingerprint == FINGERPRINT and npy.record.export.export_format == "numpy"
  prefix = load_prompt_source(LEGACY / "prefix_tuning.npy")
  assert prefix.value.shape == (10, 2, 2, 4, 16) and prefix.spec.prefix_projection
  with pytest.raises(PromptError, match="not input embeddings"):
    prefix.embeddings("prefix_tuning.npy")
  ptun = load_prompt_source(LEGACY / "p_tuning.safetensors")
  assert ptun.value.shape == (10, 64) and ptun.spec.encoder_reparameterization_type == "LSTM"
  value, info = load_trained_prompt(LEGACY / "prompt_tuning.npy")
  assert info["base_model"]["fingerprint"] == FINGERPRINT and info["prompt_spec"] == {"method": "prompt_tuning"}


def test_the_registry_names_every_method_and_refuses_others():
  assert registry.names() == ["prompt_tuning", "p_tuning", "prefix_tuning", "residual", "dept", "multitask", "adaption"]
  assert registry.names(embeds=True) == ["prompt_tuning", "p_tuning", "residual"]
  with pytest.raises(
    PromptError, match="unknown prompt method 'deep'; registered: prompt_tuning, p_tuning, prefix_tuning, residual"
  ):
    registry.get("deep")
  for name, entry in registry.METHODS.items():
    assert entry.name == entry.spec_type.method == name
    # a residual prompt's PROMPT_TUNING adapter is a plain prompt: it reads back as prompt_tuning
    assert registry.by_peft_type(entry.peft_type) is (registry.get("prompt_tuning") if name == "residual" else entry)
  assert registry.by_peft_type("LORA") is None
  with pytest.raises(PromptError, match="unknown prompt method 'deep'"):
    registry.spec_from_json({"method": "deep"})


def test_specs_round_trip_through_json():
  slots = PrefixSlots(layers=3, heads=2, head_dim=4, layer_of=(0, 1, 2, 0), peft_problem="unequal depths")
  for spec in (
    PromptTuningSpec(),
    PTuningSpec("MLP", 16, 2, 0.0),
    PrefixTuningSpec(),
    PrefixTuningSpec(prefix_projection=True, slots=slots, encoder_hidden_size=8),
    ResidualSpec(16, "tanh", False, 0.1, True, "MLP2"),
    MultitaskSpec(rank=3),
    AdaptionSpec(num_layers=5, peft_problem="GQA arithmetic"),
  ):
    d = json.loads(json.dumps(spec.to_json()))
    assert registry.spec_from_json(d) == spec and d["method"] == spec.method
  assert PrefixTuningSpec().to_json() == {"method": "prefix_tuning", "prefix_projection": False}
  assert registry.spec_from_json(None) == registry.spec_from_json({}) == PromptTuningSpec()
