"""Records of a TFDS split as dicts of numpy values, with or without TensorFlow installed.

With TensorFlow, `tfds.load` reads any prepared format. Without it (tensorflow-datasets alone is a
much smaller install), `tfds.data_source` reads datasets prepared as ArrayRecord, and TFDS's mock
data; `import tensorflow_datasets` then registers no builders, so the one asked for is imported.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterable
from typing import Any


def records(name: str, split: str, data_dir: str | None, builder_module: str
            ) -> Iterable[dict[str, Any]]:
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(f"reading TFDS {name!r} needs tensorflow_datasets: pip install "
                      "tensorflow-datasets (and tensorflow to read datasets prepared as TFRecord); "
                      "or read the official files instead") from None
  importlib.import_module(builder_module)
  if importlib.util.find_spec("tensorflow") is not None:
    return tfds.as_numpy(tfds.load(name, split=split, data_dir=data_dir, shuffle_files=False))
  source = tfds.data_source(name, split=split, data_dir=data_dir)
  return (source[i] for i in range(len(source)))
