"""Every key of a config with its value and a one-line description (`--help_config`).

The descriptions are the trailing `# comments` beside each field in configs/*.py, read from the
source with `ast` and `tokenize`, so the listing cannot drift from the configs: a field's comment is
its documentation, and a field without one is listed with an empty description (tests/test_commands.py
requires one for every key of every variant).

Where a key is defined, in a config file and the `configs` modules it imports (nearest first):
- `config.group = ConfigDict(dict(key=..., ...))`: `group.key`;
- `config.key = ...`: a top-level `key`;
- a `dict(key=...)` built elsewhere (configs/pretrain.py's `model_config`): `*.key`, for any group.
Overrides of one field (`config.optim.peak_learning_rate = 3e-5` in a variant) set values, not
descriptions. A comment may go on over the next lines when they hold only a comment starting in the
same column.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
import dataclasses
import importlib.util
import io
import tokenize
from typing import Any

import ml_collections

_MAX_KEY_WIDTH = 44      # `key = value` column past which a long value does not push the comments


@dataclasses.dataclass(frozen=True)
class Definition:
  description: str
  position: tuple[int, int]        # (file's rank, line): where it is defined, for the listing order


# --------------------------------------------------------------------------------------------------
# Reading the config files


def _comments(source: str) -> tuple[dict[int, tuple[int, str]], set[int]]:
  """Each line's comment as (column, text), and the lines that hold code."""
  comments, code = {}, set()
  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    if token.type == tokenize.COMMENT:
      comments[token.start[0]] = (token.start[1], token.string.lstrip("#").strip())
    elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                            tokenize.ENDMARKER):
      code.update(range(token.start[0], token.end[0] + 1))
  return comments, code


def _description(node: ast.AST, comments: dict[int, tuple[int, str]], code: set[int]) -> str:
  """The trailing comment on `node`'s lines, with the comment-only lines that continue it."""
  parts, column, line = [], None, node.lineno
  for line in range(node.lineno, node.end_lineno + 1):
    if line in comments and line in code:
      column = comments[line][0]
      parts.append(comments[line][1])
  while column is not None and line + 1 in comments and line + 1 not in code \
      and comments[line + 1][0] == column:
    line += 1
    parts.append(comments[line][1])
  return " ".join(parts)


def _is_dict_call(node: ast.AST) -> bool:
  return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
          and node.func.id == "dict")


def definitions(path: str, rank: int = 0) -> dict[str, Definition]:
  """The keys a config source file defines (`group.key`, `key`, or `*.key`; see the docstring)."""
  with open(path, encoding="utf-8") as f:
    source = f.read()
  tree = ast.parse(source, path)
  comments, code = _comments(source)
  found: dict[str, Definition] = {}

  def define(key: str, node: ast.AST):
    found.setdefault(key, Definition(_description(node, comments, code), (rank, node.lineno)))

  grouped = set()
  for node in ast.walk(tree):
    target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None
    if not (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)):
      continue                                      # only `config.name = ...`
    calls = [call for call in ast.walk(node.value) if _is_dict_call(call)]
    for call in calls:
      grouped.add(call)
      for keyword in call.keywords:
        if keyword.arg:                             # not a `**mapping`
          define(f"{target.attr}.{keyword.arg}", keyword)
    if not calls:
      define(target.attr, node)
  for node in ast.walk(tree):
    if _is_dict_call(node) and node not in grouped:
      for keyword in node.keywords:
        if keyword.arg:
          define(f"*.{keyword.arg}", keyword)
  return found


def _imported_config_modules(path: str) -> Iterator[str]:
  """The files of the `configs.*` modules that `path` imports."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    elif isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    else:
      continue
    for name in names:
      if name.split(".")[0] != "configs":
        continue
      try:
        spec = importlib.util.find_spec(name)
      except ModuleNotFoundError:                   # `from configs.finetune import base_config`
        continue
      if spec and spec.origin and spec.origin.endswith(".py"):
        yield spec.origin


def source_files(path: str) -> list[str]:
  """`path` and, nearest first, the configs modules its definitions may come from."""
  files, queue = [], [path]
  while queue:
    file = queue.pop(0)
    if file not in files:
      files.append(file)
      queue.extend(_imported_config_modules(file))
  return files


# --------------------------------------------------------------------------------------------------
# The listing


def leaves(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[tuple[str, Any]]:
  """(dotted key, value) of every leaf of `config`."""
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def describe(config: ml_collections.ConfigDict, path: str) -> list[tuple[str, Any, Definition]]:
  """(key, value, definition) of every leaf of `config`, loaded from the config file `path`."""
  tables = [definitions(file, rank) for rank, file in enumerate(source_files(path))]
  missing = Definition("", (len(tables), 0))
  rows = []
  for key, value in leaves(config):
    wildcard = "*." + key.rpartition(".")[2]
    found = (next((t[key] for t in tables if key in t), None)
             or next((t[wildcard] for t in tables if "." in key and wildcard in t), missing))
    rows.append((key, value, found))
  return rows


def listing(config: ml_collections.ConfigDict, config_arg: str) -> str:
  """`group.key = value  # description`, one line a key: top-level keys, then group by group, each
  in the order its config file defines them."""
  rows = describe(config, config_arg.split(":", 1)[0])
  groups: dict[str, list] = {}
  for key, value, definition in rows:
    groups.setdefault(key.rpartition(".")[0], []).append((key, value, definition))
  lines = [f"# {config_arg}: every key, its value and what it sets; "
           "change one with --config.KEY=VALUE"]
  width = min(_MAX_KEY_WIDTH, max(len(f"{key} = {value!r}") for key, value, _ in rows))
  for group in sorted(groups):
    entries = sorted(groups[group], key=lambda row: row[2].position)
    assigned = [f"{key} = {value!r}" for key, value, _ in entries]
    lines.append("")
    lines.extend(f"{text:<{width}}  # {row[2].description}" if row[2].description else text
                 for text, row in zip(assigned, entries))
  return "\n".join(lines)
