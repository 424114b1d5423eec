"""llama.cpp GGUF files -> the same `Decoder`, through the same strict loader as HF checkpoints.

GGUF quirks handled here:
  * Dimensions are listed innermost first (ggml `ne`); gguf-py already hands arrays over in numpy
    (row-major) order, i.e. torch's [out, in] for projections. `GGUFFile.shape` reports that order for
    quantized tensors too.
  * q/k projections are stored in Meta's interleaved-RoPE layout: llama.cpp's converter applied
    `w.reshape(N, 2, D/2, H).swapaxes(1, 2)` per head to HF's half-split layout. We undo it
    (transform "gguf_rope"), so the model keeps transformers' RoPE.
  * Id fields use 0xFFFFFFFF (uint32 -1) for "none" (e.g. padding_token_id) — read as absent.
  * Llama 3.1 files carry llama3 RoPE scaling as a `rope_freqs.weight` tensor of frequency divisors.
Loading is strict: every tensor of the file must be consumed.

F32/F16 tensors are memory-mapped views; other types (BF16, quantized) are dequantized to float32 one
parameter at a time.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from jaxprompt.errors import MissingPathError, ModelError, WeightError
from jaxprompt.models import hf
from jaxprompt.models.decoder import DecoderConfig

_NONE_ID = 0xFFFFFFFF
_ARCHITECTURES = ("llama",)


def _gguf():
  try:
    import gguf
  except ImportError:
    raise ImportError("loading .gguf files needs the `gguf` package (pip install gguf)") from None
  return gguf


class GGUFFile:
  """A GGUF file: scalar metadata, and tensors by name with the CheckpointReader interface."""

  def __init__(self, path: str | os.PathLike):
    gguf = _gguf()
    self.path = Path(path)
    if not self.path.is_file():
      raise MissingPathError(f"GGUF file {str(path)!r} does not exist")
    try:
      self._reader = gguf.GGUFReader(self.path)
    except Exception as e:  # not a GGUF file, truncated ...
      raise WeightError(f"{self.path}: cannot read as GGUF ({type(e).__name__}: {e})") from None
    self._tensors = {t.name: t for t in self._reader.tensors}
    self._types = gguf.GGMLQuantizationType

  def field(self, key: str, default: Any = None) -> Any:
    f = self._reader.fields.get(key)
    if f is None:
      return default
    value = f.contents()
    if isinstance(value, int) and value == _NONE_ID and key.endswith("_id"):
      return None
    return value

  def scalar_metadata(self) -> dict[str, Any]:
    """Every non-array metadata field (what identifies the architecture)."""
    out = {}
    for key, f in self._reader.fields.items():
      if key.startswith("GGUF.") or len(f.types) != 1:
        continue
      out[key] = self.field(key)
    return out

  def keys(self) -> list[str]:
    return list(self._tensors)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(self._tensors[key].shape))  # ggml ne is innermost-first

  def get(self, key: str) -> np.ndarray:
    t = self._tensors[key]
    if t.tensor_type in (self._types.F32, self._types.F16):
      return t.data.reshape(self.shape(key))
    return _gguf().dequantize(t.data, t.tensor_type).reshape(self.shape(key))


# -- the interleaved-RoPE q/k layout ------------------------------------------------------------


def _rope_hf_shape(s):
  h, n, d = s
  return (n * d, h)


def _rope_to_ours(w, s):
  """GGUF [N*D, H] with each head's rows interleaved (pairs) -> ours [H, N, D] with halves split."""
  h, n, d = s
  return w.reshape(n, d // 2, 2, h).swapaxes(1, 2).reshape(n, d, h).transpose(2, 0, 1)


def _rope_to_gguf(a):
  h, n, d = a.shape
  return np.ascontiguousarray(a.transpose(1, 2, 0).reshape(n, 2, d // 2, h).swapaxes(1, 2).reshape(n * d, h))


hf.register_transform("gguf_rope", _rope_hf_shape, _rope_to_ours, _rope_to_gguf)


# -- metadata -> config, tensor names -> ours ----------------------------------------------------


def config_from_gguf(f: GGUFFile) -> DecoderConfig:
  arch = f.field("general.architecture")
  if arch not in _ARCHITECTURES:
    raise ModelError(f"{f.path}: GGUF architecture {arch!r} is not supported; supported: {_ARCHITECTURES}")

  def a(key, default=None):
    return f.field(f"{arch}.{key}", default)

  hidden, heads = a("embedding_length"), a("attention.head_count")
  head_dim = a("attention.key_length") or hidden // heads
  rope_dim = a("rope.dimension_count", head_dim)
  if rope_dim != head_dim:
    raise ModelError(
      f"{f.path}: partial rotary embeddings (rope.dimension_count {rope_dim} < head dim {head_dim}) are not supported"
    )
  scaling = a("rope.scaling.type", "none")
  if scaling not in ("none", "linear"):
    raise ModelError(f"{f.path}: rope scaling {scaling!r} is not supported (none, linear; llama3 via rope_freqs)")
  keys = set(f.keys())
  freq_factors = (
    tuple(np.asarray(f.get("rope_freqs.weight"), np.float32).tolist()) if "rope_freqs.weight" in keys else None
  )
  eos = f.field("tokenizer.ggml.eos_token_id")
  return DecoderConfig(
    model_type="llama",
    vocab_size=f.shape("token_embd.weight")[0],
    hidden_size=hidden,
    intermediate_size=a("feed_forward_length"),
    num_hidden_layers=a("block_count"),
    num_attention_heads=heads,
    num_key_value_heads=a("attention.head_count_kv", heads),
    head_dim=head_dim,
    norm_eps=a("attention.layer_norm_rms_epsilon", 1e-5),
    max_position_embeddings=a("context_length", 2048),
    rope_theta=a("rope.freq_base", 10000.0),
    rope_type="linear" if scaling == "linear" else "default",
    rope_factor=a("rope.scaling.factor", 1.0) if scaling == "linear" else 1.0,
    rope_freq_factors=freq_factors,
    tie_word_embeddings="output.weight" not in keys,
    bos_token_id=f.field("tokenizer.ggml.bos_token_id"),
    eos_token_id=eos,
    pad_token_id=f.field("tokenizer.ggml.padding_token_id"),
  )


def gguf_weight_map(cfg: DecoderConfig) -> list[tuple[str, str, str]]:
  blk = "blk.{i}"
  m = [
    ("embed_tokens", "token_embd.weight", "copy"),
    ("layers.attn.q", f"{blk}.attn_q.weight", "gguf_rope"),
    ("layers.attn.k", f"{blk}.attn_k.weight", "gguf_rope"),
    ("layers.attn.v", f"{blk}.attn_v.weight", "linear"),
    ("layers.attn.o", f"{blk}.attn_output.weight", "linear_out"),
    ("layers.attn_norm", f"{blk}.attn_norm.weight", "copy"),
    ("layers.mlp.wi_0", f"{blk}.ffn_gate.weight", "linear"),
    ("layers.mlp.wi_1", f"{blk}.ffn_up.weight", "linear"),
    ("layers.mlp.wo", f"{blk}.ffn_down.weight", "linear"),
    ("layers.mlp_norm", f"{blk}.ffn_norm.weight", "copy"),
    ("final_norm", "output_norm.weight", "copy"),
  ]
  if not cfg.tie_word_embeddings:
    m.append(("lm_head", "output.weight", "linear"))
  return m


# rope_freqs.weight is consumed into the config (static frequencies), not into a parameter.
_CONFIG_TENSORS = ("rope_freqs.weight",)


def open_checkpoint(path: str | os.PathLike) -> hf.Checkpoint:
  """A llama.cpp-style Llama GGUF file, ready for the strict loader (`jaxprompt.load_model` loads it)."""
  f = GGUFFile(path)
  config = config_from_gguf(f)
  identity = hf.ModelIdentity(
    path=str(path), revision=None, model_type=config.model_type, fingerprint=hf.config_fingerprint(f.scalar_metadata())
  )
  return hf.Checkpoint(f, config, gguf_weight_map(config), _CONFIG_TENSORS, identity, str(f.path))


# -- tokenizer ----------------------------------------------------------------------------------


def load_gguf_tokenizer(path: str | os.PathLike):
  """A transformers tokenizer built from the vocabulary embedded in a GGUF file.

  SentencePiece vocabularies (`tokenizer.ggml.model` "llama") are rebuilt as a SentencePiece model
  (pieces, scores, types as stored) and converted by transformers. BOS is added when the file says so
  (`tokenizer.ggml.add_bos_token`), and by default, as llama.cpp does for these vocabularies. Other
  vocabularies go through transformers' own GGUF support.
  """
  f = GGUFFile(path)
  kind = f.field("tokenizer.ggml.model")
  if kind != "llama":
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(f.path.parent), gguf_file=f.path.name)
  from sentencepiece import sentencepiece_model_pb2 as spm_pb
  from transformers import LlamaTokenizer

  tokens = f.field("tokenizer.ggml.tokens")
  scores = f.field("tokenizer.ggml.scores") or [0.0] * len(tokens)
  types = f.field("tokenizer.ggml.token_type") or [1] * len(tokens)
  ids = {name: f.field(f"tokenizer.ggml.{name}_token_id") for name in ("unknown", "bos", "eos", "padding")}
  proto = spm_pb.ModelProto()
  for piece, score, kind_id in zip(tokens, scores, types, strict=False):
    # GGUF token types use SentencePiece's numbering (1 normal, 2 unknown, 3 control, 4 user, 5 unused, 6 byte)
    proto.pieces.add(piece=piece, score=float(score), type=int(kind_id))
  t = proto.trainer_spec
  t.model_type = spm_pb.TrainerSpec.BPE
  t.vocab_size = len(tokens)
  t.byte_fallback = 6 in set(types)
  t.unk_id, t.bos_id, t.eos_id, t.pad_id = (
    -1 if ids[k] is None else ids[k] for k in ("unknown", "bos", "eos", "padding")
  )
  n = proto.normalizer_spec
  n.name = "identity"
  n.add_dummy_prefix = bool(f.field("tokenizer.ggml.add_space_prefix", True))
  n.remove_extra_whitespaces = False
  n.escape_whitespaces = True
  special = {
    f"{k}_token": tokens[i]
    for k, i in (("unk", ids["unknown"]), ("bos", ids["bos"]), ("eos", ids["eos"]), ("pad", ids["padding"]))
    if i is not None
  }
  with tempfile.TemporaryDirectory() as tmp:
    (Path(tmp) / "tokenizer.model").write_bytes(proto.SerializeToString())
    return LlamaTokenizer.from_pretrained(
      tmp,
      add_bos_token=bool(f.field("tokenizer.ggml.add_bos_token", True)),
      add_eos_token=bool(f.field("tokenizer.ggml.add_eos_token", False)),
      **special,
    )
