"""Object storage (gs://, or any other fsspec URL) for shards and workdirs, and one line for the two
mistakes a user makes with it: a bucket that does not exist, and credentials the server refuses.

gcsfs reports either one in its own terms (a FileNotFoundError naming an upload URL, an HttpError
with a code, an OSError "Forbidden: ...", google-auth's exceptions) and logs each failed request
with a traceback before raising it; `explained` turns them into a `StorageError` that names the
workdir or shard directory and the bucket, and drops gcsfs's repeat of an error its caller
receives.
"""

from __future__ import annotations

import contextlib
import logging as std_logging
from typing import Iterator

import fsspec

from pretrain.console import UserError

_CREDENTIALS_HINT = ("use credentials that may read and write it: `gcloud auth application-default "
                     "login`, or GOOGLE_APPLICATION_CREDENTIALS=KEY.json of a service account with "
                     "roles/storage.objectAdmin on the bucket")


class StorageError(UserError):
  """A bucket that does not exist or credentials that are refused; the message is one line."""


def is_remote(path: str) -> bool:
  return "://" in str(path)


def bucket_of(url: str) -> str:
  """`gs://bucket/a/b` -> `gs://bucket`."""
  protocol, _, rest = str(url).partition("://")
  return f"{protocol}://{rest.split('/', 1)[0]}"


def refusal(error: BaseException) -> str | None:
  """Why access was refused, as a clause (HTTP 401/403 from gcsfs, or credentials google-auth
  could not find or refresh), or None when `error` is something else."""
  if (type(error).__module__ or "").startswith("google.auth"):
    return f"no usable credentials ({type(error).__name__}: {_first_line(error)})"
  code = getattr(error, "code", None)
  if type(error).__name__ == "HttpError" and code in (401, 403):
    message = _first_line(error).removesuffix(f", {code}")
  elif isinstance(error, OSError) and str(error).startswith("Forbidden: "):   # gcsfs's HTTP 403
    code, message = 403, str(error).partition("\n")[2].strip() or _first_line(error)
  else:
    return None
  return f"the storage server refused the credentials (HTTP {code}: {message})"


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def _bucket_missing(url: str) -> bool:
  """Whether the bucket of `url` is known not to exist (False when that cannot be asked)."""
  try:
    fs, _ = fsspec.core.url_to_fs(url)
    return not fs.exists(bucket_of(url).split("://", 1)[1])
  except Exception:  # pylint: disable=broad-except
    return False


@contextlib.contextmanager
def explained(url: str, what: str) -> Iterator[None]:
  """Runs the body; if it fails on `url` (`what` names it: "workdir", "shard directory") because
  the bucket does not exist or access is refused, raises StorageError saying so in one line."""
  if not is_remote(url):
    yield
    return
  quiet_gcsfs_repeats()
  try:
    yield
  except FileNotFoundError as e:
    if not _bucket_missing(url):
      raise
    bucket = bucket_of(url)
    raise StorageError(f"{what} {url}: bucket {bucket} does not exist (check the name, or "
                       f"create it: gsutil mb {bucket})") from e
  except Exception as e:  # pylint: disable=broad-except
    reason = refusal(e)
    if reason is None:
      raise
    raise StorageError(f"{what} {url}: {reason}; {_CREDENTIALS_HINT}") from e


class _GcsfsRepeats(std_logging.Filter):
  """gcsfs logs every request it gives up on, with a traceback, then raises the same error."""

  def filter(self, record):
    message = str(record.msg)
    return not (record.levelno >= std_logging.ERROR and (
        "non-retriable exception" in message or "out of retries on exception" in message))


_FILTER = _GcsfsRepeats()


def quiet_gcsfs_repeats():
  logger = std_logging.getLogger("gcsfs")
  if _FILTER not in logger.filters:
    logger.addFilter(_FILTER)
