"""Export to transformers (`python -m tools.convert_checkpoint export`): transformers computes our
logits from the exported folder, transformers -> ours -> transformers gives back the very tensors,
AutoTokenizer tokenizes as our tokenizer does, and a bad workdir ends in one `error:` line.

The workdirs are made without training: a small random transformers BertForPreTraining with a hand
uncased WordPiece vocabulary is imported (the import writes the pretraining layout: config.json,
tokenizer.json, checkpoints/0/state), and fine-tuning workdirs are written as
`finetune.train.run_seed` leaves them (config.json, seed_0/best/<step>/state) with random heads.
"""

import json
import shutil
import string

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from configs.glue import get_config as glue_config  # noqa: E402
from configs.squad import get_config as squad_config  # noqa: E402
from finetune import heads  # noqa: E402
from finetune import pretrained as pretrained_lib  # noqa: E402
from finetune import train as ft_train  # noqa: E402
from finetune.task import make_task  # noqa: E402
from pretrain.checkpoint import Checkpointer  # noqa: E402
from pretrain.data.spm_training import train_sentencepiece  # noqa: E402
from pretrain.data.tokenizer import SPECIAL_TOKENS, load_tokenizer  # noqa: E402
from pretrain.logs import write_config  # noqa: E402
from pretrain.model import hf_convert  # noqa: E402
from pretrain.model.bert import stack_layer_params  # noqa: E402
from pretrain.model.config import BertConfig  # noqa: E402
from tests.test_hf_equivalence import VOCAB, hf_model, make_batch, our_model  # noqa: E402
from tools import convert_checkpoint  # noqa: E402

ATOL = 1e-5
# 99 entries (VOCAB): every lowercase word splits into these, so the tokenizers meet real text.
WORDS = ("the of and to in is was he that it his with as for had but at on by be this from whale "
         "sea ship call me some years ago never mind how long little or no").split()
VOCABULARY = [*SPECIAL_TOKENS, *".,!?'", *string.ascii_lowercase,
              *(f"##{c}" for c in string.ascii_lowercase), *WORDS]
TEXTS = [("Call me Ishmael.", "Some years ago - never mind how long precisely!"),
         ("The WHALE, the Ship and the Sea?", "Ça n'a rien à voir: 東京 (naïve café)"),
         ("", "a"), ("He   was\tat sea", "on deck")]


def _hf_folder(tmp_path_factory, hidden_act: str, encoder_only: bool = False):
  """A saved random transformers BERT (biases and norms too) with VOCABULARY, uncased."""
  assert len(VOCABULARY) == VOCAB
  hf = hf_model(hidden_act)
  folder = tmp_path_factory.mktemp("hf")
  (hf.bert if encoder_only else hf).save_pretrained(folder)
  (folder / "vocab.txt").write_text("\n".join(VOCABULARY) + "\n", encoding="utf-8")
  (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
  return hf, folder


def _main(*argv) -> int:
  return convert_checkpoint.main([str(a) for a in argv])


def _command(capsys, *argv) -> tuple[int, str, str]:
  status = _main(*argv)
  out, err = capsys.readouterr()
  return status, out, err


def _run(capsys, *argv) -> str:
  status, out, err = _command(capsys, *argv)
  assert status == 0, err
  return out


def _apply(model, inputs: dict):
  """model(inputs) as one compiled program: faster on CPU than op by op."""
  graphdef, state = nnx.split(model)
  inputs = {k: jnp.asarray(v) for k, v in inputs.items()}
  return jax.jit(lambda state, inputs: nnx.merge(graphdef, state)(inputs))(state, inputs)


def _safetensors(folder) -> dict[str, np.ndarray]:
  return safetensors_numpy.load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module", params=["gelu", "gelu_pytorch_tanh"])
def pretraining(request, tmp_path_factory):
  """(transformers model, its folder, the workdir its import wrote, that workdir's export)."""
  hf, folder = _hf_folder(tmp_path_factory, request.param)
  workdir = tmp_path_factory.mktemp("run") / "workdir"
  assert _main(f"--hf_dir={folder}", f"--workdir={workdir}") == 0   # the flag form of before
  out = tmp_path_factory.mktemp("export") / "bert"
  assert _main("export", f"--workdir={workdir}", f"--output={out}") == 0
  return hf, folder, workdir, out


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
  """(transformers model, the workdir of its import): the run fine-tuning workdirs start from."""
  hf, folder = _hf_folder(tmp_path_factory, "gelu")
  workdir = tmp_path_factory.mktemp("encoder") / "workdir"
  assert _main("import", f"--hf_dir={folder}", f"--workdir={workdir}") == 0
  return hf, workdir


# ------------------------------------------------------------------------------------------------
# Pretraining: BertForPreTraining


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_tanh", "relu"])
def test_config_maps_both_ways(hidden_act):
  ours = BertConfig(vocab_size=99, hidden_size=48, num_layers=3, num_heads=6,
                    intermediate_size=80, max_position_embeddings=40, type_vocab_size=3,
                    hidden_act=hidden_act, hidden_dropout=0.2, attention_dropout=0.3,
                    layer_norm_eps=1e-7, initializer_range=0.05)
  theirs = hf_convert.hf_config_from_bert(ours, pad_token_id=0)
  assert hf_convert.bert_config_from_hf(theirs) == ours
  config = transformers.BertConfig(**theirs)
  assert config.vocab_size == 99 != ours.padded_vocab_size   # the real vocabulary, not the padded
  assert config.layer_norm_eps == 1e-7 and config.type_vocab_size == 3


def test_round_trip_is_lossless(pretraining):
  """transformers -> ours (import) -> transformers (export): the same tensors, bit for bit, under
  the same names as transformers' own save_pretrained writes, and the same configuration."""
  _, folder, _, out = pretraining
  theirs, back = _safetensors(folder), _safetensors(out)
  assert back.keys() == theirs.keys()
  for name, tensor in theirs.items():
    assert back[name].dtype == tensor.dtype and np.array_equal(back[name], tensor), name
  original = json.loads((folder / "config.json").read_text())
  exported = json.loads((out / "config.json").read_text())
  for key in ("architectures", "vocab_size", "hidden_size", "num_hidden_layers",
              "num_attention_heads", "intermediate_size", "max_position_embeddings",
              "type_vocab_size", "hidden_act", "hidden_dropout_prob",
              "attention_probs_dropout_prob", "layer_norm_eps", "initializer_range",
              "pad_token_id"):
    assert exported[key] == original[key], key


def test_pretraining_logits_match(pretraining):
  hf, _, _, out = pretraining
  config = hf_convert.bert_config_from_hf(hf.config.to_dict(), dtype="float32")
  model = our_model(hf_convert.params_from_hf(hf.state_dict(), config), config)
  batch = make_batch()
  ours = _apply(model, batch)
  exported, info = transformers.BertForPreTraining.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  with torch.no_grad():
    theirs = exported.eval()(**_torch_inputs(batch))
  mlm = np.take_along_axis(theirs.prediction_logits.numpy(),
                           batch["masked_lm_positions"][..., None], axis=1)
  np.testing.assert_allclose(np.asarray(ours.mlm_logits)[..., :VOCAB], mlm, rtol=0, atol=ATOL)
  np.testing.assert_allclose(ours.nsp_logits, theirs.seq_relationship_logits.numpy(), rtol=0,
                             atol=ATOL)


def _torch_inputs(batch) -> dict:
  return dict(input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
              attention_mask=torch.tensor(batch["input_mask"], dtype=torch.long),
              token_type_ids=torch.tensor(batch["segment_ids"], dtype=torch.long))


def test_autotokenizer_tokenizes_like_ours(pretraining):
  _, _, workdir, out = pretraining
  ours = load_tokenizer(str(workdir / "vocab.txt"), lowercase=True)
  theirs = transformers.AutoTokenizer.from_pretrained(out)
  assert theirs.model_max_length == 64 and theirs.pad_token_id == ours.pad_id
  for a, b in TEXTS:
    ids_a, ids_b = ours.encode(a)[0].tolist(), ours.encode(b)[0].tolist()
    encoded = theirs(a, b)
    assert encoded["input_ids"] == [ours.cls_id, *ids_a, ours.sep_id, *ids_b, ours.sep_id], (a, b)
    assert encoded["token_type_ids"] == [0] * (len(ids_a) + 2) + [1] * (len(ids_b) + 1)


def test_encoder_only_round_trip(tmp_path_factory, capsys):
  """A bare BertModel (a sentence encoder) imports without heads and exports as a BertModel."""
  _, folder = _hf_folder(tmp_path_factory, "gelu", encoder_only=True)
  workdir, out = folder.parent / "workdir", folder.parent / "out"
  _run(capsys, "import", f"--hf_dir={folder}", f"--workdir={workdir}")
  assert "BertModel from" in _run(capsys, "export", f"--workdir={workdir}", f"--output={out}")
  theirs, back = _safetensors(folder), _safetensors(out)
  assert back.keys() == theirs.keys()
  assert all(np.array_equal(back[k], theirs[k]) for k in theirs)
  _, info = transformers.BertModel.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info


def test_stacked_layers_export_the_same(encoder, tmp_path):
  """A run with model.scan_layers=True saves its layers stacked; the export is the same."""
  hf, source = encoder
  workdir = tmp_path / "scan"
  shutil.copytree(source, workdir, ignore=shutil.ignore_patterns("checkpoints"))
  config = json.loads((workdir / "config.json").read_text())
  config["model"]["scan_layers"] = True
  (workdir / "config.json").write_text(json.dumps(config))
  model_config = BertConfig(**config["model"])
  params = hf_convert.params_from_hf(hf.state_dict(), model_config)
  ckpt = Checkpointer(str(workdir / "checkpoints"), save_interval_steps=1, max_to_keep=1,
                      async_save=False)
  ckpt.save(3, {"params": stack_layer_params(params, model_config.num_layers)}, force=True)
  ckpt.close()
  for folder, out in ((source, tmp_path / "plain"), (workdir, tmp_path / "stacked")):
    assert _main("export", f"--workdir={folder}", f"--output={out}") == 0
  plain, stacked = _safetensors(tmp_path / "plain"), _safetensors(tmp_path / "stacked")
  assert stacked.keys() == plain.keys()
  assert all(np.array_equal(stacked[k], plain[k]) for k in plain)


def test_sentencepiece_tokenizer_is_copied_with_a_note(encoder, tmp_path, capsys):
  """A SentencePiece vocabulary goes along as its .model file; the README says AutoTokenizer cannot
  load it and how to encode instead."""
  _, source = encoder
  sentences = [" ".join(WORDS[i:] + WORDS[:i]).capitalize() + "." for i in range(len(WORDS))]
  spm = train_sentencepiece(sentences * 20, output_prefix=str(tmp_path / "spm"), vocab_size=VOCAB)
  workdir = tmp_path / "workdir"
  shutil.copytree(source, workdir)
  (workdir / "vocab.txt").unlink()
  shutil.copyfile(spm.path, workdir / "spm.model")
  (workdir / "tokenizer.json").write_text(json.dumps({**spm.describe(), "file": "spm.model"}))
  out = tmp_path / "out"
  assert "sentencepiece tokenizer" in _run(capsys, "export", f"--workdir={workdir}",
                                           f"--output={out}")
  assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json",
                                                   "model.safetensors", "spm.model"]
  assert (out / "spm.model").read_bytes() == (workdir / "spm.model").read_bytes()
  readme = (out / "README.md").read_text()
  assert "AutoTokenizer" in readme and "cannot" in readme and "spm.model" in readme
  transformers.BertForPreTraining.from_pretrained(out)


# ------------------------------------------------------------------------------------------------
# Fine-tuning: BertForSequenceClassification, BertForQuestionAnswering

TASKS = {"sst2": "BertForSequenceClassification", "stsb": "BertForSequenceClassification",
         "squad": "BertForQuestionAnswering"}


def _finetuning_config(task: str, init_checkpoint):
  if task == "squad":
    config = squad_config("v1.1")
    config.data.update(train_file="train-v1.1.json", dev_file="dev-v1.1.json")
  else:
    config = glue_config(task)
    config.data.dir = f"glue_data/{task}"
  config.init_checkpoint = str(init_checkpoint)
  config.model.dtype = "float32"
  config.head.dropout = 0.2
  return config


def _finetuning_workdir(encoder, name: str, workdir, seeds=(0,)):
  """(task, our TaskModel): the encoder's weights under a random head, saved as `finetune.train`
  leaves them: config.json, and each seed's best weights in seed_<seed>/best."""
  hf, init = encoder
  config = _finetuning_config(name, init)
  pretrained = pretrained_lib.locate(str(init))
  model_config = ft_train.model_config_for(config, pretrained)
  task = make_task(config, pretrained.tokenizer())
  graphdef, state = nnx.split(nnx.eval_shape(lambda: heads.TaskModel(
      model_config, kind=task.kind, num_labels=task.num_labels, rngs=nnx.Rngs(0))))
  params = nnx.to_pure_dict(state)
  rng = np.random.default_rng(1)
  params["bert"] = hf_convert.params_from_hf(hf.state_dict(), model_config)["bert"]
  params["head"] = {k: rng.normal(0, 0.5, x.shape).astype(np.float32)
                    for k, x in params["head"].items()}
  write_config(str(workdir), config)
  for seed in seeds:
    best = Checkpointer(str(workdir / f"seed_{seed}" / "best"), save_interval_steps=1,
                        max_to_keep=1, async_save=False, best_metric=task.main_metric)
    best.save(7, params, metrics={task.main_metric: 0.5}, force=True)
    best.close()
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return task, nnx.merge(graphdef, state)


@pytest.fixture(scope="module", params=list(TASKS))
def finetuned(request, encoder, tmp_path_factory):
  """(transformers class, task, our TaskModel, its export)."""
  workdir = tmp_path_factory.mktemp("finetuned") / request.param
  task, model = _finetuning_workdir(encoder, request.param, workdir)
  out = tmp_path_factory.mktemp("export") / request.param
  assert _main("export", f"--workdir={workdir}", f"--output={out}") == 0
  return getattr(transformers, TASKS[request.param]), task, model, out


def test_finetuned_logits_match(finetuned):
  architecture, task, model, out = finetuned
  batch = make_batch()
  ours = np.asarray(_apply(model, {k: batch[k] for k in ("input_ids", "input_mask",
                                                         "segment_ids")}))
  exported, info = architecture.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  with torch.no_grad():
    theirs = exported.eval()(**_torch_inputs(batch))
  if task.kind == "span":
    assert not any(k.startswith("bert.pooler.") for k in _safetensors(out))
    np.testing.assert_allclose(ours[..., 0], theirs.start_logits.numpy(), rtol=0, atol=ATOL)
    np.testing.assert_allclose(ours[..., 1], theirs.end_logits.numpy(), rtol=0, atol=ATOL)
  else:
    expected = ours[:, None] if task.kind == "regression" else ours
    np.testing.assert_allclose(expected, theirs.logits.numpy(), rtol=0, atol=ATOL)


def test_finetuned_labels(finetuned):
  _, task, _, out = finetuned
  config = transformers.AutoConfig.from_pretrained(out)
  if task.kind == "span":
    assert config.architectures == ["BertForQuestionAnswering"]
  elif task.kind == "regression":
    assert config.num_labels == 1 and config.problem_type == "regression"
  else:
    assert config.id2label == {0: "0", 1: "1"} and config.label2id == {"0": 0, "1": 1}
    assert config.problem_type == "single_label_classification"
    assert config.classifier_dropout == 0.2


def test_the_best_seed_is_exported(encoder, tmp_path, capsys):
  workdir = tmp_path / "sst2"
  task, _ = _finetuning_workdir(encoder, "sst2", workdir, seeds=(0, 1))
  line = _one_error_line(capsys, "export", f"--workdir={workdir}", f"--output={tmp_path}/none")
  assert f"{workdir} kept weights for seeds [0, 1]; choose one with --seed" in line
  runs = [{"seed": s, "best_step": 7, "metrics": {task.main_metric: m}}
          for s, m in ((0, 0.6), (1, 0.8))]
  (workdir / "results.json").write_text(json.dumps({"main_metric": task.main_metric,
                                                     "runs": runs}))
  assert "seed 1 step 7" in _run(capsys, "export", f"--workdir={workdir}",
                                 f"--output={tmp_path}/best")
  assert "seed 0 step 7" in _run(capsys, "export", f"--workdir={workdir}",
                                 f"--output={tmp_path}/first", "--seed=0")


# ------------------------------------------------------------------------------------------------
# Mistakes: one line each, exit status 2


def _one_error_line(capsys, *argv) -> str:
  status, out, err = _command(capsys, *argv)
  lines = err.strip().splitlines()
  assert status == 2 and out == "" and len(lines) == 1 and lines[0].startswith("error: "), err
  return lines[0]


def test_folder_that_is_not_a_workdir(tmp_path, capsys):
  for folder in (tmp_path, tmp_path / "missing"):
    line = _one_error_line(capsys, "export", f"--workdir={folder}", f"--output={tmp_path}/out")
    assert f"{folder} is not a workdir" in line


def test_workdir_without_a_checkpoint(encoder, tmp_path, capsys):
  _, source = encoder
  workdir = tmp_path / "workdir"
  shutil.copytree(source, workdir, ignore=shutil.ignore_patterns("checkpoints"))
  line = _one_error_line(capsys, "export", f"--workdir={workdir}", f"--output={tmp_path}/out")
  assert f"no checkpoint in {workdir}/checkpoints" in line
  line = _one_error_line(capsys, "export", f"--workdir={source}", f"--output={tmp_path}/out",
                         "--step=5")
  assert f"--step=5 is not in {source}/checkpoints; it has steps [0]" in line


def test_finetuning_workdir_without_kept_weights(encoder, tmp_path, capsys):
  _, init = encoder
  workdir = tmp_path / "sst2"
  write_config(str(workdir), _finetuning_config("sst2", init))
  line = _one_error_line(capsys, "export", f"--workdir={workdir}", f"--output={tmp_path}/out")
  assert f"no checkpoint in {workdir}/seed_0/best" in line and "keep_best" in line


@pytest.mark.parametrize("head", [{"mode": "features"}, {"pooling": "mean"}],
                         ids=["features", "pooling"])
def test_heads_transformers_cannot_express_are_refused(encoder, tmp_path, capsys, head):
  """Features mode (frozen encoder + scalar mix) and a sentence head that skips BERT's pooler."""
  _, init = encoder
  workdir = tmp_path / "sst2"
  config = _finetuning_config("sst2", init)
  if not set(head) <= set(config.head.keys()):
    pytest.skip(f"this fine-tuning has no head.{next(iter(head))}")
  config.head.update(head)
  write_config(str(workdir), config)
  line = _one_error_line(capsys, "export", f"--workdir={workdir}", f"--output={tmp_path}/out")
  assert line.startswith(f"error: {workdir} ") and "cannot express" in line


def test_output_that_is_not_empty(encoder, tmp_path, capsys):
  _, workdir = encoder
  (tmp_path / "taken.txt").write_text("mine")
  line = _one_error_line(capsys, "export", f"--workdir={workdir}", f"--output={tmp_path}")
  assert f"--output={tmp_path} is not empty" in line


def test_workdir_without_a_tokenizer(encoder, tmp_path, capsys):
  """A run on synthetic data records no vocabulary, and a transformers folder needs one."""
  _, source = encoder
  workdir = tmp_path / "workdir"
  shutil.copytree(source, workdir)
  (workdir / "tokenizer.json").unlink()
  line = _one_error_line(capsys, "export", f"--workdir={workdir}", f"--output={tmp_path}/out")
  assert f"{workdir} records no tokenizer" in line
