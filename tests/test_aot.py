"""Ahead-of-time compilation of the real train step for a TPU topology (tools/aot_compile/).

Needs the TPU compiler (`libtpu`, the `tpu` extra) but no TPU: the devices are compile-only.
"""

import pytest

from configs import pretrain as pretrain_configs
from tools.aot_compile import search
from tools.aot_compile.report import compile_report, format_report
from tools.aot_compile.topology import (TopologyError, libtpu_available, parse_topology,
                                        topology_devices)

_OK, _WHY = libtpu_available()
if not _OK:
  print(f"tests/test_aot.py skipped: {_WHY}")
needs_libtpu = pytest.mark.skipif(not _OK, reason=_WHY)


def _tiny(global_batch=64, seq=128):
  config = pretrain_configs.get_config("tiny")
  config.train.global_batch_size = global_batch
  config.data.max_seq_length = seq
  return config


@pytest.mark.parametrize("name,generation,dims,chips", [
    ("v5e-16", "v5e", (4, 4), 16), ("v5litepod-8", "v5e", (2, 4), 8),
    ("v6e-8", "v6e", (2, 4), 8), ("v4-8", "v4", (2, 2, 1), 4), ("v4-32", "v4", (2, 2, 4), 16),
    ("v4-128", "v4", (4, 4, 4), 64), ("v5p-8", "v5p", (2, 2, 1), 4),
    ("v5p-64", "v5p", (2, 4, 4), 32), ("v5e:4x8", "v5e", (4, 8), 32),
])
def test_topology_names(name, generation, dims, chips):
  topology = parse_topology(name)
  assert (topology.generation, topology.dims, topology.num_chips) == (generation, dims, chips)
  assert topology.compiler_name == f"{generation}:{'x'.join(map(str, dims))}"


@pytest.mark.parametrize("name", ["v7-8", "v5e-12", "v4-6", "tpu", "v5e:4x4x4", ""])
def test_bad_topology_lists_valid_names(name):
  with pytest.raises(TopologyError, match="valid: v4-8.*v5e-16.*v6e"):
    parse_topology(name)


@needs_libtpu
def test_compile_only_devices():
  devices = topology_devices(parse_topology("v4-8"))
  assert len(devices) == 4 and devices[0].device_kind == "TPU v4"     # megacore: 1 per chip


@needs_libtpu
def test_tiny_fits_on_v5e_8():
  report = compile_report(_tiny(), parse_topology("v5e-8"))
  assert report["verdict"] == "FITS", report
  assert report["chips"] == 8 and report["device_kind"] == "TPU v5 lite"
  for field in ("argument", "output", "temp", "generated_code", "total"):
    assert report[f"{field}_gib"] > 0, (field, report)
  assert report["total_gib"] < report["hbm_gib"] * report["usable_fraction"]
  text = format_report(report)
  assert "verdict: FITS" in text and "temp" in text


@needs_libtpu
def test_too_large_does_not_fit():
  # 32k sequences of 512 tokens per chip: the activations alone need far more than 16 GiB.
  config = _tiny(global_batch=8 * 32768, seq=512)
  report = compile_report(config, parse_topology("v5e-8"))
  assert report["verdict"] == "DOES NOT FIT", report
  if report["compiler_oom"]:          # the TPU compiler refused it: its message says so
    assert "memory" in report["compiler_message"].lower(), report
  if "total_gib" in report:
    assert report["total_gib"] > report["hbm_gib"] * report["usable_fraction"], report
  assert "DOES NOT FIT" in format_report(report)


@needs_libtpu
def test_indivisible_batch_names_the_key():
  with pytest.raises(ValueError, match="train.global_batch_size"):
    compile_report(_tiny(global_batch=12), parse_topology("v5e-8"))


def test_cli_bad_topology_exits_with_the_valid_names():
  import os, subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [sys.executable, "-m", "tools.aot_compile", "--config=configs/pretrain.py:tiny",
       "--topology=v9-8"], cwd=root, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode != 0
  assert "unknown TPU topology 'v9-8'; valid: v4-8" in result.stderr, result.stderr


@pytest.mark.parametrize("true_max,compiler_oom_above", [(344, False), (40, True), (8, False)])
def test_find_max_batch_search(monkeypatch, true_max, compiler_oom_above):
  """The search on a made-up memory curve (no compiles): it must land on the exact largest batch."""
  topology = parse_topology("v5e-16")
  monkeypatch.setattr(search, "topology_devices", lambda t: [None] * t.num_chips)

  def fake_report(config, topo, devices, usable_fraction):
    per_chip = config.train.global_batch_size / len(devices)
    total = 2.0 + (usable_fraction * topo.hbm_gib - 2.0) * per_chip / (true_max + 4)
    if per_chip > true_max and compiler_oom_above:
      return dict(per_chip_batch=per_chip, global_batch=config.train.global_batch_size,
                  verdict="DOES NOT FIT", compiler_oom=True, hbm_gib=topo.hbm_gib)
    return dict(per_chip_batch=per_chip, global_batch=config.train.global_batch_size,
                total_gib=total, temp_gib=total - 1.5, hbm_gib=topo.hbm_gib,
                verdict="FITS" if per_chip <= true_max else "DOES NOT FIT")

  monkeypatch.setattr(search, "compile_report", fake_report)
  best, tried = search.find_max_batch(_tiny(), topology, start=8, multiple=8,
                                      log=lambda line: None)
  assert best["per_chip_batch"] == true_max // 8 * 8, [r["per_chip_batch"] for r in tried]
  assert len(tried) <= 8, [r["per_chip_batch"] for r in tried]

  # Continuing a bracket from earlier compiles: no probe repeats a known batch or leaves the
  # bracket, and the answer is the same (or the known fit itself when nothing above it fits).
  lo, hi = max(8, true_max // 8 * 8 - 64), true_max // 8 * 8 + 96
  written = []
  best, tried = search.find_max_batch(_tiny(), topology, multiple=8, known_fit=lo,
                                      known_no_fit=hi, on_probe=lambda t: written.append(len(t)),
                                      log=lambda line: None)
  probes = [r["per_chip_batch"] for r in tried]
  assert best["per_chip_batch"] == true_max // 8 * 8, probes
  assert all(lo < p < hi for p in probes), probes
  assert probes[0] == (lo + hi) // 2 // 8 * 8, probes    # a known bracket starts with bisection
  assert written == list(range(1, len(tried) + 1))
  if true_max == 8:
    assert "note" in best         # never compiled here: the earlier compile is the answer
