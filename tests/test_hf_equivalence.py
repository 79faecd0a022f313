"""Our BERT in float32 computes what transformers' BertForPreTraining computes, given its weights.

A small random HF model (vocab 99, so padding to 128 is exercised; random biases and LayerNorm
parameters, and a large init range so attention is far from uniform) is converted with
`pretrain.hf_convert` and both run on one batch with trailing padding and padded predictions.
"""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from pretrain.model import hf_convert  # noqa: E402
from pretrain.model.bert import BertForPreTraining  # noqa: E402
from pretrain.model.heads import loss_sums, total_loss  # noqa: E402

VOCAB, HIDDEN, LAYERS, HEADS, MLP, MAX_POS = 99, 64, 2, 4, 128, 64
LENGTHS, SEQ, PREDICTIONS = (16, 11, 6), 16, 5
NUM_PREDICTIONS = (5, 3, 2)     # real masked positions per row; the rest are padding (weight 0)
ATOL = 1e-4


def hf_model(hidden_act: str = "gelu", seed: int = 0):
  torch.manual_seed(seed)
  config = transformers.BertConfig(
      vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
      intermediate_size=MLP, max_position_embeddings=MAX_POS, hidden_act=hidden_act,
      initializer_range=0.2, attn_implementation="eager")
  model = transformers.BertForPreTraining(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias"):
        p.normal_(0.0, 0.1)
      elif "LayerNorm" in name:
        p.normal_(1.0, 0.1)
  return model


def state_dict_numpy(module) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def our_model(params: dict, config) -> BertForPreTraining:
  abstract = nnx.eval_shape(lambda: BertForPreTraining(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return nnx.merge(graphdef, state)


def make_batch() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  b = len(LENGTHS)
  mask = (np.arange(SEQ)[None] < np.asarray(LENGTHS)[:, None]).astype(np.int32)
  segment = np.zeros((b, SEQ), np.int32)
  positions = np.zeros((b, PREDICTIONS), np.int32)
  ids = np.zeros((b, PREDICTIONS), np.int32)
  weights = np.zeros((b, PREDICTIONS), np.float32)
  for row, (length, k) in enumerate(zip(LENGTHS, NUM_PREDICTIONS)):
    segment[row, length // 2:length] = 1
    positions[row, :k] = np.sort(rng.choice(np.arange(1, length), k, replace=False))
    ids[row, :k] = rng.integers(1, VOCAB, k)
    weights[row, :k] = 1.0
  ids[0, 0] = VOCAB - 1  # the last real vocabulary entry, next to the padding
  return dict(input_ids=rng.integers(1, VOCAB, (b, SEQ)).astype(np.int32) * mask,
              input_mask=mask, segment_ids=segment, masked_lm_positions=positions,
              masked_lm_ids=ids, masked_lm_weights=weights,
              next_sentence_labels=np.asarray([0, 1, 0], np.int32))


@pytest.fixture(scope="module", params=["gelu", "gelu_new"])
def outputs(request):
  """HF and our outputs on one batch, for HF hidden_act gelu (exact) and gelu_new (tanh)."""
  hf = hf_model(request.param)
  config = hf_convert.bert_config_from_hf(hf.config.to_dict(), dtype="float32")
  model = our_model(hf_convert.params_from_hf(hf.state_dict(), config), config)
  batch = make_batch()

  labels = np.full((len(LENGTHS), SEQ), -100, np.int64)
  for row, col in zip(*np.nonzero(batch["masked_lm_weights"])):
    labels[row, batch["masked_lm_positions"][row, col]] = batch["masked_lm_ids"][row, col]
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
                attention_mask=torch.tensor(batch["input_mask"], dtype=torch.long),
                token_type_ids=torch.tensor(batch["segment_ids"], dtype=torch.long),
                labels=torch.tensor(labels),
                next_sentence_label=torch.tensor(batch["next_sentence_labels"], dtype=torch.long),
                output_hidden_states=True)
  ours = model({k: jnp.asarray(v) for k, v in batch.items()})
  sums = loss_sums(ours.mlm_logits, ours.nsp_logits, batch)
  return dict(config=config, batch=batch, theirs=theirs, ours=ours,
              loss=total_loss(sums, sums.mlm_weight, sums.num_sequences))


def assert_close(name: str, ours, theirs, atol: float = ATOL):
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
  diff = np.abs(ours - theirs).max()
  print(f"{name}: max abs diff {diff:.3g} (max |value| {np.abs(theirs).max():.3g})")
  assert diff < atol, f"{name}: max abs diff {diff}"


def test_sequence_output(outputs):
  ours, theirs = outputs["ours"].sequence_output, outputs["theirs"].hidden_states[-1].numpy()
  real = outputs["batch"]["input_mask"].astype(bool)
  assert_close("sequence output (real tokens)", np.asarray(ours)[real], theirs[real])
  assert_close("sequence output (all positions)", ours, theirs)


def test_mlm_logits(outputs):
  positions = outputs["batch"]["masked_lm_positions"]
  theirs = np.take_along_axis(outputs["theirs"].prediction_logits.numpy(),
                              positions[..., None], axis=1)
  assert_close("MLM logits", outputs["ours"].mlm_logits[..., :VOCAB], theirs)


def test_nsp_logits(outputs):
  assert_close("NSP logits", outputs["ours"].nsp_logits,
               outputs["theirs"].seq_relationship_logits.numpy())


def test_total_loss(outputs):
  assert_close("total loss", outputs["loss"], outputs["theirs"].loss.item())


def test_padded_vocab_never_wins(outputs):
  logits = np.asarray(outputs["ours"].mlm_logits)
  assert logits.shape[-1] == outputs["config"].padded_vocab_size == 128
  assert np.all(logits[..., VOCAB:] <= np.finfo(np.float32).min / 2)
  assert np.all(logits.argmax(-1) < VOCAB)
  assert np.all(np.asarray(jax.nn.softmax(logits, -1))[..., VOCAB:] == 0.0)


def test_config_from_hf():
  hf_config = hf_model("gelu_new").config.to_dict()
  config = hf_convert.bert_config_from_hf(hf_config, dtype="float32")
  assert (config.vocab_size, config.hidden_size, config.num_layers, config.num_heads,
          config.intermediate_size, config.max_position_embeddings) == (
              VOCAB, HIDDEN, LAYERS, HEADS, MLP, MAX_POS)
  assert config.hidden_act == "gelu_tanh" and config.dtype == "float32"
  assert config.layer_norm_eps == hf_config["layer_norm_eps"]
  assert config.hidden_dropout == hf_config["hidden_dropout_prob"]
  assert config.attention_dropout == hf_config["attention_probs_dropout_prob"]
  with pytest.raises(ValueError, match="silu"):
    hf_convert.bert_config_from_hf({**hf_config, "hidden_act": "silu"})


@pytest.fixture(scope="module")
def hf_and_config():
  hf = hf_model()
  return hf, hf_convert.bert_config_from_hf(hf.config.to_dict(), dtype="float32")


def test_params_fit_our_model(hf_and_config):
  hf, config = hf_and_config
  params = hf_convert.params_from_hf(hf.state_dict(), config)
  abstract = nnx.eval_shape(lambda: BertForPreTraining(config, rngs=nnx.Rngs(0)))
  expected = nnx.to_pure_dict(nnx.split(abstract)[1])
  assert jax.tree.structure(params) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
    assert got.shape == want.shape and got.dtype == np.float32
  assert not params["bert"]["embeddings"]["word_embeddings"][VOCAB:].any()
  assert not params["mlm"]["bias"][VOCAB:].any()


def test_round_trip_is_exact(hf_and_config):
  hf, config = hf_and_config
  sd = state_dict_numpy(hf)
  back = hf_convert.hf_from_params(hf_convert.params_from_hf(sd, config), config)
  assert back.keys() == sd.keys()
  for k in sd:
    assert back[k].dtype == sd[k].dtype and np.array_equal(back[k], sd[k]), k
  fresh = hf_model(seed=1)
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_encoder_only_checkpoint(hf_and_config):
  """A BertModel state_dict (no "bert." prefix, no heads), e.g. a sentence-transformers model."""
  hf, config = hf_and_config
  sd = state_dict_numpy(hf.bert)
  params = hf_convert.params_from_hf(sd, config, with_heads=False)
  assert params.keys() == {"bert"}
  full = hf_convert.params_from_hf(hf.state_dict(), config)
  jax.tree.map(np.testing.assert_array_equal, params["bert"], full["bert"])
  back = hf_convert.hf_from_params(params, config)
  assert back.keys() == sd.keys()
  assert all(np.array_equal(back[k], sd[k]) for k in sd)
  # A full checkpoint read without heads gives the same encoder.
  jax.tree.map(np.testing.assert_array_equal, params,
               hf_convert.params_from_hf(hf.state_dict(), config, with_heads=False))


def test_clear_errors(hf_and_config):
  hf, config = hf_and_config
  sd = state_dict_numpy(hf)
  key = "bert.encoder.layer.1.attention.self.key.weight"
  with pytest.raises(ValueError, match=key.replace(".", r"\.")):
    hf_convert.params_from_hf({**sd, key: sd[key][:, :32]}, config)
  missing = "bert.encoder.layer.1.output.LayerNorm.bias"
  with pytest.raises(KeyError, match=missing.replace(".", r"\.")):
    hf_convert.params_from_hf({k: v for k, v in sd.items() if k != missing}, config)
  with pytest.raises(KeyError, match=r"'cls\.predictions\."):  # heads asked for, not there
    hf_convert.params_from_hf(state_dict_numpy(hf.bert), config)
  with pytest.raises(ValueError, match=r"bert\.encoder\.layer\.1\."):  # config has fewer layers
    hf_convert.params_from_hf(sd, hf_convert.bert_config_from_hf(
        {**hf.config.to_dict(), "num_hidden_layers": 1}))
  untied = {**sd, "cls.predictions.decoder.weight": sd["cls.predictions.decoder.weight"] + 1}
  with pytest.raises(ValueError, match="not tied"):
    hf_convert.params_from_hf(untied, config)
