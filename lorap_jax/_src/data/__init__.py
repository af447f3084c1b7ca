"""Benchmark datasets: loading, integrity checks and padded batching."""

from lorap_jax._src.data.batching import (
  GraphBatch,
  PaddingBudget,
  iterate_batches,
  make_budgets,
)
from lorap_jax._src.data.datasets import (
  DATASET_NAMES,
  NODE_FEATURE_OPTIONS,
  NUM_FOLDS,
  Fold,
  GraphDataset,
  NodeDataset,
  is_node_dataset,
  load_dataset,
  load_gin_format,
  load_planetoid,
  load_tu,
)
from lorap_jax._src.data.files import (
  DATA_DIR_ENV,
  DataFileError,
  require_file,
  resolve_data_dir,
)

__all__ = [
  "DATASET_NAMES",
  "DATA_DIR_ENV",
  "NODE_FEATURE_OPTIONS",
  "NUM_FOLDS",
  "DataFileError",
  "Fold",
  "GraphBatch",
  "GraphDataset",
  "NodeDataset",
  "PaddingBudget",
  "is_node_dataset",
  "iterate_batches",
  "load_dataset",
  "load_gin_format",
  "load_planetoid",
  "load_tu",
  "make_budgets",
  "require_file",
  "resolve_data_dir",
]
