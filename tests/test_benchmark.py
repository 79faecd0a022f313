"""The benchmark's memory figures on the CPU (tools/benchmark.py, tools/bench/torch_peer.py and the
sweep's table in tools/bench/sweep.py).

- Our step's result carries the compiled step's buffers (> 0 on the CPU too) and the device peak
  (a number where the backend keeps allocator statistics, else null with a note), and is JSON.
- The device figures' arithmetic: the row's own peak only when the process's peak rose in its turn.
- The torch peer on the CPU: its peak is null, never an error.
- The table shows ours, XLA's and the peer's GiB next to seq/s.
"""

import argparse
import json

import pytest

from helpers import tiny_config
from tools import benchmark
from tools.bench import sweep
from tools.bench import torch_peer


@pytest.fixture(scope="module")
def ours():
  prepared = benchmark.compile_prepared(benchmark.prepare(tiny_config(), "tiny_ours"))
  return benchmark.time_prepared(prepared, steps=2, warmup=0, window=1)


def test_our_result_has_memory_fields(ours):
  parts = ours["argument_gib"] + ours["output_gib"] - ours["alias_gib"] + ours["temp_gib"]
  assert ours["compiled_step_gib"] > 0
  assert ours["compiled_step_gib"] == pytest.approx(parts)
  assert ours["alias_gib"] > 0                       # the state is donated: outputs reuse it
  for key in ("device_peak_gib", "device_row_peak_gib", "device_peak_in_row"):
    assert key in ours
  if ours["device_peak_gib"] is None:                # the CPU keeps no allocator statistics
    assert ours["device_row_peak_gib"] is None and "memory_stats" in ours["device_memory_note"]
  else:
    assert ours["device_peak_gib"] > 0
  assert json.loads(json.dumps(ours))["compiled_step_gib"] == ours["compiled_step_gib"]


def test_device_memory_fields_arithmetic():
  gib = 2**30
  rose = benchmark.device_memory_fields(
      dict(bytes_in_use=1 * gib, peak_bytes_in_use=2 * gib),
      dict(bytes_in_use=1 * gib, peak_bytes_in_use=5 * gib, bytes_limit=10 * gib))
  assert rose["device_peak_gib"] == 5 and rose["device_row_peak_gib"] == 4
  assert rose["device_peak_in_row"] and rose["device_bytes_limit_gib"] == 10
  hidden = benchmark.device_memory_fields(
      dict(bytes_in_use=1 * gib, peak_bytes_in_use=5 * gib),
      dict(bytes_in_use=1 * gib, peak_bytes_in_use=5 * gib))
  assert hidden["device_peak_gib"] == 5 and hidden["device_row_peak_gib"] is None
  assert hidden["device_peak_in_row"] is False
  none = benchmark.device_memory_fields(None, None)
  assert none["device_peak_gib"] is None and none["device_row_peak_gib"] is None


def test_torch_peer_memory_on_cpu():
  args = torch_peer.parser().parse_args([
      "--variant=tiny", "--global_batch_size=4", "--seq_len=32", "--max_predictions=5",
      "--vocab_size=256", "--max_position_embeddings=32", "--compile=0", "--steps=2",
      "--window=1", "--warmup=0"])
  peer = torch_peer.Peer(args, None)
  peer.batch = torch_peer.synthetic_batch(argparse.Namespace(**vars(args)))
  peer.prepare()
  result = peer.time()
  assert result["peak_mem_gib"] is None and result["peak_mem_row_gib"] is None
  assert "memory_note" in result
  assert 0 < result["own_resident_gib"] < 0.1
  json.dumps(result)


def test_table_shows_memory_columns(ours, tmp_path, capsys):
  gpu_like = dict(ours, name="gpu_like", device_row_peak_gib=3.25)
  peer = dict(peer="torch", variant=ours["variant"], global_batch=ours["global_batch"],
              seq_len=ours["seq_len"], hidden_dropout=ours["hidden_dropout"],
              attention_dropout=ours["attention_dropout"], seq_per_s=ours["seq_per_s"] / 2,
              step_ms=ours["step_ms"] * 2, compile_s=1.0, peak_mem_gib=6.5, peak_mem_row_gib=4.75)
  with open(tmp_path / "results.jsonl", "w", encoding="utf-8") as f:
    for record in (dict(event="matmul", matmul_tflops=1.0), ours, gpu_like, peer):
      f.write(json.dumps(record) + "\n")
  sweep.table(str(tmp_path))
  lines = capsys.readouterr().out.splitlines()
  header = next(line for line in lines if line.startswith("name"))
  assert header.split()[:6] == ["name", "ms", "seq/s", "GiB", "XLA", "GiB"]
  assert "peer GiB" in header
  row = next(line for line in lines if line.startswith("tiny_ours")).split()
  assert row[3] == "-" and row[4] == f"{ours['compiled_step_gib']:.2f}"
  assert row[8] == "4.75" and row[9] == "2.00"
  row = next(line for line in lines if line.startswith("gpu_like")).split()
  assert row[3] == "3.25"
  assert any("6.50 GiB (process)" in line for line in lines)
