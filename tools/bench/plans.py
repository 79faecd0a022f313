"""The benchmark plans: named configurations (overrides of configs/pretrain.py:VARIANT) as data.

A plan is a dict of rows, timed in order; a variant of the model is a config key, never a patch of
the code. `PEERS` names the rows whose shapes the PyTorch peer also runs, `PROFILES` the rows to
profile, `SAME_LOSS` the pairs whose first loss (same parameters, batch and key) must agree.
Plans that measured code since removed (hooks of 2026-11) ran at the commits docs/benchmarks.md
names.
"""

# The "plain" path: XLA's explicit attention, threefry dropout masks, the take_along_axis MLM gather
# and XLA's LayerNorm chain (every speed switch off but the GELU's erf form).
PLAIN = {"model.attention_dropout_impl": "reference", "model.dropout_rng": "threefry",
         "model.mlm_gather": "take", "model.residual_norm_impl": "xla"}
# The model's defaults (the fused attention kernel, hashed hidden dropout, one-hot MLM gather, the
# residual + dropout + LayerNorm kernels), stated over the plain shapes, plus bf16 gradients into
# the MLM decoder's backward GEMMs.
FUSED = {"model.attention_dropout_impl": "fused", "model.dropout_rng": "hash",
         "model.mlm_gather": "one_hot", "model.residual_norm_impl": "fused",
         "model.logits_grad_dtype": "bfloat16"}
FAST_BWD = {"model.logits_grad_dtype": "bfloat16", "model.attention_dropout_impl": "lean"}
NO_DROPOUT = {"model.hidden_dropout": 0.0, "model.attention_dropout": 0.0}

BASE128 = {"variant": "base", "train.global_batch_size": 256, "data.max_seq_length": 128,
           "data.max_predictions_per_seq": 20, **PLAIN}
LARGE128 = {"variant": "large", "train.global_batch_size": 128, "data.max_seq_length": 128,
            "data.max_predictions_per_seq": 20, **PLAIN}
LARGE512 = {"variant": "large", "train.global_batch_size": 32, "data.max_seq_length": 512,
            "data.max_predictions_per_seq": 76, **PLAIN}
TINY32 = {"variant": "tiny", "train.global_batch_size": 8, "data.max_seq_length": 32,
          "data.max_predictions_per_seq": 5, **PLAIN}

PLANS = {
    # the rows of docs/benchmarks.md: each row with the fused kernels and plain
    "table": {
        "base128_d11_fused": {**BASE128, **FUSED},
        "base128_d11_plain": {**BASE128},
        "base128_d00_cudnn_fused": {**BASE128, **NO_DROPOUT, **FUSED,
                                    "model.attention_impl": "cudnn"},
        "base128_d00_cudnn_plain": {**BASE128, **NO_DROPOUT, "model.attention_impl": "cudnn"},
        "large128_d11_fused": {**LARGE128, **FUSED},
        "large128_d11_plain": {**LARGE128},
        "large512_d11_fused": {**LARGE512, **FUSED},
        "large512_d11_plain": {**LARGE512},
        # 0 / 0 with the attention kernel at rate 0 (model.attention_impl=fused) instead of cuDNN
        "base128_d00_kernel_fused": {**BASE128, **NO_DROPOUT, **FUSED,
                                     "model.attention_impl": "fused"},
    },
    # the model's defaults exactly as configs/pretrain.py states them (no overrides but the shape)
    "defaults": {
        "base128_defaults": {"variant": "base", "train.global_batch_size": 256,
                             "data.max_seq_length": 128, "data.max_predictions_per_seq": 20},
        "large512_defaults": {"variant": "large", "train.global_batch_size": 32,
                              "data.max_seq_length": 512, "data.max_predictions_per_seq": 76},
    },
    "smoke": {   # a CPU check of the machinery (tiny model, seconds)
        "tiny_plain": {**TINY32},
        "tiny_fused": {**TINY32, **FUSED},
        "tiny_fastbwd": {**TINY32, **FAST_BWD},
    },
}
_PEER_ROWS = ["base128_d11_plain", "base128_d00_cudnn_plain", "large128_d11_plain",
              "large512_d11_plain"]
PEERS = {"table": _PEER_ROWS, "smoke": ["tiny_plain"]}
PROFILES = {"table": ["large512_d11_fused", "base128_d11_fused"], "smoke": ["tiny_fused"]}
SAME_LOSS = {"smoke": [("tiny_plain", "tiny_fastbwd")]}
