"""The shard loader: host parts, epochs, the block order (data.read_block_records), static and
dynamic masks, exact resumption (also through the Prefetcher), and a throughput smoke run. The
train loop over shards (a restart, held-out batches) is in test_loader_train.py.

Shards come from `create_data.create` on a few chapters of the demo corpus with a small
SentencePiece model (trained once per session), or are written by hand where a test needs a chosen
number of instances.
"""

import json
from pathlib import Path
import time

import numpy as np
import pytest

from pretrain import console
from pretrain import sharding
from pretrain.data import create as create_data
from pretrain.data import loader
from pretrain.data import masking
from pretrain.data import shards
from pretrain.data.create import CreateSpec

from helpers import demo_tokenizer, read_split, tiny_config, write_slice

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo" / "moby_dick.jsonl.gz"


def source(directory, *, batch=16, seed=0, index=0, count=1, spec=None, seq=64, pred=10,
           **kwargs):
  return loader.ShardSource(str(directory), split="train", global_batch_size=batch, seed=seed,
                            max_seq_length=seq, max_predictions_per_seq=pred,
                            dynamic_masking=spec, process_index=index, process_count=count,
                            **kwargs)


def epoch_indices(src, epoch):
  return np.concatenate([src.indices(epoch, b) for b in range(src.batches_per_epoch)])


def unmask(batch) -> np.ndarray:
  ids = batch["input_ids"].copy()
  used = batch["masked_lm_weights"] > 0
  rows = np.broadcast_to(np.arange(len(ids))[:, None], used.shape)
  ids[rows[used], batch["masked_lm_positions"][used]] = batch["masked_lm_ids"][used]
  return ids


def assert_batches_equal(a, b, context=""):
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), f"{context}: {k}")


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
  return demo_tokenizer(tmp_path_factory)


@pytest.fixture(scope="module")
def demo_shards(tmp_path_factory, spm):
  """{"static" | "dynamic": directory}: 8 chapters, seq 64, several shards."""
  inputs = write_slice(DEMO, tmp_path_factory.mktemp("slice") / "demo.jsonl.gz", 8)
  out = {}
  for mode in ("static", "dynamic"):
    out[mode] = tmp_path_factory.mktemp(mode)
    create_data.create([inputs], spm.path, str(out[mode]),
                       CreateSpec(max_seq_length=64, max_predictions_per_seq=10, dupe_factor=1,
                                  eval_fraction=0, tokens_per_shard=5000, mode=mode),
                       num_workers=2)
  return out


@pytest.fixture(scope="module")
def dynamic_spec(spm):
  return masking.MaskingSpec.for_tokenizer(spm, 10, 0.15, whole_word_mask=False)


# ================================================================================================
# Hosts and epochs

def fake_shards(directory: Path, n: int, shard_sizes=(40, 25), seq=16, pred=3) -> Path:
  """A static data set of `n` hand-made records in shards of the given sizes (the last takes the
  rest); record i holds token 10 + i % 50000 at position 1 so a batch shows which records it has."""
  directory.mkdir(parents=True, exist_ok=True)
  dtype = shards.record_dtype(seq, pred, 60_000, static=True)
  records = np.zeros(n, dtype)
  rng = np.random.default_rng(n)
  lengths = rng.integers(8, seq + 1, n)
  ids = rng.integers(5, 60_000, (n, seq)) * (np.arange(seq)[None] < lengths[:, None])
  ids[:, 0] = 2
  ids[:, 1] = 10 + np.arange(n)
  ids[:, 3] = 3
  ids[np.arange(n), lengths - 1] = 3
  records["input_ids"], records["length"] = ids, lengths
  records["segment_ids"] = (np.arange(seq)[None] > 3) & (np.arange(seq)[None] < lengths[:, None])
  records["next_sentence_label"] = rng.integers(0, 2, n)
  records["masked_lm_positions"][:, 0] = 2
  records["masked_lm_ids"][:, 0] = ids[:, 2]
  records["masked_lm_weights"][:, 0] = 1
  entries, start = [], 0
  bounds = [s for s in np.cumsum(shard_sizes) if s < n] + [n]
  for k, end in enumerate(bounds):
    entries.append(shards.write_shard(str(directory / f"train-00-{k:05d}.npy"),
                                      records[start:end]))
    start = end
  shards.write_manifest(str(directory), {
      "splits": {"train": {"num_instances": n, "num_documents": 0, "shards": entries}},
      "record_dtype": shards.dtype_to_json(dtype),
      "creation": {"max_seq_length": seq, "max_predictions_per_seq": pred, "mode": "static"}})
  return directory


@pytest.mark.parametrize("n", [96, 100, 101])
def test_two_hosts_split_the_data_set(tmp_path, n):
  """Host h reads [h*N//2, (h+1)*N//2) and serves (N//2)//local_batch batches an epoch."""
  directory = fake_shards(tmp_path / "data", n)
  hosts = [source(directory, batch=16, index=h, count=2, seq=16, pred=3) for h in (0, 1)]
  parts, served = [], []
  for h, src in enumerate(hosts):
    assert src.local_batch == 8
    assert src.batches_per_epoch == (n // 2) // 8
    part = np.arange(*src.part)
    parts.append(part)
    for epoch in (0, 1):
      idx = epoch_indices(src, epoch)
      assert len(idx) == src.batches_per_epoch * 8 == len(np.unique(idx))
      assert np.isin(idx, part).all()
    served.append(epoch_indices(src, 0))
    # What the host's batches hold is exactly its records at those indices.
    for b in range(src.batches_per_epoch):
      np.testing.assert_array_equal(next(src)["input_ids"][:, 1], 10 + src.indices(0, b))
  assert not set(served[0]) & set(served[1])
  assert not set(parts[0]) & set(parts[1])
  if (n // 2) % 8 == 0:
    np.testing.assert_array_equal(np.sort(np.concatenate(served)), np.arange(n))
  never = sorted(set(range(n)) - set(np.concatenate(parts).tolist()))
  assert not never, f"instances {never} are in no host's part: no epoch ever serves them"
  for h in (0, 1):
    assert hosts[h].part == (h * n // 2, (h + 1) * n // 2)


def test_two_hosts_on_created_shards(demo_shards):
  n = int(shards.read_manifest(str(demo_shards["static"]))["splits"]["train"]["num_instances"])
  hosts = [source(demo_shards["static"], batch=32, index=h, count=2) for h in (0, 1)]
  assert hosts[0].part == (0, n // 2) and hosts[1].part[0] == n // 2
  served = [epoch_indices(src, 0) for src in hosts]
  for src, idx in zip(hosts, served):
    assert src.batches_per_epoch == (n // 2) // 16
    assert len(np.unique(idx)) == len(idx) == src.batches_per_epoch * 16
    assert (idx >= src.part[0]).all() and (idx < src.part[1]).all()
  assert not set(served[0]) & set(served[1])
  # The hosts' shuffles differ (seeded by host), and the same host reshuffles every epoch.
  assert not np.array_equal(served[0] - hosts[0].part[0], served[1] - hosts[1].part[0])


@pytest.mark.parametrize("count", [1, 2])
def test_epochs_reshuffle_and_cover_the_part_once(demo_shards, count):
  src = source(demo_shards["static"], batch=16 * count, index=count - 1, count=count)
  part = np.arange(*src.part)
  orders = [epoch_indices(src, e) for e in range(3)]
  for order in orders:
    assert len(np.unique(order)) == len(order) == src.batches_per_epoch * 16
    assert np.isin(order, part).all()
    assert len(part) - len(order) < 16          # all but the remainder of one batch
  assert not np.array_equal(orders[0], orders[1])
  assert not np.array_equal(orders[1], orders[2])
  # indices() is a pure function of (seed, epoch, host): a fresh source gives the same orders.
  again = source(demo_shards["static"], batch=16 * count, index=count - 1, count=count)
  np.testing.assert_array_equal(epoch_indices(again, 1), orders[1])
  np.testing.assert_array_equal(epoch_indices(again, 0), orders[0])


# ================================================================================================
# The block order (data.read_block_records)

def test_blocks_of_one_record_keep_the_full_permutation(tmp_path):
  """read_block_records=1, the default, is the order runs and their checkpoints were made with."""
  directory = fake_shards(tmp_path / "data", 101)
  for host in (0, 1):
    default = source(directory, batch=16, seed=5, index=host, count=2, seq=16, pred=3)
    ones = source(directory, batch=16, seed=5, index=host, count=2, seq=16, pred=3,
                  read_block_records=1, shuffle_window_records=8)
    lo, hi = default.part
    for epoch in (0, 1):
      expected = lo + np.random.default_rng([5, epoch, host]).permutation(hi - lo)
      for src in (default, ones):
        np.testing.assert_array_equal(src.epoch_order(epoch), expected)
        np.testing.assert_array_equal(epoch_indices(src, epoch),
                                      expected[:src.batches_per_epoch * 8])


def test_block_order_is_a_permutation_of_runs_of_neighbours(tmp_path):
  """K > 1: each epoch a permutation of the host's part whose windows (whole batches) hold whole
  runs of K neighbours, shuffled; new every epoch, a function of (seed, epoch, host) alone."""
  directory = fake_shards(tmp_path / "data", 203, shard_sizes=(70, 60))
  make = lambda host: source(directory, batch=16, index=host, count=2, seq=16, pred=3,  # noqa: E731
                             read_block_records=4, shuffle_window_records=44)
  for host in (0, 1):
    src = make(host)
    assert src.window_batches == 5                     # 44 records -> 5 whole batches of 8
    assert src.batches_per_epoch == 12                 # windows of 5, 5 and 2 batches
    lo, hi = src.part
    orders = [src.epoch_order(epoch).copy() for epoch in range(3)]
    for order in orders:
      np.testing.assert_array_equal(np.sort(order), np.arange(lo, hi))
      for start in range(0, len(order), 40):
        window = np.sort(order[start:start + 40])
        runs = 1 + np.count_nonzero(np.diff(window) > 1)
        assert runs <= 40 // 4 + 2, (host, start, window)   # + the two blocks cut by its edges
      assert np.mean(np.diff(order) == 1) < 0.5          # neighbours shuffled apart
    assert not np.array_equal(orders[0], orders[1])
    assert not np.array_equal(orders[1], orders[2])
    np.testing.assert_array_equal(make(host).epoch_order(1), orders[1])
    for epoch in (0, 1):
      np.testing.assert_array_equal(epoch_indices(src, epoch),
                                    orders[epoch][:src.batches_per_epoch * 8])
    for b in range(src.batches_per_epoch + 2):            # what the batches hold, into epoch 1
      epoch, row = divmod(b, src.batches_per_epoch)
      np.testing.assert_array_equal(next(src)["input_ids"][:, 1], 10 + src.indices(epoch, row))


@pytest.mark.parametrize("key,value", [("read_block_records", 0),
                                       ("shuffle_window_records", -1)])
def test_block_settings_below_one_are_one_line_errors(demo_shards, spm, capsys, key, value):
  config = tiny_config(**{"data.source": "shards", "data.path": str(demo_shards["static"]),
                          "model.vocab_size": spm.vocab_size, "data.max_seq_length": 64,
                          "data.max_predictions_per_seq": 10, f"data.{key}": value})
  status = console.run_command(lambda: loader.make_source(config, split="train"), verbose=False)
  assert status == console.EXIT_USER_ERROR
  assert capsys.readouterr().err.strip().splitlines() == [
      f"error: data.{key}={value} must be at least 1"]


@pytest.mark.parametrize("key,value", [("whole_word_mask", True), ("masked_lm_prob", 0.2)])
def test_masking_keys_that_static_shards_cannot_follow_are_named(demo_shards, spm, key, value):
  """Static shards were masked when written: a config asking for other masks (the budget
  recipe's whole-word masking on shards made without --mode=dynamic) would be silently ignored."""
  config = tiny_config(**{"data.source": "shards", "data.path": str(demo_shards["static"]),
                          "model.vocab_size": spm.vocab_size, "data.max_seq_length": 64,
                          "data.max_predictions_per_seq": 10, f"data.{key}": value})
  with pytest.raises(ValueError) as error:
    loader.make_source(config, split="train")
  assert str(error.value).startswith(
      f"data.{key}={value} but the shards in {demo_shards['static']} were masked when they were "
      "written (mode=static) with ")
  assert "--mode=dynamic" in str(error.value)
  config.data[key] = shards.read_manifest(str(demo_shards["static"]))["creation"][key]
  assert loader.make_source(config, split="train") is not None


def test_static_batches_are_the_stored_records(demo_shards):
  records = read_split(demo_shards["static"])
  src = source(demo_shards["static"], batch=16)
  for step in range(src.batches_per_epoch + 3):           # into the second epoch
    epoch, b = divmod(step, src.batches_per_epoch)
    rec = records[src.indices(epoch, b)]
    batch = next(src)
    assert batch["input_ids"].dtype == np.int32 and batch["masked_lm_weights"].dtype == np.float32
    np.testing.assert_array_equal(batch["input_ids"], rec["input_ids"])
    np.testing.assert_array_equal(batch["segment_ids"], rec["segment_ids"])
    np.testing.assert_array_equal(batch["masked_lm_positions"], rec["masked_lm_positions"])
    np.testing.assert_array_equal(batch["masked_lm_ids"], rec["masked_lm_ids"])
    np.testing.assert_array_equal(batch["masked_lm_weights"], rec["masked_lm_weights"])
    np.testing.assert_array_equal(batch["next_sentence_labels"], rec["next_sentence_label"])
    np.testing.assert_array_equal(batch["input_mask"],
                                  np.arange(64)[None] < rec["length"][:, None])


def test_dynamic_masks_change_every_epoch(demo_shards, dynamic_spec):
  records = read_split(demo_shards["dynamic"])
  src = source(demo_shards["dynamic"], batch=16, spec=dynamic_spec)
  masks = [{}, {}]
  for epoch in (0, 1):
    for b in range(src.batches_per_epoch):
      index = src.indices(epoch, b)
      batch = next(src)
      rec = records[index]
      np.testing.assert_array_equal(unmask(batch), rec["input_ids"])   # masks of this record
      np.testing.assert_array_equal(batch["segment_ids"], rec["segment_ids"])
      np.testing.assert_array_equal(batch["next_sentence_labels"], rec["next_sentence_label"])
      count = batch["masked_lm_weights"].sum(1)
      expected = [min(10, max(1, round(int(n) * 0.15))) for n in rec["length"]]
      np.testing.assert_array_equal(count, expected)
      for i, row in enumerate(index):
        masks[epoch][int(row)] = tuple(batch["masked_lm_positions"][i])
  both = set(masks[0]) & set(masks[1])
  assert len(both) > 0.9 * len(masks[0])
  same = sum(masks[0][i] == masks[1][i] for i in both)
  assert same < 0.1 * len(both), f"{same} of {len(both)} instances kept their masks"
  # The same position of the stream gives the same masks (they depend on seed, epoch, batch).
  again = source(demo_shards["dynamic"], batch=16, spec=dynamic_spec)
  again.set_state({"epoch": 1, "batch": 0})
  first = next(again)
  assert tuple(first["masked_lm_positions"][0]) == masks[1][int(src.indices(1, 0)[0])]


def test_dynamic_whole_word_masks_in_the_loader(demo_shards, spm):
  spec = masking.MaskingSpec.for_tokenizer(spm, 10, 0.15, whole_word_mask=True)
  src = source(demo_shards["dynamic"], batch=64, spec=spec)
  records = read_split(demo_shards["dynamic"])
  pieces = spm.ids_to_tokens(range(spm.vocab_size))
  starts_word = np.array([p.startswith("\u2581") for p in pieces])
  multi = 0
  for b in range(min(4, src.batches_per_epoch)):
    rec = records[src.indices(0, b)]
    batch = next(src)
    ids = rec["input_ids"].astype(np.int64)
    masked = np.zeros(ids.shape, bool)
    used = batch["masked_lm_weights"] > 0
    masked[np.broadcast_to(np.arange(len(ids))[:, None], used.shape)[used],
           batch["masked_lm_positions"][used]] = True
    real = np.arange(64)[None] < rec["length"][:, None]
    candidate = real & ~np.isin(ids, list(spm.special_ids))
    left_candidate = np.pad(candidate[:, :-1], ((0, 0), (1, 0)))
    joins = candidate & left_candidate & ~rec["word_start"].astype(bool)
    # SentencePiece word starts are the pieces that begin with "▁" (where no [UNK] is involved).
    plain = ~np.isin(ids, [spm.unk_id])
    np.testing.assert_array_equal(rec["word_start"][candidate & plain].astype(bool),
                                  starts_word[ids[candidate & plain]])
    assert not (joins & (masked != np.pad(masked[:, :-1], ((0, 0), (1, 0))))).any()
    multi += (joins & masked).sum()
  assert multi > 0


# ================================================================================================
# Resumption

@pytest.mark.parametrize("order", [{}, {"read_block_records": 4, "shuffle_window_records": 48}],
                         ids=["records", "blocks"])
@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest.mark.parametrize("host", [(0, 1), (1, 2)])
def test_resume_gives_the_same_stream(demo_shards, dynamic_spec, mode, host, order):
  index, count = host
  make = lambda: source(demo_shards[mode], batch=16 * count, index=index, count=count,  # noqa: E731
                        spec=dynamic_spec if mode == "dynamic" else None, **order)
  straight = make()
  bpe = straight.batches_per_epoch
  for n in (bpe // 2 + 1, bpe):       # the second half crosses an epoch; or starts on one
    straight = make()
    expected = [next(straight) for _ in range(2 * n)]
    first = make()
    for _ in range(n):
      next(first)
    state = json.loads(json.dumps(first.get_state()))      # as a checkpoint stores it
    # Blocks: the position also names the order it counts in (a window of 48 records is 3 batches
    # of 16); records one by one keep the state runs have always saved.
    read_order = {} if not order else {"read_block_records": 4, "shuffle_window_records": 48}
    assert state == {"epoch": n // bpe, "batch": n % bpe, **read_order}
    resumed = make()
    resumed.set_state(state)
    for k in range(n):
      assert_batches_equal(next(resumed), expected[n + k], f"batch {n + k}")
    assert resumed.get_state() == straight.get_state() == {"epoch": 2 * n // bpe,
                                                          "batch": 2 * n % bpe, **read_order}


@pytest.mark.parametrize("saved,now,message", [
    ({}, {"read_block_records": 16},
     "it was saved with data.read_block_records=1 but this run has data.read_block_records=16, "
     "data.shuffle_window_records=64"),
    ({"read_block_records": 4, "shuffle_window_records": 64}, {},
     "it was saved with data.read_block_records=4, data.shuffle_window_records=64 but this run "
     "has data.read_block_records=1"),
    ({"read_block_records": 4, "shuffle_window_records": 64},
     {"read_block_records": 4, "shuffle_window_records": 32},
     "it was saved with data.read_block_records=4, data.shuffle_window_records=64 but this run "
     "has data.read_block_records=4, data.shuffle_window_records=32"),
], ids=["records-then-blocks", "blocks-then-records", "another-window"])
def test_resume_in_another_read_order_is_refused(demo_shards, saved, now, message):
  """A position counts batches of one order: resumed under another, it would name other records,
  silently. The checkpoint's state says which order it was counted in."""
  make = lambda order: source(demo_shards["static"], batch=16, **order)  # noqa: E731
  first = make({**saved, "shuffle_window_records": saved.get("shuffle_window_records", 64)})
  next(first)
  state = json.loads(json.dumps(first.get_state()))
  later = make({**now, "shuffle_window_records": now.get("shuffle_window_records", 64)})
  with pytest.raises(ValueError, match="another read order") as error:
    later.set_state(state)
  assert message in str(error.value)


def test_held_out_batches_do_not_depend_on_the_read_order(spm, tmp_path):
  """data.read_block_records is how training reads: the eval split is read record by record
  whatever it is set to, so runs with different read orders are scored on the same sequences."""
  inputs = write_slice(DEMO, tmp_path / "slice.jsonl.gz", 12)
  create_data.create([inputs], spm.path, str(tmp_path / "data"),
                     CreateSpec(max_seq_length=64, max_predictions_per_seq=10, dupe_factor=1,
                                eval_fraction=0.5), num_workers=1)
  made = {}
  for k in (1, 16):
    config = tiny_config(**{"data.source": "shards", "data.path": str(tmp_path / "data"),
                            "model.vocab_size": spm.vocab_size, "data.max_seq_length": 64,
                            "data.max_predictions_per_seq": 10, "train.global_batch_size": 8,
                            "data.read_block_records": k, "data.shuffle_window_records": 32})
    made[k] = {split: loader.make_source(config, split=split) for split in ("train", "eval")}
  assert made[16]["eval"].read_block_records == 1
  for _ in range(3):
    assert_batches_equal(next(made[1]["eval"]), next(made[16]["eval"]), "eval")
  train_1, train_16 = next(made[1]["train"]), next(made[16]["train"])
  assert not np.array_equal(train_1["input_ids"], train_16["input_ids"])


def test_prefetcher_state_is_what_was_consumed(demo_shards, dynamic_spec):
  mesh = sharding.make_mesh((-1, 1, 1))
  straight = source(demo_shards["dynamic"], spec=dynamic_spec)
  expected = [next(straight) for _ in range(8)]
  src = source(demo_shards["dynamic"], spec=dynamic_spec)
  prefetcher = loader.Prefetcher(src, mesh, size=2)
  try:
    k = 3
    for i in range(k):
      got = next(prefetcher)
      assert set(got) == set(loader.BATCH_KEYS)
      for key in loader.BATCH_KEYS:
        np.testing.assert_array_equal(np.asarray(got[key]), expected[i][key])
    deadline = time.time() + 20
    while src.get_state()["batch"] < k + 2 and time.time() < deadline:
      time.sleep(0.01)
    assert src.get_state()["batch"] >= k + 2, "the prefetcher did not read ahead"
    assert prefetcher.state() == {"epoch": 0, "batch": k}
  finally:
    prefetcher.close()
  resumed = source(demo_shards["dynamic"], spec=dynamic_spec)
  resumed.set_state(prefetcher.state())
  for i in range(k, 8):
    assert_batches_equal(next(resumed), expected[i], f"batch {i}")


# ================================================================================================
# Throughput smoke run (not timed)

def test_loader_runs_50_batches_of_256_at_seq_128_with_dynamic_masks(spm, tmp_path):
  inputs = write_slice(DEMO, tmp_path / "slice.jsonl.gz", 30)
  create_data.create([inputs], spm.path, str(tmp_path / "data"),
                     CreateSpec(max_seq_length=128, max_predictions_per_seq=20, dupe_factor=1,
                                eval_fraction=0, mode="dynamic"), num_workers=2)
  spec = masking.MaskingSpec.for_tokenizer(spm, 20, 0.15, whole_word_mask=False)
  src = source(tmp_path / "data", batch=256, spec=spec, seq=128, pred=20)
  start = time.perf_counter()
  for _ in range(50):
    batch = next(src)
    assert batch["input_ids"].shape == (256, 128)
    assert batch["masked_lm_positions"].shape == (256, 20)
    assert (batch["masked_lm_weights"].sum(1) >= 1).all()
  elapsed = time.perf_counter() - start
  print(f"\nloader: 50 batches of 256 x 128 in {elapsed:.2f}s "
        f"({50 * 256 / elapsed:,.0f} sequences/s)")
  assert src.get_state()["epoch"] >= 1
