"""The PyTorch peer of tools/benchmark.py: transformers' BertForPreTraining on the same batch.

  python -m tools.bench.torch_peer --variant=base --global_batch_size=256 --seq_len=128 \
      --max_predictions=20 --hidden_dropout=0.1 --attention_dropout=0.1 [--json=out.json]

The peer as issue 6 defines it: `BertForPreTraining` (float32 parameters, bfloat16 autocast,
`attn_implementation="sdpa"`, `torch.compile`, fused AdamW), the same global batch, sequence length,
masked positions and dropout as ours, on the same synthetic batch (`pretrain.synthetic`: MLM labels
are -100 except at the masked positions). Like ours it is timed after compilation and warm-up, in
windows of `--window` steps between device synchronisations, reported as the median window's mean.

`--lock=PATH` serialises the timed sections with another process (tools/bench/sweep.py runs ours
and the peer side by side, compiling at the same time, timing one at a time). Only numpy, torch and
transformers are needed; jax is never imported here.

Memory (CUDA only, else null), in GiB: `peak_mem_gib` is `torch.cuda.max_memory_allocated()` over
the timed steps (the peak is reset just before them), which counts every tensor of this process,
including the models of the other configurations a `--runs` process holds; `peak_mem_row_gib` is
that peak less those others (what was allocated before the timed steps less this configuration's
own parameters, optimizer state and batch): what this configuration's step itself occupies, the
figure comparable with ours (tools/benchmark.py, `device_row_peak_gib`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

from tools.bench.gpu_turns import gpu_lock, wait_for

SIZES = {"tiny": (2, 128, 2), "mini": (4, 256, 4), "small": (4, 512, 8), "medium": (8, 512, 8),
         "base": (12, 768, 12), "large": (24, 1024, 16)}


def torch_batch(batch: dict[str, np.ndarray], vocab_size: int, device):
  """Our batch dict (pretrain.synthetic layout) -> BertForPreTraining keyword arguments."""
  import torch  # pylint: disable=g-import-not-at-top
  ids = batch["input_ids"]
  labels = np.full(ids.shape, -100, np.int64)
  rows = np.arange(ids.shape[0])[:, None].repeat(batch["masked_lm_positions"].shape[1], 1)
  real = batch["masked_lm_weights"] > 0
  labels[rows[real], batch["masked_lm_positions"][real]] = batch["masked_lm_ids"][real]
  assert labels.max() < vocab_size
  as_t = lambda x: torch.as_tensor(np.asarray(x, np.int64), device=device)
  return dict(input_ids=as_t(ids), attention_mask=as_t(batch["input_mask"]),
              token_type_ids=as_t(batch["segment_ids"]), labels=as_t(labels),
              next_sentence_label=as_t(batch["next_sentence_labels"]).reshape(-1))


def build_model(variant: str, hidden_dropout: float, attention_dropout: float, vocab_size: int,
                max_position_embeddings: int = 512):
  import transformers  # pylint: disable=g-import-not-at-top
  layers, hidden, heads = SIZES[variant]
  cfg = transformers.BertConfig(
      vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
      num_attention_heads=heads, intermediate_size=4 * hidden,
      max_position_embeddings=max_position_embeddings, type_vocab_size=2, hidden_act="gelu",
      hidden_dropout_prob=hidden_dropout, attention_probs_dropout_prob=attention_dropout,
      layer_norm_eps=1e-12, attn_implementation="sdpa")
  model = transformers.BertForPreTraining(cfg)
  assert model.config._attn_implementation == "sdpa", model.config._attn_implementation  # pylint: disable=protected-access
  return model


class Peer:
  """One peer configuration: `prepare()` compiles and warms up, `time()` measures."""

  def __init__(self, args, batch: dict[str, np.ndarray]):
    self.args, self.batch = args, batch

  def prepare(self):
    import torch  # pylint: disable=g-import-not-at-top
    args = self.args
    self.cuda = torch.cuda.is_available()
    device = torch.device("cuda" if self.cuda else "cpu")
    torch.manual_seed(0)
    self.model = build_model(args.variant, args.hidden_dropout, args.attention_dropout,
                             args.vocab_size, args.max_position_embeddings).to(device).train()
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.01,
                                 fused=self.cuda)
    step_model = torch.compile(self.model) if args.compile else self.model
    inputs = self.inputs = torch_batch(self.batch, args.vocab_size, device)
    self.sync = torch.cuda.synchronize if self.cuda else (lambda: None)

    def step():
      with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = step_model(**inputs).loss
      loss.backward()
      self.opt.step()
      self.opt.zero_grad(set_to_none=True)
      return loss

    self.step = step
    start = time.perf_counter()
    self.first_loss = float(step())      # compiles forward and backward
    self.sync()
    self.compile_s = time.perf_counter() - start
    for _ in range(args.warmup):
      step()
    self.sync()

  def time(self, lock: str | None = None, other_side_compiling: bool = False) -> dict:
    import torch  # pylint: disable=g-import-not-at-top
    args = self.args
    with gpu_lock(lock):
      for _ in range(2):
        self.step()
      self.sync()
      if self.cuda:                 # the timed steps' peak (see the module's docstring)
        in_use_before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
      times = []
      for _ in range(max(1, args.steps // args.window)):
        t0 = time.perf_counter()
        for _ in range(args.window):
          loss = self.step()
        self.sync()
        times.append((time.perf_counter() - t0) / args.window)
    step_s = statistics.median(times)
    b = args.global_batch_size
    result = dict(
        peer="torch", device=torch.cuda.get_device_name() if self.cuda else "cpu",
        variant=args.variant, global_batch=b, seq_len=args.seq_len,
        masked_positions=args.max_predictions, hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout, compiled=bool(args.compile),
        compile_s=self.compile_s, step_ms=step_s * 1e3, step_ms_min=min(times) * 1e3,
        step_ms_max=max(times) * 1e3, timed_steps=len(times) * args.window,
        window=args.window, seq_per_s=b / step_s,
        first_loss=self.first_loss, last_loss=float(loss),
        other_side_compiling=other_side_compiling, torch_version=torch.__version__)
    result.update(peak_mem_gib=None, peak_mem_row_gib=None, mem_in_use_before_gib=None,
                  own_resident_gib=self.resident_bytes() / 2**30)
    if self.cuda:
      peak = torch.cuda.max_memory_allocated()
      others = max(0, in_use_before - self.resident_bytes())
      result.update(peak_mem_gib=peak / 2**30, peak_mem_row_gib=(peak - others) / 2**30,
                    mem_in_use_before_gib=in_use_before / 2**30)
    else:
      result["memory_note"] = "no CUDA device: no peak memory"
    return result

  def resident_bytes(self) -> int:
    """Bytes of this configuration's parameters, buffers, optimizer state and batch."""
    import torch  # pylint: disable=g-import-not-at-top
    tensors = [*self.model.parameters(), *self.model.buffers(), *self.inputs.values()]
    for state in self.opt.state.values():
      tensors += [v for v in state.values() if torch.is_tensor(v)]
    storages = {}
    for t in tensors:
      storage = t.untyped_storage()
      storages[(t.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def torch_matmul_tflops(n: int = 8192, repeats: int = 20) -> float | None:
  import torch  # pylint: disable=g-import-not-at-top
  if not torch.cuda.is_available():
    return None
  a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
  b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
  for _ in range(3):
    a @ b
  torch.cuda.synchronize()
  times = []
  for _ in range(repeats):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    a @ b
    end.record()
    torch.cuda.synchronize()
    times.append(start.elapsed_time(end) / 1e3)
  return 2 * n ** 3 / statistics.median(times) / 1e12


def synthetic_batch(args) -> dict[str, np.ndarray]:
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from pretrain.data.synthetic import SyntheticSource  # pylint: disable=g-import-not-at-top
  return next(SyntheticSource(vocab_size=args.vocab_size, max_seq_length=args.seq_len,
                              max_predictions_per_seq=args.max_predictions,
                              global_batch_size=args.global_batch_size, seed=args.seed))


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--variant", default="base", choices=sorted(SIZES))
  p.add_argument("--global_batch_size", type=int, default=256)
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--max_predictions", type=int, default=20)
  p.add_argument("--hidden_dropout", type=float, default=0.1)
  p.add_argument("--attention_dropout", type=float, default=0.1)
  p.add_argument("--vocab_size", type=int, default=30522)
  p.add_argument("--max_position_embeddings", type=int, default=512)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--steps", type=int, default=30)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--window", type=int, default=5, help="steps between two device syncs")
  p.add_argument("--compile", type=int, default=1)
  p.add_argument("--lock", default=None, help="file lock shared with the other timed process")
  p.add_argument("--ready", default=None, help="touch this file once everything is compiled")
  p.add_argument("--other_ready", default=None, help="wait (--wait_s) for this before timing")
  p.add_argument("--wait_s", type=float, default=0.0)
  p.add_argument("--json", default=None, help="append one JSON line per result here")
  p.add_argument("--runs", default=None,
                 help="JSON list of override dicts: several peer configs in one process")
  return p


def main():
  args = parser().parse_args()
  runs = json.loads(args.runs) if args.runs else [{}]
  peers, results = [], []
  for overrides in runs:              # phase 1: compile and warm up every configuration
    peer = Peer(argparse.Namespace(**{**vars(args), **overrides}), None)
    try:
      peer.batch = synthetic_batch(peer.args)
      peer.prepare()
      peers.append(peer)
      print(f"peer {overrides} compiled in {peer.compile_s:.1f}s", flush=True)
    except Exception as e:  # pylint: disable=broad-except
      results.append(dict(peer="torch", **overrides, error=f"{type(e).__name__}: {e}"[:2000]))
      _emit(args.json, results[-1])
  if args.ready:
    open(args.ready, "w", encoding="utf-8").close()
  overlapped = not wait_for(args.other_ready, args.wait_s)
  for peer in peers:                  # phase 2: time each, one at a time with the other side
    try:
      results.append(peer.time(args.lock, overlapped))
    except Exception as e:  # pylint: disable=broad-except
      results.append(dict(peer="torch", variant=peer.args.variant, error=f"{type(e).__name__}: {e}"))
    _emit(args.json, results[-1])
  with gpu_lock(args.lock):
    _emit(args.json, dict(peer="torch", matmul_tflops_torch=torch_matmul_tflops()))
  return results


def _emit(path: str | None, result: dict):
  print(json.dumps(result), flush=True)
  if path:
    with open(path, "a", encoding="utf-8") as f:
      f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
  main()
