"""Typed configs: every shipped YAML validates; bad keys and types are one-line errors naming them."""

from pathlib import Path

import pytest

from jaxprompt import config as C

CONFIGS = sorted(p for p in (Path(__file__).parent.parent / "configs").rglob("*.yaml") if not p.name.startswith("_"))
FRAGMENTS = sorted((Path(__file__).parent.parent / "configs").rglob("_*.yaml"))  # included by others, not run alone


def test_there_are_configs():
  names = {p.name for p in CONFIGS}
  assert "quickstart.yaml" in names and len(CONFIGS) >= 6


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_shipped_config_loads(path):
  cfg = C.load(path)
  assert cfg.prompt.length > 0 and cfg.train.steps > 0 and cfg.train.batch_size > 0
  assert cfg.model.path


def test_paper_configs_use_the_original_hyperparameters():
  for path in CONFIGS:
    if "paper" not in path.parts:
      continue
    cfg = C.load(path)
    o = cfg.optimizer
    assert (o.name, o.learning_rate, o.decay_rate, o.clipping_threshold, o.weight_decay, o.momentum) == (
      "adafactor",
      0.3,
      0.8,
      1.0,
      1e-5,
      None,
    )
    assert (cfg.prompt.length, cfg.prompt.init, cfg.train.batch_size, cfg.train.steps) == (
      100,
      "class_labels",
      32,
      30000,
    )
    assert cfg.train.z_loss == 1e-4 and cfg.model.dropout == 0.1 and cfg.model.compute_dtype == "bfloat16"
    assert cfg.model.path.startswith("google/t5-") and cfg.model.path.endswith("-lm-adapt")
    assert cfg.model.allow_pytorch_bin  # these hub repos ship pytorch_model.bin


def test_paper_configs_are_one_recipe_and_small_overlays():
  paper = [p for p in CONFIGS if "paper" in p.parts]
  assert len(paper) == 5 and [f.name for f in FRAGMENTS] == ["_recipe.yaml"]
  recipe = C.load(FRAGMENTS[0])
  for path in paper:
    cfg = C.load(path)
    assert "include: _recipe.yaml" in path.read_text()
    for section in ("prompt", "data", "optimizer", "train", "eval", "checkpoint"):
      assert getattr(cfg, section) == getattr(recipe, section), (path.name, section)


def test_includes_merge_key_by_key_and_refuse_cycles(tmp_path):
  (tmp_path / "base.yaml").write_text("train:\n  steps: 7\n  batch_size: 4\nprompt:\n  length: 3\n")
  (tmp_path / "top.yaml").write_text("include: base.yaml\ntrain:\n  steps: 9\n")
  cfg = C.load(tmp_path / "top.yaml", ["prompt.length=5"])
  assert (cfg.train.steps, cfg.train.batch_size, cfg.prompt.length) == (9, 4, 5)
  (tmp_path / "a.yaml").write_text("include: b.yaml\n")
  (tmp_path / "b.yaml").write_text("include: a.yaml\n")
  with pytest.raises(C.ConfigError, match="includes itself"):
    C.load(tmp_path / "a.yaml")
  (tmp_path / "c.yaml").write_text("include: missing.yaml\n")
  with pytest.raises(C.ConfigError, match="missing.yaml' does not exist"):
    C.load(tmp_path / "c.yaml")


def test_unknown_key_suggests_the_closest(tmp_path):
  f = tmp_path / "c.yaml"
  f.write_text("train:\n  step: 10\n")
  with pytest.raises(C.ConfigError, match=r"unknown config key 'train.step' \(did you mean 'steps'\?\)"):
    C.load(f)


@pytest.mark.parametrize(
  "override,message",
  [
    ("train.steps=ten", "train.steps: expected an integer, got 'ten'"),
    ("prompt.init=magic", "prompt.init: 'magic' is not one of"),
    ("optimizer.learning_rate=fast", "optimizer.learning_rate: expected a number"),
    ("promt.length=3", "unknown config key 'promt' (did you mean 'prompt'?)"),
    ("train.steps", "is not of the form section.key=value"),
  ],
)
def test_bad_overrides(override, message):
  with pytest.raises(C.ConfigError) as e:
    C.load(None, [override])
  assert message in str(e.value) and "\n" not in str(e.value)


def test_overrides_parse_yaml_values_and_defaults_live_in_the_schema():
  cfg = C.load(
    None, ["train.steps=7", "prompt.init_range=[0, 0.5]", "data.files.train=/x.jsonl", "optimizer.grad_clip_norm=null"]
  )
  assert cfg.train.steps == 7 and cfg.prompt.init_range == (0.0, 0.5) and cfg.data.files == {"train": "/x.jsonl"}
  assert cfg.optimizer.grad_clip_norm is None
  assert C.load(None).optimizer.name == "adafactor" and C.load(None).prompt.init_range == (-0.5, 0.5)
  assert C.from_dict(C.load(None, ["train.steps=7"]).to_dict()).train.steps == 7


def test_generate_settings_come_from_the_config_section_then_the_flags(tmp_path):
  from jaxprompt.cli import _generate_config, build_parser

  f = tmp_path / "g.yaml"
  f.write_text("generate:\n  method: beam\n  num_beams: 3\n  max_new_tokens: 5\n")

  def parse(*argv):
    return _generate_config(build_parser().parse_args(["generate", *argv]))

  g = parse("--config", str(f), "--max-new-tokens", "7")
  assert (g.method, g.num_beams, g.max_new_tokens) == ("beam", 3, 7)
  g = parse("--temperature", "0.5")
  assert (g.method, g.temperature, g.max_new_tokens) == ("sample", 0.5, C.GenerateConfig().max_new_tokens)
  g = parse("--set", "generate.top_k=4", "--greedy")
  assert (g.method, g.top_k) == ("greedy", 4)
  with pytest.raises(C.ConfigError, match="generate.temperature must be > 0"):
    parse("--temperature", "0")
