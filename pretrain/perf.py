"""Model FLOPs and device peaks, for tokens/s -> TFLOP/s -> MFU.

Useful FLOPs per sequence (forward + backward = 3 x forward, 2 FLOPs per multiply-add):
  6 x non-embedding encoder params x seq            (the dense layers, every token)
  + 12 x layers x hidden x seq^2                    (attention scores and values, fwd + bwd)
  + 6 x (hidden^2 + hidden x vocab) x predictions   (MLM transform + decoder at masked positions)
The NSP head and pooler are negligible and not counted; nor is recomputation from remat.
"""

from __future__ import annotations

from pretrain.model.config import BertConfig


def encoder_params(config: BertConfig) -> int:
  """Parameters of the encoder layers (no embeddings, pooler or heads)."""
  h, m = config.hidden_size, config.intermediate_size
  per_layer = (3 * h * h + 3 * h) + (h * h + h) + (h * m + m) + (m * h + h) + 4 * h
  return config.num_layers * per_layer


def flops_per_sequence(config: BertConfig, seq_len: int, num_predictions: int) -> float:
  h = config.hidden_size
  return (6 * encoder_params(config) * seq_len
          + 12 * config.num_layers * h * seq_len ** 2
          + 6 * (h * h + h * config.vocab_size) * num_predictions)


# Dense bf16 peak TFLOP/s per device, from vendor datasheets (no sparsity). Measured matmul rates are
# lower (e.g. ~800 on an H200); tools/benchmark.py can measure one and report against it instead.
_PEAK_BF16_TFLOPS = {
    "h200": 989.0, "h100": 989.0, "a100": 312.0, "l4": 121.0,
    "tpu v4": 275.0, "tpu v5 lite": 197.0, "tpu v5e": 197.0, "tpu v5p": 459.0, "tpu v5": 459.0,
    "tpu v6 lite": 918.0, "tpu v6e": 918.0,
}


def peak_tflops(device_kind: str) -> float | None:
  kind = device_kind.lower()
  for name, peak in _PEAK_BF16_TFLOPS.items():
    if name in kind:
      return peak
  return None
