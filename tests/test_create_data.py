"""create(): text -> shards on a few chapters of the bundled demo corpus with a small SentencePiece
model trained once per session. The same bytes for any number of workers, static and dynamic modes
holding the same pairs, interrupted runs resumed to the same bytes, re-runs with other settings or
another tokenizer path, errors that name the file (corrupted, truncated or missing shards, a
tokenizer hash mismatch) or the config key, and the `tools.data` command line.
"""

import json
import os
from pathlib import Path
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from helpers import (demo_tokenizer, expected_num_masked, read_split, tiny_config, unmasked_ids,
                     write_slice)
from pretrain.data import create as create_data
from pretrain.data import loader
from pretrain.data import shards
from pretrain.data.create import CreateSpec

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo" / "moby_dick.jsonl.gz"


def dir_bytes(directory) -> dict[str, bytes]:
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = f.read()
  return out


# ================================================================================================
# create(): determinism over workers, resumable runs, errors

DEMO_SPEC = dict(max_seq_length=64, max_predictions_per_seq=10, dupe_factor=2,
                 eval_fraction=0.1, tokens_per_shard=10_000)


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
  return demo_tokenizer(tmp_path_factory)


@pytest.fixture(scope="module")
def demo_slice(tmp_path_factory):
  return write_slice(DEMO, tmp_path_factory.mktemp("slice") / "demo.jsonl.gz", 25)


@pytest.fixture(scope="module")
def created(tmp_path_factory, spm, demo_slice):
  """{(mode, workers): directory} on the same inputs."""
  out = {}
  for mode in ("static", "dynamic"):
    for workers in (1, 2):
      directory = tmp_path_factory.mktemp(f"{mode}-{workers}")
      create_data.create([demo_slice], spm.path, str(directory),
                         CreateSpec(mode=mode, **DEMO_SPEC), num_workers=workers)
      out[mode, workers] = directory
  return out


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_same_seed_same_bytes_for_any_number_of_workers(created, mode):
  one, two = dir_bytes(created[mode, 1]), dir_bytes(created[mode, 2])
  assert sorted(one) == sorted(two)
  for name in one:
    assert one[name] == two[name], f"{name} differs between 1 and 2 workers"
  manifest = json.loads(one["manifest.json"])
  train_shards = manifest["splits"]["train"]["shards"]
  assert len(train_shards) >= 6 and manifest["splits"]["eval"]["num_instances"] > 0
  assert manifest["creation"]["mode"] == mode
  for entry in train_shards + manifest["splits"]["eval"]["shards"]:
    assert shards.sha256_file(os.path.join(created[mode, 1], entry["file"])) == entry["sha256"]
    assert json.loads(one[entry["file"] + ".json"]) == entry
  assert "_work" not in {p.split(os.sep)[0] for p in one}
  records = read_split(created[mode, 1])
  assert ("masked_lm_positions" in records.dtype.names) == (mode == "static")


def test_static_and_dynamic_hold_the_same_pairs(created):
  static, dynamic = read_split(created["static", 1]), read_split(created["dynamic", 1])
  np.testing.assert_array_equal(unmasked_ids(static), dynamic["input_ids"])
  for field in ("segment_ids", "word_start", "length", "next_sentence_label"):
    np.testing.assert_array_equal(static[field], dynamic[field])


def test_a_shard_holds_its_instances_shuffled(spm, tmp_path):
  """As google-research/bert writes them: records side by side come from unrelated documents (so a
  reader of blocks of neighbours, data.read_block_records, still mixes documents)."""
  words = ["whale", "ship", "sea", "captain", "boat", "night", "water", "land", "harpoon", "deck",
           "wind", "man"]
  text = "\n\n".join("\n".join(" ".join([word] * 6) for _ in range(30)) for word in words)
  (tmp_path / "docs.txt").write_text(text + "\n")
  out = tmp_path / "shards"
  create_data.create([str(tmp_path / "docs.txt")], spm.path, str(out), CreateSpec(
      max_seq_length=64, max_predictions_per_seq=10, eval_fraction=0.0, input_format="google"),
                     num_workers=1)
  records = read_split(out)
  a_segment = (records["segment_ids"] == 0) & ~np.isin(records["input_ids"],
                                                      [spm.cls_id, spm.sep_id, spm.pad_id])
  document = [np.bincount(ids[keep]).argmax()       # segment A's most common piece: its word
              for ids, keep in zip(records["input_ids"], a_segment)]
  assert len(set(document)) >= len(words) and len(records) >= 3 * len(words)
  same_as_next = np.mean([a == b for a, b in zip(document, document[1:])])
  assert same_as_next < 0.4, f"{same_as_next:.2f} of neighbours share a document: not shuffled"


def test_interrupted_creation_resumes_to_the_same_bytes(created, spm, demo_slice, tmp_path):
  reference = dir_bytes(created["static", 2])
  directory = tmp_path / "resumed"
  shutil.copytree(created["static", 2], directory)
  manifest = json.loads(reference["manifest.json"])
  names = [e["file"] for e in manifest["splits"]["train"]["shards"]]
  removed, truncated = names[1:3], names[4]
  # The interruption: no manifest, two shards and their sidecars gone, one shard cut short, and the
  # temporary file of a shard that was being written.
  os.remove(directory / "manifest.json")
  for name in removed:
    os.remove(directory / name)
    os.remove(directory / (name + ".json"))
  with open(directory / truncated, "r+b") as f:
    f.truncate(os.path.getsize(directory / truncated) // 2)
  with open(directory / (removed[0] + ".tmp.npy"), "wb") as f:
    f.write(b"\x93NUMPY half-written")
  untouched = [n for n in names + [e["file"] for e in manifest["splits"]["eval"]["shards"]]
               if n not in removed and n != truncated]
  mtimes = {n: (os.stat(directory / n).st_mtime_ns, os.stat(directory / (n + ".json")).st_mtime_ns)
            for n in untouched}

  create_data.create([demo_slice], spm.path, str(directory), CreateSpec(mode="static", **DEMO_SPEC),
                     num_workers=2)
  resumed = dir_bytes(directory)
  assert sorted(resumed) == sorted(reference), "stray or missing files after the re-run"
  for name in reference:
    assert resumed[name] == reference[name], f"{name} differs from the uninterrupted run"
  for name, (shard_time, sidecar_time) in mtimes.items():
    assert os.stat(directory / name).st_mtime_ns == shard_time, f"{name} was rewritten"
    assert os.stat(directory / (name + ".json")).st_mtime_ns == sidecar_time


def test_creation_stopped_midway_resumes_to_the_same_bytes(created, spm, demo_slice, tmp_path,
                                                           monkeypatch):
  """A run that dies after its third finished shard (the pool's workers killed mid-way, a
  half-written temporary file and the tokenized corpus in _work/ left behind) is finished by a
  re-run: same bytes, the shards finished before left as they were."""
  reference = dir_bytes(created["static", 2])
  directory = tmp_path / "stopped"
  real_progress = create_data.tqdm.tqdm

  def dying_progress(iterable=None, *args, **kwargs):
    if kwargs.get("desc") != "shards":
      return real_progress(iterable, *args, **kwargs)

    def results():
      for i, item in enumerate(iterable):
        if i == 3:          # the main process dies; leaving the `with Pool` kills the workers
          raise RuntimeError("simulated interruption")
        yield item
    return results()

  monkeypatch.setattr(create_data.tqdm, "tqdm", dying_progress)
  spec = CreateSpec(mode="static", **DEMO_SPEC)
  with pytest.raises(RuntimeError, match="simulated interruption"):
    create_data.create([demo_slice], spm.path, str(directory), spec, num_workers=1)
  monkeypatch.setattr(create_data.tqdm, "tqdm", real_progress)
  finished = sorted(n for n in os.listdir(directory) if n.endswith(".npy") and ".tmp" not in n)
  assert 3 <= len(finished) < len([n for n in reference if n.endswith(".npy")])
  assert not (directory / "manifest.json").exists()
  assert any(n.startswith("tokens-") for n in os.listdir(directory / "_work"))
  unfinished = sorted(n for n in reference if n.endswith(".npy") and n not in finished)[0]
  with open(directory / (unfinished + ".tmp.npy"), "wb") as f:          # a write cut short
    f.write(b"\x93NUMPY half-written")
  mtimes = {n: os.stat(directory / n).st_mtime_ns for n in finished}

  create_data.create([demo_slice], spm.path, str(directory), spec, num_workers=2)
  resumed = dir_bytes(directory)
  assert sorted(resumed) == sorted(reference), "stray or missing files after the re-run"
  for name in reference:
    assert resumed[name] == reference[name], f"{name} differs from the uninterrupted run"
  assert {n: os.stat(directory / n).st_mtime_ns for n in finished} == mtimes


def test_rerun_with_other_masking_settings_does_not_keep_stale_shards(created, spm, demo_slice,
                                                                      tmp_path):
  """A re-run into an existing directory with other settings must not pass old shards off as new.

  create() reuses every shard whose sidecar's byte count matches (shards.finished_shard), without
  checking the settings it was made with: changing masked_lm_prob (or whole_word_mask) keeps the old
  masks while the manifest records the new value. Expected: the shards of the new settings (as a
  fresh directory would get), or an error.
  """
  directory = tmp_path / "rerun"
  shutil.copytree(created["static", 1], directory)
  spec = CreateSpec(mode="static", **{**DEMO_SPEC, "masked_lm_prob": 0.05})
  manifest = create_data.create([demo_slice], spm.path, str(directory), spec, num_workers=1)
  assert manifest["creation"]["masked_lm_prob"] == 0.05
  records = read_split(directory)
  np.testing.assert_array_equal(records["masked_lm_weights"].sum(1),
                                expected_num_masked(records["length"], 10, prob=0.05),
                                "the shards hold masks of masked_lm_prob=0.15, not 0.05")


def test_tokenizer_given_as_an_fsspec_url(spm, tmp_path):
  """The tokenizer module reads models through fsspec (gs://...); create() then copies it with
  shutil.copyfile, which only takes local paths, and fails after all shards are written."""
  import fsspec  # pylint: disable=g-import-not-at-top
  url = "memory://test-data-pipeline/spm.model"
  with open(spm.path, "rb") as src, fsspec.open(url, "wb") as dst:
    dst.write(src.read())
  inputs = write_slice(DEMO, tmp_path / "tiny.jsonl.gz", 2)
  spec = CreateSpec(max_seq_length=64, max_predictions_per_seq=10, dupe_factor=1, eval_fraction=0)
  manifest = create_data.create([inputs], url, str(tmp_path / "out"), spec, num_workers=1)
  copied = tmp_path / "out" / manifest["tokenizer"]["file"]
  assert shards.sha256_file(str(copied)) == spm.sha256


def test_tokenizer_inside_the_output_directory(created, spm, demo_slice, tmp_path):
  """Re-creating shards with the tokenizer copy that lives next to them (the natural choice once the
  shard directory is what one has) fails in shutil.copyfile with SameFileError."""
  directory = tmp_path / "again"
  shutil.copytree(created["static", 1], directory)
  reference = dir_bytes(directory)
  copied = directory / os.path.basename(spm.path)
  create_data.create([demo_slice], str(copied), str(directory),
                     CreateSpec(mode="static", **DEMO_SPEC), num_workers=1)
  assert dir_bytes(directory) == reference


def test_two_document_corpus_keeps_a_train_split(spm, tmp_path):
  """With the default eval_fraction (0.01) and two documents, create() holds out at least two
  documents for evaluation, i.e. all of them, and then fails on the empty train split with numpy's
  "need at least one array to concatenate". Expected: a train split, or an error naming
  eval_fraction."""
  inputs = write_slice(DEMO, tmp_path / "two.jsonl.gz", 2, skip=4)
  spec = CreateSpec(max_seq_length=64, max_predictions_per_seq=10, dupe_factor=1)
  try:
    manifest = create_data.create([inputs], spm.path, str(tmp_path / "out"), spec, num_workers=1)
  except ValueError as e:
    assert "eval_fraction" in str(e), f"unhelpful error: {e}"
  else:
    assert manifest["splits"]["train"]["num_instances"] > 0


@pytest.fixture
def static_copy(created, tmp_path):
  directory = tmp_path / "data"
  shutil.copytree(created["static", 1], directory)
  return directory


def _shard_config(directory, vocab_size, **overrides):
  return tiny_config(**{"data.source": "shards", "data.path": str(directory),
                        "model.vocab_size": vocab_size, "data.max_seq_length": 64,
                        "data.max_predictions_per_seq": 10, "model.max_position_embeddings": 64,
                        **overrides})


def test_corrupted_shard_names_the_file_and_sha256(static_copy):
  manifest = shards.read_manifest(str(static_copy))
  name = manifest["splits"]["train"]["shards"][1]["file"]
  path = static_copy / name
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0xFF]))
  with pytest.raises(ValueError, match=re.escape(str(path)) + ".*SHA-256"):
    shards.open_shards(str(static_copy), "train")
  with pytest.raises(ValueError, match=re.escape(str(path)) + ".*SHA-256"):
    loader.make_source(_shard_config(static_copy, 2000), split="train")


def test_truncated_shard_names_the_file(static_copy):
  name = shards.read_manifest(str(static_copy))["splits"]["train"]["shards"][0]["file"]
  path = static_copy / name
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 100)
  for verify in (True, False):
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*truncated"):
      shards.open_shards(str(static_copy), "train", verify=verify)


def test_missing_shard_and_missing_manifest(static_copy, tmp_path):
  name = shards.read_manifest(str(static_copy))["splits"]["eval"]["shards"][0]["file"]
  os.remove(static_copy / name)
  with pytest.raises(FileNotFoundError, match=re.escape(str(static_copy / name))):
    shards.open_shards(str(static_copy), "eval")
  os.remove(static_copy / "manifest.json")
  with pytest.raises(FileNotFoundError, match=re.escape(str(static_copy))):
    shards.read_manifest(str(static_copy))
  with pytest.raises(FileNotFoundError, match=re.escape(str(static_copy / "manifest.json"))):
    loader.make_source(_shard_config(static_copy, 2000), split="train")


def test_tokenizer_hash_mismatch_names_the_tokenizer_file(static_copy):
  manifest = shards.read_manifest(str(static_copy))
  path = static_copy / manifest["tokenizer"]["file"]
  assert loader.tokenizer_of_shards(str(static_copy), manifest).sha256 == (
      manifest["tokenizer"]["sha256"])
  with open(path, "ab") as f:
    f.write(b"\0")
  with pytest.raises(ValueError, match=re.escape(str(path)) + ".*sha256"):
    loader.tokenizer_of_shards(str(static_copy), manifest)
  with pytest.raises(ValueError, match=re.escape(str(path))):
    loader.make_source(_shard_config(static_copy, 2000), split="train")


def test_config_mismatches_name_the_key(static_copy, spm):
  assert loader.make_source(_shard_config(static_copy, spm.vocab_size), split="train") is not None
  with pytest.raises(ValueError, match=r"model\.vocab_size=250.*2000"):
    loader.make_source(_shard_config(static_copy, 250), split="train")
  with pytest.raises(ValueError, match=r"data\.max_seq_length=32.*64"):
    loader.make_source(_shard_config(static_copy, 2000, **{"data.max_seq_length": 32}),
                      split="train")
  with pytest.raises(ValueError, match=r"data\.max_predictions_per_seq=5.*10"):
    loader.make_source(_shard_config(static_copy, 2000, **{"data.max_predictions_per_seq": 5}),
                      split="train")


# ================================================================================================
# Command line

def test_cli_create_and_inspect(spm, tmp_path):
  inputs = write_slice(DEMO, tmp_path / "cli.jsonl.gz", 3)
  out = tmp_path / "shards"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  create = subprocess.run(
      [sys.executable, "-m", "tools.data", "create", f"--input={inputs}",
       f"--tokenizer={spm.path}", f"--output_dir={out}", "--max_seq_length=48",
       "--max_predictions_per_seq=7", "--dupe_factor=2", "--num_workers=1", "--mode=static",
       "--eval_fraction=0"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert create.returncode == 0, create.stderr[-3000:]
  assert re.search(r"train: [\d,]+ instances in 2 shards from 3 documents; random-next",
                   create.stdout), create.stdout
  manifest = shards.read_manifest(str(out))
  assert manifest["creation"]["max_seq_length"] == 48
  assert manifest["creation"]["dupe_factor"] == 2

  inspect = subprocess.run(
      [sys.executable, "-m", "tools.data", "inspect", f"--data_dir={out}", "--num=2"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert inspect.returncode == 0, inspect.stderr[-3000:]
  text = inspect.stdout
  assert json.loads(text.splitlines()[0])["max_predictions_per_seq"] == 7
  rows = [line for line in text.splitlines() if line.startswith("[CLS]")]
  assert len(rows) == 2
  for line in rows:
    assert line.split()[-1] == "[SEP]" and line.count("[SEP]") >= 2
    marks = re.findall(r"<([^|<>\s]+)\|([^|<>\s]+)>", line)
    assert 1 <= len(marks) <= 7
    assert all(orig not in ("[CLS]", "[SEP]", "[PAD]") for _, orig in marks)
    vocab = set(spm.ids_to_tokens(range(spm.vocab_size)))
    assert all(shown in vocab and orig in vocab for shown, orig in marks)
  assert re.search(r"<\[MASK\]\|[^>]+>", text)
  assert "<shown|original> marks a position to predict" in text
  assert "dynamic shards" not in text          # static: these are the masks training reads
  assert re.search(r"#0 length \d+, next sentence: (random \(1\)|actual \(0\))", text)
