"""Benchmark datasets: loading, validation, download and padded batching."""

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
from lorap_jax._src.data.download import (
  DownloadError,
  download_file,
  fetch_dataset,
)
from lorap_jax._src.data.files import (
  DATA_DIR_ENV,
  DataFileError,
  DatasetError,
  require_file,
  resolve_data_dir,
)
from lorap_jax._src.data.validation import (
  canonical_edges,
  validate_graph_dataset,
  validate_node_dataset,
  validate_prompt_sizes,
)

__all__ = [
  "DATASET_NAMES",
  "DATA_DIR_ENV",
  "NODE_FEATURE_OPTIONS",
  "NUM_FOLDS",
  "DataFileError",
  "DatasetError",
  "DownloadError",
  "Fold",
  "GraphBatch",
  "GraphDataset",
  "NodeDataset",
  "PaddingBudget",
  "canonical_edges",
  "download_file",
  "fetch_dataset",
  "is_node_dataset",
  "iterate_batches",
  "load_dataset",
  "load_gin_format",
  "load_planetoid",
  "load_tu",
  "make_budgets",
  "require_file",
  "resolve_data_dir",
  "validate_graph_dataset",
  "validate_node_dataset",
  "validate_prompt_sizes",
]
