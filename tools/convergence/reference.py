"""The reference side: transformers' BertForPreTraining in PyTorch, trained the way a PyTorch user
would on a GPU (tools/bench/torch_peer.py's peer): float32 master weights, bf16 autocast, SDPA
attention, `torch.compile`, fused AdamW, batches prefetched into pinned memory.

The recipe mirrors `pretrain/optim.py` with PyTorch's and transformers' own pieces: AdamW with two
parameter groups (no decay on biases and LayerNorm, as BERT), transformers' polynomial-decay-with-
warmup LambdaLR (power 1 = linear; like optax it gives the first update the rate at step 0), and
`clip_grad_norm_` before the update. The batches come from the project's loader.
"""

from __future__ import annotations

from collections.abc import Iterator
import queue
import threading
from typing import Any

import ml_collections
import numpy as np

from pretrain.data import loader
from pretrain.model import heads
from pretrain.train import held_out_batches
from tools.bench.torch_peer import torch_batch
from tools.convergence.weights import InputError

NO_DECAY = ("bias", "LayerNorm.weight")     # transformers' run_mlm.py; = google's exclusions here


class Reference:
  """`loop.Side` for transformers' BertForPreTraining."""
  system = "reference"

  def __init__(self, config: ml_collections.ConfigDict, init_dir: str, *, compile_model: bool):
    optim = config.optim
    if optim.name != "adamw":
      raise InputError(f"optim.name={optim.name!r}: the reference mirrors AdamW only "
                       "(PyTorch has no LAMB); use --config.optim.name=adamw")
    self.source = loader.make_source(config, split="train")   # checks the data first
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    self.torch = torch
    self.cuda = torch.cuda.is_available()
    self.device = torch.device("cuda" if self.cuda else "cpu")
    self.vocab_size = config.model.vocab_size
    self.autocast = dict(device_type=self.device.type, enabled=config.model.dtype != "float32",
                         dtype=getattr(torch, config.model.dtype))
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(config.seed)                         # dropout
    self.model = transformers.BertForPreTraining.from_pretrained(
        init_dir, attn_implementation="sdpa", dtype=torch.float32,
        hidden_dropout_prob=config.model.hidden_dropout,
        attention_probs_dropout_prob=config.model.attention_dropout).to(self.device).train()
    named = list(self.model.named_parameters())
    groups = [{"params": [p for n, p in named if not any(s in n for s in NO_DECAY)],
               "weight_decay": optim.weight_decay},
              {"params": [p for n, p in named if any(s in n for s in NO_DECAY)],
               "weight_decay": 0.0}]
    self.opt = torch.optim.AdamW(groups, lr=optim.peak_learning_rate, betas=(optim.b1, optim.b2),
                                 eps=optim.eps, fused=self.cuda)
    self.scheduler = transformers.get_polynomial_decay_schedule_with_warmup(
        self.opt, optim.warmup_steps, config.train.num_train_steps,
        lr_end=optim.end_learning_rate,
        power=1.0 if optim.decay == "linear" else optim.decay_power)
    self.max_grad_norm = optim.max_grad_norm
    self.run_model = torch.compile(self.model) if compile_model else self.model
    self.eval_batches = [self._to_device(torch_batch(b, self.vocab_size, "cpu"))
                         for b in held_out_batches(config)]
    if not self.eval_batches:
      raise InputError(f"the shards in {config.data.path} have no eval split: recreate them with "
                       "`python -m tools.data create --eval_fraction=0.01`")
    self._stop = threading.Event()
    self._filler: threading.Thread | None = None
    self.info = dict(device=torch.cuda.get_device_name() if self.cuda else "cpu",
                     torch=torch.__version__, transformers=transformers.__version__,
                     compiled=compile_model, autocast=config.model.dtype,
                     fused_adamw=self.cuda)

  def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

  def batches(self) -> Iterator[dict[str, Any]]:
    """The loader's batches as torch tensors, prepared (pinned on a GPU) on a thread."""
    ready: queue.Queue = queue.Queue(maxsize=4)

    def put(item) -> None:                 # gives up once close() is called
      while not self._stop.is_set():
        try:
          ready.put(item, timeout=0.1)
          return
        except queue.Full:
          pass

    def fill():
      try:
        while not self._stop.is_set():
          batch = torch_batch(next(self.source), self.vocab_size, "cpu")
          put({k: v.pin_memory() for k, v in batch.items()} if self.cuda else batch)
      except BaseException as e:  # pylint: disable=broad-except
        put(e)

    self._filler = threading.Thread(target=fill, daemon=True, name="reference-prefetch")
    self._filler.start()
    while True:
      item = ready.get()
      if isinstance(item, BaseException):
        raise item
      yield self._to_device(item)

  def step(self, batch: dict[str, Any]) -> tuple[Any, Any, float]:
    torch = self.torch
    lr = self.opt.param_groups[0]["lr"]
    with torch.autocast(**self.autocast):
      loss = self.run_model(**batch).loss
    loss.backward()
    norm = (torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
            if self.max_grad_norm > 0 else torch.zeros(()))
    self.opt.step()
    self.scheduler.step()
    self.opt.zero_grad(set_to_none=True)
    return loss.detach(), norm.detach(), lr

  def fetch(self, handles: list[tuple[Any, Any, float]]) -> list[dict[str, float]]:
    torch = self.torch
    losses = torch.stack([h[0].float() for h in handles]).tolist()
    norms = torch.stack([h[1].float() for h in handles]).tolist()
    return [dict(loss=loss, learning_rate=h[2], grad_norm=norm)
            for loss, norm, h in zip(losses, norms, handles)]

  def evaluate(self) -> dict[str, float]:
    """heads.summarize of the held-out batches, from the model's logits at the masked positions."""
    torch = self.torch
    sums = np.zeros(len(heads.LossSums._fields))
    self.model.eval()
    with torch.no_grad(), torch.autocast(**self.autocast):
      for batch in self.eval_batches:
        out = self.run_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             token_type_ids=batch["token_type_ids"])
        labels = batch["labels"]
        real = labels != -100
        logp = torch.log_softmax(out.prediction_logits[real].float(), -1)
        target = labels[real]
        nsp_logp = torch.log_softmax(out.seq_relationship_logits.float(), -1)
        nsp = batch["next_sentence_label"]
        batch_sums = [-logp.gather(1, target[:, None]).sum(), (logp.argmax(-1) == target).sum(),
                      real.sum(), -nsp_logp.gather(1, nsp[:, None]).sum(),
                      (nsp_logp.argmax(-1) == nsp).sum(), torch.tensor(len(nsp))]
        sums += np.asarray([float(x) for x in batch_sums])
    self.model.train()
    return {k: float(v) for k, v in heads.summarize(heads.LossSums(*sums)).items()}

  def hf_state_dict(self) -> dict[str, np.ndarray]:
    return {k: v.detach().float().cpu().numpy() for k, v in self.model.state_dict().items()}

  def close(self) -> None:
    # Joined, not left to die with the process: a thread still inside torch when the interpreter
    # shuts down aborts it ("terminate called without an active exception", seen once in CI).
    self._stop.set()
    if self._filler is not None:
      self._filler.join()
