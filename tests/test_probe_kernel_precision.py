"""The kernel precision probe's oracle, rows and restore, on CPU."""

import sys

import jax
import numpy as np
from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "experiments"))
import benchmark_kernel
import probe_kernel_precision as probe

from lorap_jax.kernels.lorap_prompt import lorap_prompt_reference
from lorap_jax.kernels.lorap_prompt import pallas as pallas_lib


def _inputs():
  return benchmark_kernel.prompt_inputs(
    300, 16, 8, 4, "float", jax.random.key(0)
  )


def test_float64_oracle_matches_the_reference_prompt():
  s, params, _, _ = _inputs()
  got = lorap_prompt_reference(s, *params)  # No grid: no output quantizer.
  np.testing.assert_allclose(
    got, probe.float64_prompt(s, params), rtol=1e-5, atol=1e-6
  )


def test_rows_report_latency_error_or_the_refusal():
  s, params, _, _ = _inputs()
  want = probe.float64_prompt(s, params)
  cells = probe.row(300, 16, "xla", "IEEE", None, s, params, want).split("|")
  assert cells[1:5] == [" 300 x 16 ", " xla ", " IEEE ", " heuristic "]
  assert float(cells[6]) < 1e-5  # float32 against float64
  # A variant that cannot run gives its reason, not a crash.
  probe.set_precision("pallas", probe.PRECISIONS["TF32 x 3"])
  try:
    refused = probe.row(300, 16, "pallas", "TF32 x 3", None, s, params, want)
  finally:
    probe.set_precision("pallas", jax.lax.Precision.HIGHEST)
  assert "ExceptionGroup" in refused or "Error" in refused
  assert pallas_lib.DOT_PRECISION == jax.lax.Precision.HIGHEST
