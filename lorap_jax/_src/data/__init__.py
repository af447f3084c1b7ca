"""Benchmark datasets: loading, validation, download and padded batching."""

from lorap_jax._src.data.batching import (
  GraphBatch,
  PaddingBudget,
  iterate_batches,
  make_budgets,
)
from lorap_jax._src.data.cache import CACHE_DIR_ENV, resolve_cache_dir
from lorap_jax._src.data.containers import GRAPH_TASKS
from lorap_jax._src.data.csbm import edge_homophily, make_csbm
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
from lorap_jax._src.data.molecules import load_aqsol
from lorap_jax._src.data.npz import (
  load_npz_graph,
  random_per_class_split,
  read_npz_graph,
)
from lorap_jax._src.data.sampling import (
  NeighborCSR,
  NodeBatch,
  in_neighbor_csr,
  iterate_node_batches,
  neighbor_budget,
  sample_neighborhood,
  sample_node_batch,
)
from lorap_jax._src.data.superpixels import load_mnist_superpixels
from lorap_jax._src.data.validation import (
  canonical_edges,
  validate_graph_dataset,
  validate_node_dataset,
  validate_prompt_sizes,
)

__all__ = [
  "CACHE_DIR_ENV",
  "DATASET_NAMES",
  "DATA_DIR_ENV",
  "GRAPH_TASKS",
  "NODE_FEATURE_OPTIONS",
  "NUM_FOLDS",
  "DataFileError",
  "DatasetError",
  "DownloadError",
  "Fold",
  "GraphBatch",
  "GraphDataset",
  "NeighborCSR",
  "NodeBatch",
  "NodeDataset",
  "PaddingBudget",
  "canonical_edges",
  "download_file",
  "edge_homophily",
  "fetch_dataset",
  "in_neighbor_csr",
  "is_node_dataset",
  "iterate_batches",
  "iterate_node_batches",
  "load_aqsol",
  "load_dataset",
  "load_gin_format",
  "load_mnist_superpixels",
  "load_npz_graph",
  "load_planetoid",
  "load_tu",
  "make_budgets",
  "make_csbm",
  "neighbor_budget",
  "random_per_class_split",
  "read_npz_graph",
  "require_file",
  "resolve_cache_dir",
  "resolve_data_dir",
  "sample_neighborhood",
  "sample_node_batch",
  "validate_graph_dataset",
  "validate_node_dataset",
  "validate_prompt_sizes",
]
