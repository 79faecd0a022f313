"""Give JAX 8 CPU devices before anything touches a device, so meshes like (2,2,2) exist on a laptop;
and the fixtures several test modules share."""

import logging
import os
import sys

import pytest

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  (after XLA_FLAGS on purpose)

assert jax.device_count() == 8, jax.devices()


@pytest.fixture
def warnings_seen(caplog):
  """The WARNING (and higher) lines logged through absl during the test."""
  caplog.set_level(logging.WARNING, logger="absl")
  return lambda: [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.fixture(scope="module")
def child_env(tmp_path_factory):
  """The environment of the training runs the reliability tests start as child processes."""
  import reliability_helpers  # pylint: disable=g-import-not-at-top
  return reliability_helpers.child_env(tmp_path_factory)
