"""tools/convergence: the project learns exactly like transformers' BertForPreTraining (issue 14).

The parity test runs the tool itself (`cli.main`, both sides in this process) on a tiny model:
2 layers, hidden 32, 4 heads, a 300-piece SentencePiece vocabulary of a few Moby-Dick chapters
(not a multiple of 128: our table is padded to 384, the reference's is not), seq 32, batch 16,
fp32, dropout 0, 30 steps of real dynamic-masked shards. Both start from one init folder: the
tool's seeded transformers init, with its biases and LayerNorm parameters then drawn at random (the
init has them at 0 and 1), and weight decay 0.1, so that a wrong decay mask moves parameters by
about ten times the tolerance instead of hiding under it. The per-step losses must agree within
1e-4 relative, every parameter after 30 steps within 1e-4.
"""

import contextlib
import io
import json
import os
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from helpers import DEMO_CORPUS, write_slice  # noqa: E402
from pretrain.data import corpus  # noqa: E402
from pretrain.data import create as create_data  # noqa: E402
from pretrain.data.create import CreateSpec  # noqa: E402
from pretrain.data.spm_training import train_sentencepiece  # noqa: E402
from pretrain.model.config import BertConfig  # noqa: E402
from tools.convergence import cli, report, weights  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VOCAB, STEPS, EVAL_EVERY = 300, 30, 10
MODEL = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
             max_position_embeddings=32, dtype="float32", hidden_dropout=0.0,
             attention_dropout=0.0)
OVERRIDES = {**{f"model.{k}": v for k, v in MODEL.items()},
             "data.max_seq_length": 32, "data.max_predictions_per_seq": 5,
             "train.global_batch_size": 16, "train.num_train_steps": STEPS, "train.eval_steps": 2,
             "optim.warmup_steps": 5, "optim.peak_learning_rate": 2e-3, "optim.weight_decay": 0.1}
RTOL = ATOL = 1e-4


def argv(data: Path, workdir: Path, *extra: str, **overrides) -> list[str]:
  config = {**OVERRIDES, "data.path": str(data), **overrides}
  return ["convergence", f"--config={REPO}/configs/pretrain.py:tiny",
          *(f"--config.{k}={v}" for k, v in config.items()), f"--workdir={workdir}",
          "--notorch_compile", f"--eval_every={EVAL_EVERY}", *extra]


def run_main(args: list[str]) -> tuple[int, str, str]:
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = cli.main(args)
  return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
  """12 chapters, a 300-piece SentencePiece model, dynamic masks, 2 chapters held out."""
  tmp = tmp_path_factory.mktemp("convergence-data")
  inputs = write_slice(DEMO_CORPUS, tmp / "slice.jsonl.gz", 12)
  sentences = [s for doc in corpus.iter_corpus([inputs]) for s in doc]
  spm = train_sentencepiece(sentences, output_prefix=str(tmp / "spm"), vocab_size=VOCAB)
  create_data.create([inputs], spm.path, str(tmp / "data"),
                     CreateSpec(max_seq_length=32, max_predictions_per_seq=5, dupe_factor=1,
                                eval_fraction=0.2, mode="dynamic"), num_workers=1)
  return tmp / "data"


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory) -> Path:
  folder = tmp_path_factory.mktemp("convergence-init") / "init"
  weights.create(BertConfig(**MODEL), str(folder), seed=0)
  model = transformers.BertForPreTraining.from_pretrained(folder)
  torch.manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias"):
        p.normal_(0.0, 0.1)
      elif "LayerNorm" in name:
        p.normal_(1.0, 0.1)
  model.save_pretrained(folder)
  return folder


@pytest.fixture(scope="module")
def parity(shards, init_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("convergence-parity")
  code, out, err = run_main(argv(shards, workdir, "--noisolate", "--save_weights", "--noplot",
                                 f"--init_dir={init_dir}"))
  assert code == 0, err[-3000:]
  records = report.read_records(str(workdir / "convergence.jsonl"))
  return dict(workdir=workdir, out=out, records=records,
              runs={r[0]: run for r, run in report.latest_runs(records).items()})


def by_step(run, kind):
  return {r["step"]: r for r in run if r["kind"] == kind}


def test_losses_equal_at_every_step(parity):
  ours = by_step(parity["runs"]["ours"], "train")
  ref = by_step(parity["runs"]["reference"], "train")
  assert sorted(ours) == sorted(ref) == list(range(1, STEPS + 1))
  rel = [abs(ours[s]["loss"] - ref[s]["loss"]) / abs(ref[s]["loss"]) for s in ref]
  print(f"loss: max relative difference over {STEPS} steps {max(rel):.3g}")
  assert max(rel) < RTOL, [(s, ours[s]["loss"], ref[s]["loss"]) for s in ref]
  # The same schedule: optax evaluates it at the step count before the update, LambdaLR likewise.
  assert ours[1]["learning_rate"] == ref[1]["learning_rate"] == 0.0
  for s in ref:
    np.testing.assert_allclose(ours[s]["learning_rate"], ref[s]["learning_rate"], rtol=1e-6)
    np.testing.assert_allclose(ours[s]["grad_norm"], ref[s]["grad_norm"], rtol=RTOL)
  assert ref[STEPS]["loss"] < ref[1]["loss"] - 0.3          # and it did learn something


def test_parameters_equal_after_30_steps(parity, init_dir):
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  final = parity["workdir"] / "final"
  ours = load_file(str(final / "run-ours-seed0.safetensors"))
  ref = load_file(str(final / "run-reference-seed0.safetensors"))
  start = weights.load_hf_state_dict(str(init_dir))
  assert ours.keys() == ref.keys()
  worst = max(ours, key=lambda k: np.abs(ours[k] - ref[k]).max())
  moved = np.abs(ref[worst] - start[worst]).max() if worst in start else float("nan")
  print(f"parameters: max abs difference {np.abs(ours[worst] - ref[worst]).max():.3g} in {worst} "
        f"(moved {moved:.3g} from the init)")
  for k in ref:
    np.testing.assert_allclose(ours[k], ref[k], rtol=0, atol=ATOL, err_msg=k)


def test_held_out_metrics_equal(parity):
  ours, ref = by_step(parity["runs"]["ours"], "eval"), by_step(parity["runs"]["reference"], "eval")
  assert sorted(ours) == sorted(ref) == [10, 20, 30]
  for s in ref:
    for key in ("loss", "mlm_loss", "nsp_loss"):
      np.testing.assert_allclose(ours[s][key], ref[s][key], rtol=RTOL, err_msg=f"{key} {s}")
    for key in ("mlm_accuracy", "nsp_accuracy"):
      assert abs(ours[s][key] - ref[s][key]) < 0.01, (key, s)
  assert all(r["wall_s"] > 0 for r in parity["records"])
  starts = [r for r in parity["records"] if r["kind"] == "start"]
  assert {r["system"] for r in starts} == {"ours", "reference"}
  assert all(r["config"]["train"]["global_batch_size"] == 16 for r in starts)


def test_isolated_run_stops_at_target_and_plots(parity, shards, init_dir, tmp_path):
  """The default mode (a child process per side), --stop_at_target, the report and the figure."""
  target = by_step(parity["runs"]["reference"], "eval")[10]["mlm_accuracy"]  # the same run
  result = subprocess.run(
      [sys.executable, "-m", "tools.convergence",
       *argv(shards, tmp_path, f"--init_dir={init_dir}", "--name=iso", "--stop_at_target",
             f"--target_mlm_accuracy={target}")[1:]],
      cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  records = report.read_records(str(tmp_path / "convergence.jsonl"))
  ends = {r["system"]: r for r in records if r["kind"] == "end"}
  assert {s: (e["reason"], e["step"], e["target_step"]) for s, e in ends.items()} == {
      "reference": ("target", 10, 10), "ours": ("target", 10, 10)}   # stopped early
  lines = result.stdout.splitlines()
  for system in ("reference", "ours"):
    assert any(line.startswith(f"{system} (iso, seed 0): held-out MLM accuracy")
               and f">= {target:.4f} at step 10" in line for line in lines), result.stdout
  assert any(line.startswith("ours (iso) vs reference (iso), seed 0:") for line in lines)
  assert report.target_lines(records, target) == [
      line for line in lines if "(iso" in line and ("accuracy" in line or "sooner" in line)]
  png = tmp_path / "convergence.png"
  assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
  # Each child's clock starts at its launch: its first record comes after its start-up.
  assert all(r["wall_s"] > 1.0 for r in records if r["kind"] == "start")


def test_report_only_reads_the_file_again(parity, shards):
  target = by_step(parity["runs"]["reference"], "eval")[20]["mlm_accuracy"]
  code, out, err = run_main(argv(shards, parity["workdir"], "--report_only",
                                 f"--target_mlm_accuracy={target}"))
  assert code == 0, err
  assert out.splitlines()[:2] == report.target_lines(parity["records"], target)[:2]
  assert (parity["workdir"] / "convergence.png").exists()


def test_target_report_names_the_first_evaluation():
  rec = lambda system, step, acc, wall: dict(system=system, name="n", seed=0, run_id="1",
                                             kind="eval", step=step, mlm_accuracy=acc, wall_s=wall)
  records = [rec("reference", 100, 0.2, 50.0), rec("reference", 200, 0.31, 100.0),
             rec("reference", 300, 0.35, 150.0), rec("ours", 100, 0.25, 20.0),
             rec("ours", 200, 0.30, 40.0), rec("ours", 300, 0.4, 60.0)]
  assert report.first_reaching(records[:3], 0.3)["step"] == 200
  assert report.target_lines(records, 0.3) == [
      "reference (n, seed 0): held-out MLM accuracy 0.3100 >= 0.3000 at step 200, 100.0 s",
      "ours (n, seed 0): held-out MLM accuracy 0.3000 >= 0.3000 at step 200, 40.0 s",
      "ours (n) vs reference (n), seed 0: 2.50x sooner (40.0 s vs 100.0 s; steps 200 vs 200)"]
  assert report.target_lines(records, 0.5)[1] == (
      "ours (n, seed 0): did not reach held-out MLM accuracy 0.5000 (best 0.4000)")



def test_parity_report_compares_seed_spreads():
  rec = lambda system, name, seed, step, acc: dict(
      system=system, name=name, seed=seed, run_id="1", kind="eval", step=step, mlm_accuracy=acc,
      wall_s=float(step))
  accuracies = {("reference", "fast", 0): [0.20, 0.40, 0.50],
                ("reference", "fast", 1): [0.22, 0.44, 0.52],
                ("ours", "fast", 0): [0.21, 0.41, 0.60], ("ours", "fast", 1): [0.23, 0.43, 0.60],
                ("ours", "plain", 0): [0.30, 0.50]}          # stopped early: steps 100, 200 only
  records = [rec(*run, step, acc) for run, accs in accuracies.items()
             for step, acc in zip((100, 200, 300), accs)]
  assert report.parity_lines(records) == [
      "step reference fast (2 seeds) | ours fast (2 seeds) | ours plain (1 seeds)",
      "100 0.2100 [0.2000, 0.2200] | 0.2200 [0.2100, 0.2300] | 0.3000 [0.3000, 0.3000]",
      "200 0.4200 [0.4000, 0.4400] | 0.4200 [0.4100, 0.4300] | 0.5000 [0.5000, 0.5000]",
      "reference seeds apart: mean 0.0300, largest 0.0400 (2 steps)",
      "ours (fast) - reference, seed means: mean +0.0050, sd 0.0050, largest |gap| 0.0100; "
      "within the reference's seed range at 2 of 2 steps",
      "ours (plain) - reference, seed means: mean +0.0850, sd 0.0050, largest |gap| 0.0900; "
      "within the reference's seed range at 0 of 2 steps"]

# ------------------------------------------------------------------------------ bad input


def assert_one_error_line(code: int, err: str, *needles: str):
  lines = [line for line in err.splitlines() if line.strip()]
  assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])


def test_vocab_mismatch_between_config_and_init_folder(shards, init_dir, tmp_path):
  code, _, err = run_main(argv(shards, tmp_path, "--noisolate", f"--init_dir={init_dir}",
                               **{"model.vocab_size": 320}))
  assert_one_error_line(code, err, "vocab_size differs", "model.vocab_size=320",
                        "vocab_size=300", str(init_dir))


def test_vocab_mismatch_between_config_and_data(shards, tmp_path):
  code, _, err = run_main(argv(shards, tmp_path, "--noisolate", "--systems=reference",
                               **{"model.vocab_size": 320}))
  assert_one_error_line(code, err, "model.vocab_size=320", "has 300 entries")


def test_shape_mismatch(shards, init_dir, tmp_path):
  code, _, err = run_main(argv(shards, tmp_path, "--noisolate", f"--init_dir={init_dir}",
                               **{"model.intermediate_size": 128}))
  assert_one_error_line(code, err, "intermediate_size differs", "model.intermediate_size=128",
                        "intermediate_size=64")


def test_stacked_layers_are_refused_before_compiling(shards, init_dir, tmp_path):
  code, _, err = run_main(argv(shards, tmp_path, "--noisolate", "--systems=ours",
                               f"--init_dir={init_dir}", **{"model.scan_layers": True}))
  assert_one_error_line(code, err, "model.scan_layers=True", "--config.model.scan_layers=False")


def test_weights_that_do_not_fit_their_config(shards, init_dir, tmp_path):
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  folder = tmp_path / "cut"
  folder.mkdir()
  (folder / "config.json").write_text((init_dir / "config.json").read_text())
  tensors = load_file(str(init_dir / "model.safetensors"))
  key = "bert.encoder.layer.1.output.dense.weight"
  tensors[key] = tensors[key][:, :32].copy()
  save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
  code, _, err = run_main(argv(shards, tmp_path, "--noisolate", f"--init_dir={folder}"))
  assert_one_error_line(code, err, key, "(32, 32)", "(32, 64)")


@pytest.mark.parametrize("case", ["no_config", "gpt2", "no_weights"])
def test_init_folder_that_is_not_bert(shards, tmp_path, case):
  folder = tmp_path / "init"
  folder.mkdir()
  (folder / "notes.txt").write_text("not a model")
  if case != "no_config":
    config = {"model_type": "gpt2" if case == "gpt2" else "bert", "vocab_size": VOCAB}
    (folder / "config.json").write_text(json.dumps(config))
  needle = {"no_config": "has no config.json", "gpt2": "model_type='gpt2'",
            "no_weights": "no weights"}[case]
  code, _, err = run_main(argv(shards, tmp_path, "--noisolate", f"--init_dir={folder}"))
  assert_one_error_line(code, err, "is not a BERT checkpoint", needle, str(folder))


def test_command_line_error_has_no_traceback(shards, tmp_path):
  """The real command: one `error:` line on stderr, exit code 2."""
  folder = tmp_path / "gpt2"
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  result = subprocess.run([sys.executable, "-m", "tools.convergence",
                           *argv(shards, tmp_path, f"--init_dir={folder}")[1:]],
                          cwd=REPO, env=dict(os.environ), capture_output=True, text=True,
                          timeout=120)
  assert_one_error_line(result.returncode, result.stderr, "model_type='gpt2'")
  assert "Traceback" not in result.stderr


@pytest.mark.parametrize("flag,message", [
    ("--systems=ours,ours",
     "--systems=ours,ours: name each side once, e.g. --systems=reference,ours"),
    ("--max_seconds=-5", "--max_seconds=-5 must be at least 0 (0 = no limit)"),
    ("--target_mlm_accuracy=1.5", "--target_mlm_accuracy=1.5 must be in (0, 1], a held-out MLM "
     "accuracy (0 = no target)"),
    ("--target_mlm_accuracy=-0.2", "--target_mlm_accuracy=-0.2 must be in (0, 1], a held-out MLM "
     "accuracy (0 = no target)"),
    ("--config.optim.warmup_steps=1000",     # before the reference trains, not after it
     "optim.warmup_steps=1000 must lie in [0, train.num_train_steps=30]"),
], ids=["duplicate-system", "negative-seconds", "accuracy-above-1", "negative-accuracy",
        "warmup-longer-than-training"])
def test_flag_values_out_of_range(flag, message, tmp_path):
  code, _, err = run_main(argv(tmp_path / "no_data", tmp_path, flag))
  assert_one_error_line(code, err)
  assert err.strip() == f"error: {message}"


def test_zero_seconds_and_accuracy_still_mean_none(tmp_path):
  code, _, err = run_main(argv(tmp_path / "no_data", tmp_path, "--max_seconds=0",
                               "--target_mlm_accuracy=0", "--report_only"))
  assert_one_error_line(code, err, "convergence.jsonl does not exist")   # past the flag checks


def _records(*accuracies: float) -> str:
  return "".join(json.dumps(dict(system="ours", name="n", seed=0, run_id="1", kind="eval",
                                 step=100 * i, mlm_accuracy=acc, wall_s=10.0 * i)) + "\n"
                 for i, acc in enumerate(accuracies, 1))


def test_report_only_skips_a_partial_last_line(tmp_path):
  """A run killed while writing leaves half a line: the report skips it and says so; the next
  run that trains cuts it first, so that its own records do not run on from it."""
  jsonl = tmp_path / "convergence.jsonl"
  jsonl.write_text(_records(0.2, 0.35) + _records(0.4)[:60])
  code, out, err = run_main(argv(tmp_path / "no_data", tmp_path, "--report_only", "--noplot",
                                 "--target_mlm_accuracy=0.3"))
  assert code == 0, err
  assert err.strip().splitlines() == [
      f"warning: {jsonl}: skipped its last line, a partial record (a run killed while writing it)"]
  assert out.splitlines() == [
      "ours (n, seed 0): held-out MLM accuracy 0.3500 >= 0.3000 at step 200, 20.0 s"]
  assert len(report.read_records(str(jsonl), cut_partial=True)) == 2
  assert jsonl.read_text() == _records(0.2, 0.35)


def test_report_only_names_a_bad_line_and_an_empty_file(tmp_path):
  jsonl = tmp_path / "convergence.jsonl"
  jsonl.write_text(_records(0.2) + _records(0.35)[:60] + "\n" + _records(0.4))
  code, _, err = run_main(argv(tmp_path / "no_data", tmp_path, "--report_only", "--noplot"))
  assert_one_error_line(code, err)
  assert err.strip() == (f"error: {jsonl}: line 2 is not a JSON record (Unterminated string "
                         "starting at column 59); repair or remove that line")
  jsonl.write_text("")
  code, _, err = run_main(argv(tmp_path / "no_data", tmp_path, "--report_only", "--noplot"))
  assert_one_error_line(code, err)
  assert err.strip() == f"error: {jsonl} has no records"


def test_init_folder_without_the_pretraining_heads(tmp_path):
  """transformers' BertModel.save_pretrained: the encoder alone, no cls.* tensors."""
  folder = tmp_path / "bare"
  hf_config = transformers.BertConfig(**weights.hf_config_kwargs(BertConfig(**MODEL)))
  transformers.BertModel(hf_config).save_pretrained(folder)
  code, _, err = run_main(argv(tmp_path / "no_data", tmp_path, "--noisolate",
                               f"--init_dir={folder}"))
  assert_one_error_line(code, err)
  assert err.strip() == (
      f"error: {folder} holds a BertModel without the pretraining heads (no cls.* tensors: MLM and "
      "NSP); this tool needs a BertForPreTraining checkpoint (transformers' "
      "BertForPreTraining.save_pretrained), or no --init_dir (or a folder that does not exist "
      "yet) to create one")
