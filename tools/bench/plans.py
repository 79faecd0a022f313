"""The benchmark plans: named configurations (overrides of configs/pretrain.py:VARIANT) as data.

A plan is a dict of rows, timed in order; a variant of the model is a config key, never a patch of
the code. A row's `"xla"` entry (a dict) names XLA compile options for that row alone
(`lowered.compile(compiler_options=...)`, the names of XLA_FLAGS without `--`); a row whose
`mesh.shape` needs another number of devices than the process sees is skipped, so one plan can hold
the one-GPU baseline (run under CUDA_VISIBLE_DEVICES=0) and the two-GPU rows. `PEERS` names the
rows whose shapes the PyTorch peer also runs, `PROFILES` the rows to
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

# Issue 20: fsdp on two GPUs, the base-128 defaults at 256 sequences per GPU (as the "Two GPUs"
# tables of docs/benchmarks.md), with XLA's collective scheduling and combining options.
# Pipelining and double buffering act on while loops: the scanned layer stack (model.scan_layers).
BASE128_PER_GPU = {"variant": "base", "data.max_seq_length": 128,
                   "data.max_predictions_per_seq": 20}
ONE_GPU = {**BASE128_PER_GPU, "train.global_batch_size": 256, "mesh.shape": (1, 1, 1)}
DP2 = {**BASE128_PER_GPU, "train.global_batch_size": 512, "mesh.shape": (2, 1, 1)}
FSDP2 = {**BASE128_PER_GPU, "train.global_batch_size": 512, "mesh.shape": (1, 2, 1)}
SCAN = {"model.scan_layers": True}
LHS = {"xla_gpu_enable_latency_hiding_scheduler": True}
COMBINE = {"xla_gpu_all_gather_combine_threshold_bytes": 2**27,        # 128 MiB
           "xla_gpu_reduce_scatter_combine_threshold_bytes": 2**27,
           "xla_gpu_all_reduce_combine_threshold_bytes": 2**27}
PIPELINE = {**LHS, "xla_gpu_enable_pipelined_all_gather": True,
            "xla_gpu_enable_pipelined_reduce_scatter": True,
            "xla_gpu_enable_pipelined_all_reduce": True,
            "xla_gpu_enable_while_loop_double_buffering": True}

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
    # issue 20, most telling first (a run cut short keeps them): run it twice into one --out, once
    # under CUDA_VISIBLE_DEVICES=0 (the 1gpu rows), once on both GPUs (the rest); docs/benchmarks.md
    "fsdp_overlap": {
        "fsdp": {**FSDP2},
        "dp": {**DP2},
        "fsdp_lhs": {**FSDP2, "xla": {**LHS}},
        "fsdp_scan_pipelined": {**FSDP2, **SCAN, "xla": {**PIPELINE}},
        "fsdp_scan": {**FSDP2, **SCAN},
        "fsdp_scan_lhs": {**FSDP2, **SCAN, "xla": {**LHS}},
        "fsdp_lhs_combine": {**FSDP2, "xla": {**LHS, **COMBINE}},
        "fsdp_scan_pipelined_combine": {**FSDP2, **SCAN, "xla": {**PIPELINE, **COMBINE}},
        "dp_lhs": {**DP2, "xla": {**LHS}},
        "dp_scan": {**DP2, **SCAN},
        "1gpu": {**ONE_GPU},
        "1gpu_scan": {**ONE_GPU, **SCAN},
        "1gpu_lhs": {**ONE_GPU, "xla": {**LHS}},
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
PROFILES = {"table": ["large512_d11_fused", "base128_d11_fused"], "smoke": ["tiny_fused"],
            "fsdp_overlap": ["fsdp", "fsdp_scan_pipelined"]}     # their GPU HLO comes back too
SAME_LOSS = {"smoke": [("tiny_plain", "tiny_fastbwd")],
             "fsdp_overlap": [("dp", "fsdp"), ("fsdp", "fsdp_lhs"),
                              ("fsdp_scan", "fsdp_scan_pipelined")]}
