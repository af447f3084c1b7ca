"""Checks of the public API surface (after optax's `optax_test.py`)."""

import importlib
import types

import pytest

import lorap_jax

CORE_NAMES = (
  "fake_quant",
  "affine_qparams",
  "symmetric_qparams",
  "calibrate",
  "LoRAP",
  "GPF",
  "GPFPlus",
  "QuantGCNConv",
  "QuantGINConv",
  "QuantGATConv",
  "GNN",
  "ModelConfig",
  "PromptConfig",
  "QuantConfig",
  "train_and_evaluate",
  "run_sweep",
  "SweepGrid",
  "export_integer_model",
  "integer_forward",
  "load_dataset",
  "get_config",
  "kernels",
)


def _isort_key(name):
  """Ruff's RUF022 order: CONSTANTS, then CamelCase, then lowercase."""
  if name.isupper():
    kind = 0
  elif name[0].isupper():
    kind = 1
  else:
    kind = 2
  return kind, name


def test_all_names_exist():
  missing = [name for name in lorap_jax.__all__ if not hasattr(lorap_jax, name)]
  assert not missing


@pytest.mark.parametrize("name", lorap_jax.__all__)
def test_all_names_importable(name):
  namespace = {}
  exec(f"from lorap_jax import {name}", namespace)
  assert namespace[name] is getattr(lorap_jax, name)


def test_all_is_sorted_without_duplicates():
  names = list(lorap_jax.__all__)
  assert len(names) == len(set(names))
  assert all(isinstance(name, str) for name in names)
  assert names == sorted(names, key=_isort_key)


def test_core_names_present():
  assert set(CORE_NAMES) <= set(lorap_jax.__all__)


def test_no_private_names_exported():
  for name in lorap_jax.__all__:
    assert "_src" not in name
    assert not name.startswith("_")
  # Nothing public is a module from the private tree.
  for name in lorap_jax.__all__:
    value = getattr(lorap_jax, name)
    if isinstance(value, types.ModuleType):
      assert "_src" not in value.__name__


def test_kernels_package():
  kernels = lorap_jax.kernels
  assert kernels.__name__ == "lorap_jax.kernels"
  assert callable(kernels.lorap_prompt)
  assert callable(kernels.lorap_prompt_reference)
  for name in kernels.__all__:
    assert hasattr(kernels, name)
  module = importlib.import_module("lorap_jax.kernels.lorap_prompt")
  assert module.lorap_prompt is kernels.lorap_prompt
  assert module.IMPLEMENTATIONS == ("xla", "pallas", "triton")
  assert kernels.BlockConfig is module.BlockConfig
  assert callable(module.get_default)
  for name in module.__all__:
    assert hasattr(module, name)


def test_public_objects_document_themselves():
  undocumented = [
    name
    for name in lorap_jax.__all__
    if callable(getattr(lorap_jax, name))
    and not (getattr(lorap_jax, name).__doc__ or "").strip()
  ]
  assert not undocumented
