"""Bad input: every user error is one clear line on stderr and a non-zero exit (--debug shows the traceback);
nothing already written is lost."""

import json
import logging
import shutil

import numpy as np
import pytest

from jaxprompt.cli import EXIT_USER_ERROR, main
from jaxprompt.data import encoding
from tests.helpers import write_config


def _err(capsys, argv) -> str:
  code = main(argv)
  err = capsys.readouterr().err.strip().splitlines()
  assert code == EXIT_USER_ERROR, err
  assert err and err[-1].startswith("jaxprompt: error: ")
  return err[-1]


@pytest.fixture
def cfg(byte_t5, tmp_path):
  return write_config(byte_t5, tmp_path / "c.yaml", 2)


def test_unknown_key_and_wrong_type(cfg, tmp_path, capsys):
  assert "unknown config key 'train.stpes' (did you mean 'steps'?)" in _err(
    capsys, ["train", str(cfg), "--workdir", str(tmp_path / "w"), "--set", "train.stpes=3"]
  )
  assert "train.batch_size: expected an integer, got 'big'" in _err(
    capsys, ["train", str(cfg), "--workdir", str(tmp_path / "w"), "--set", "train.batch_size=big"]
  )
  assert "config file 'nope.yaml' does not exist" in _err(capsys, ["train", "nope.yaml"])


def test_missing_or_wrong_model_path(cfg, tmp_path, capsys):
  msg = _err(capsys, ["train", str(cfg), "--workdir", str(tmp_path / "w"), "--set", f"model.path={tmp_path}/nope"])
  assert "does not exist" in msg and "nope" in msg
  (tmp_path / "empty").mkdir()
  assert "has no config.json" in _err(
    capsys, ["train", str(cfg), "--workdir", str(tmp_path / "w"), "--set", f"model.path={tmp_path}/empty"]
  )


def test_workdir_that_is_a_file_or_unwritable(cfg, tmp_path, capsys):
  (tmp_path / "f").write_text("x")
  assert "workdir" in (m := _err(capsys, ["train", str(cfg), "--workdir", str(tmp_path / "f")])) and "is a file" in m
  assert "cannot create workdir" in _err(capsys, ["train", str(cfg), "--workdir", str(tmp_path / "f" / "sub")])


def test_debug_shows_the_traceback(cfg, tmp_path):
  with pytest.raises(FileNotFoundError):
    main(["train", str(cfg), "--workdir", str(tmp_path / "w"), "--set", f"model.path={tmp_path}/nope", "--debug"])


def test_the_config_is_checked_against_task_and_mesh_before_any_work(cfg, tmp_path, capsys):
  w = tmp_path / "w"
  msg = _err(capsys, ["train", str(cfg), "--workdir", str(w), "--set", "eval.metric=acuracy"])
  assert "eval.metric 'acuracy' is not computed for task quickstart:max in eval.mode rank" in msg
  assert "available: eval_loss, eval_seq_accuracy, accuracy" in msg
  msg = _err(
    capsys, ["train", str(cfg), "--workdir", str(w), "--set", "train.batch_size=6", "--set", "train.microbatches=4"]
  )
  assert "train.batch_size 6 must be divisible by train.microbatches (4)" in msg
  assert not (w / "checkpoints").exists()  # refused before anything was trained or written


def test_a_bug_is_not_dressed_up_as_a_user_error(cfg, tmp_path, monkeypatch):
  """Only `UserError`s become one line; any other exception keeps its traceback."""
  from jaxprompt.training import trainer

  def broken(*a, **k):
    raise KeyError("an internal bug")

  monkeypatch.setattr(trainer, "train", broken)
  with pytest.raises(KeyError, match="an internal bug"):
    main(["train", str(cfg), "--workdir", str(tmp_path / "w")])


def test_tokenizer_that_does_not_match_the_model(cfg, tmp_path, capsys, fixtures_dir):
  from transformers import LlamaTokenizer

  src, tok = tmp_path / "spm", tmp_path / "tok"
  src.mkdir()
  shutil.copy(fixtures_dir / "tokenizers/llama2/tokenizer.model", src)
  LlamaTokenizer.from_pretrained(src).save_pretrained(tok)
  msg = _err(capsys, ["train", str(cfg), "--workdir", str(tmp_path / "w"), "--set", f"model.tokenizer={tok}"])
  assert "has 32000 tokens but the model's vocabulary has 384 rows" in msg


def test_imported_prompt_of_wrong_shape_or_for_another_base(cfg, byte_t5, tmp_path, capsys):
  np.save(tmp_path / "p.npy", np.zeros((7, 32), np.float32))
  base = ["train", str(cfg), "--workdir", str(tmp_path / "w"), "--set", "prompt.init=file"]
  assert "shape (7, 32), expected [P, H] = (4, 32)" in _err(
    capsys, base + ["--set", f"prompt.init_file={tmp_path}/p.npy"]
  )
  np.save(tmp_path / "q.npy", np.zeros((4, 32), np.float32))
  (tmp_path / "q.json").write_text(json.dumps({"base_model": {"path": "other", "fingerprint": "0123456789abcdef"}}))
  msg = _err(capsys, base + ["--set", f"prompt.init_file={tmp_path}/q.npy"])
  assert "was trained on base 'other' (fingerprint 0123456789abcdef)" in msg and "--allow-other-base" in msg
  code = main(
    base + ["--set", f"prompt.init_file={tmp_path}/q.npy", "--set", "prompt.allow_other_base=true", "--no-progress"]
  )
  assert code == 0


def test_empty_dataset_and_truncation_warning(cfg, tmp_path, capsys, caplog):
  from transformers import ByT5Tokenizer

  from jaxprompt.batches import Seq2SeqBatch
  from jaxprompt.errors import DataError

  tok = ByT5Tokenizer()
  with pytest.raises(DataError, match="train: the dataset is empty"):
    encoding.encode(Seq2SeqBatch, [], tok, input_length=8, target_length=2, name="train")
  with caplog.at_level(logging.WARNING):
    out = encoding.encode(
      Seq2SeqBatch,
      [{"inputs": "x" * 20, "targets": "y"}, {"inputs": "ab", "targets": "y" * 9}],
      tok,
      input_length=8,
      target_length=4,
      name="dev",
    )
  assert "dev: truncated 1 of 2 inputs to 8 tokens and 1 targets to 4 tokens" in caplog.text
  assert out.input_ids[0, -1] == tok.eos_token_id  # EOS kept after trimming, as seqio does


def test_resuming_a_workdir_with_another_base_is_refused(cfg, byte_t5, tmp_path, capsys):
  assert main(["train", str(cfg), "--workdir", str(tmp_path / "w"), "--no-progress"]) == 0
  other = tmp_path / "other"
  shutil.copytree(byte_t5, other)
  c = json.loads((other / "config.json").read_text())
  c["layer_norm_epsilon"] = 1e-5
  (other / "config.json").write_text(json.dumps(c))
  msg = _err(
    capsys,
    ["train", str(cfg), "--workdir", str(tmp_path / "w"), "--set", f"model.path={other}", "--set", "train.steps=4"],
  )
  assert "checkpoint was trained on base model" in msg and "use another --workdir" in msg


def test_full_disk_while_exporting_loses_nothing(cfg, tmp_path, capsys, monkeypatch):
  assert main(["train", str(cfg), "--workdir", str(tmp_path / "w"), "--no-progress"]) == 0
  assert main(["export", str(tmp_path / "w"), "--format", "numpy", "--out", str(tmp_path / "p.npy")]) == 0
  before = (tmp_path / "p.npy").read_bytes()
  import numpy

  def enospc(*a, **k):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(numpy, "save", enospc)
  msg = _err(
    capsys, ["export", str(tmp_path / "w"), "--format", "numpy", "--out", str(tmp_path / "p.npy"), "--overwrite"]
  )
  assert "No space left on device" in msg
  assert (tmp_path / "p.npy").read_bytes() == before
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".p.npy")]


def test_bad_dataset_rows_through_the_cli(cfg, tmp_path, capsys):
  good = {"premise": "It rained.", "hypothesis": "The ground is wet.", "label": 0}
  base = ["train", str(cfg), "--workdir", str(tmp_path / "w"), "--set", "data.task=cb"]
  for name, bad, want in [
    ("missing", {"premise": "p", "label": 1}, "field 'hypothesis': missing"),
    ("outside", dict(good, label=7), "field 'label': label index 7 is outside 0..2"),
    ("unknown", dict(good, label="maybe"), "field 'label': 'maybe' is not one of the labels"),
  ]:
    f = tmp_path / f"{name}.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in (good, bad)) + "\n")
    msg = _err(capsys, base + ["--set", f"data.files.train={f}", "--set", f"data.files.validation={f}"])
    assert f"{name}.jsonl line 2: {want}" in msg and "(task super_glue/cb)" in msg, msg
  assert not (tmp_path / "w" / "checkpoints").exists()  # nothing half-started


def test_malformed_adapter_json_is_one_line(cfg, tmp_path, capsys):
  bad = tmp_path / "adapter"
  bad.mkdir()
  from safetensors.numpy import save_file

  save_file({"prompt_embeddings": np.zeros((4, 32), np.float32)}, bad / "adapter_model.safetensors")
  (bad / "adapter_config.json").write_text("{not json")

  def init(f):
    return _err(
      capsys,
      [
        "train",
        str(cfg),
        "--workdir",
        str(tmp_path / "w"),
        "--set",
        "prompt.init=file",
        "--set",
        f"prompt.init_file={f}",
      ],
    )

  assert "adapter_config.json: invalid JSON" in init(bad)
  (bad / "adapter_config.json").write_text("[1, 2]")
  assert "adapter_config.json: expected a JSON object, got list" in init(bad)
  np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
  assert "obj.npy: not a numeric .npy array" in init(tmp_path / "obj.npy")
