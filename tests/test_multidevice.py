"""Runs `tests/multidevice` with 8 virtual CPU devices, in a fresh process.

The device count is fixed when JAX starts, so the 8-device tests cannot
share this process (one device, like most users' machines).
"""

import os
import pathlib
import subprocess
import sys

import pytest

_EIGHT_CPUS = "--xla_force_host_platform_device_count=8"


def test_multidevice_suite_on_eight_virtual_cpus(data_dir):
  tests = pathlib.Path(__file__).parent / "multidevice"
  env = dict(os.environ)
  # Found beside the checkout too: hand it on explicitly (its tests use MUTAG).
  env["LORAP_DATA_DIR"] = str(data_dir)
  env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {_EIGHT_CPUS}".strip()
  env["JAX_PLATFORMS"] = "cpu"
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "pytest",
      "-q",
      "-p",
      "no:cacheprovider",
      # In this one process: the suite's workers already use every core.
      "-n",
      "0",
      str(tests),
    ],
    env=env,
    capture_output=True,
    text=True,
    timeout=1800,
  )
  if result.returncode != 0:
    pytest.fail(f"8-device tests failed:\n{result.stdout}\n{result.stderr}")
  # Every test ran: none may skip for want of devices.
  assert " passed" in result.stdout and "skipped" not in result.stdout, (
    result.stdout
  )
