"""`--help_config`'s listing (pretrain/config_docs.py): every key of every config variant has a
description, read from the trailing comment beside its definition in configs/*.py, and is listed with
the value the variant (and the overrides) give it."""

import importlib.util
import os
import textwrap

import pytest

from configs import glue
from configs import pretrain
from configs import squad
from pretrain import config_docs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = [("pretrain.py", v) for v in pretrain._SIZES] + [("glue.py", t) for t in glue.TASKS] + \
           [("squad.py", v) for v in squad.VERSIONS]


def _load(path, variant=None):
  spec = importlib.util.spec_from_file_location("config_under_test", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*([variant] if variant else []))


@pytest.mark.parametrize("file,variant", VARIANTS, ids=[f"{f}:{v}" for f, v in VARIANTS])
def test_every_key_of_every_variant_is_described(file, variant):
  path = os.path.join(REPO, "configs", file)
  rows = config_docs.describe(_load(path, variant), path)
  undescribed = [key for key, _, definition in rows if not definition.description]
  assert not undescribed, (f"{file}:{variant}: add a trailing `# comment` beside the definition of "
                           f"{undescribed} (configs/*.py)")


def test_descriptions_come_from_the_comment_beside_each_definition(tmp_path):
  path = tmp_path / "toy.py"
  path.write_text(textwrap.dedent("""\
      import ml_collections

      def sizes():
        return ml_collections.ConfigDict(dict(
            width=8,              # the width
            depth=2,              # the depth, which
                                  # goes on here
            # A comment about the next field is not its description.
            heads=1,
        ))

      def get_config():
        config = ml_collections.ConfigDict()
        config.name = "toy"     # the name
        config.size = sizes()
        config.train = ml_collections.ConfigDict(dict(
            steps=10,             # optimizer steps
        ))
        config.train.steps = 20   # an override's note is not the description
        return config
      """))
  rows = {key: (value, d.description)
          for key, value, d in config_docs.describe(_load(str(path)), str(path))}
  assert rows == {"name": ("toy", "the name"), "size.width": (8, "the width"),
                  "size.depth": (2, "the depth, which goes on here"), "size.heads": (1, ""),
                  "train.steps": (20, "optimizer steps")}


def test_listing_shows_the_variants_values_grouped_in_the_files_order():
  path = os.path.join(REPO, "configs", "squad.py")
  config = _load(path, "v2.0")
  config.train.batch_size = 48                                  # as --config.train.batch_size=48
  lines = config_docs.listing(config, f"{path}:v2.0").splitlines()
  assert lines[0].startswith(f"# {path}:v2.0: every key")
  keys = [line.split(" = ")[0] for line in lines[1:] if line]
  assert sorted(keys) == sorted(k for k, _ in config_docs.leaves(config))   # each key once
  assert keys[:3] == ["task", "seed", "seeds"]                  # top level first, in file order
  groups = [k.partition(".")[0] for k in keys if "." in k]
  assert groups == sorted(groups)                               # then group by group
  by_key = {line.split(" = ")[0]: line for line in lines[1:] if line}
  # configs/squad.py sets the rate; configs/finetune.py describes it.
  assigned, _, description = by_key["optim.peak_learning_rate"].partition("  # ")
  assert (assigned.rstrip(), description) == (
      "optim.peak_learning_rate = 3e-05", "the top of the schedule (the head's, with layer_decay < 1)")
  assert by_key["train.batch_size"].startswith("train.batch_size = 48 ")
  assert by_key["data.version_2"].startswith("data.version_2 = True ")
  # Fine-tuning's speed switches come from configs/pretrain.py's model_config, comment and all.
  assert by_key["model.dropout_rng"].endswith("# hash (hashed positions) | threefry | rbg | unsafe_rbg")
