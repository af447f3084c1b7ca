"""Default experiment configs (ml_collections), shared by the CLI and scripts.

The config never enters `jit`: `train_state.create_model` and
`train_state.create_optimizer` turn it into objects and refuse unknown names.
"""

from collections.abc import Mapping
from typing import Any

import ml_collections
from ml_collections import config_dict

FRAMEWORKS = ("fp32", "qat", "dq", "a2q", "mixq")

# Per-dataset departures from `get_config`'s node- or graph-task defaults,
# as dotted config paths. Every name of `data.DATASET_NAMES` has an entry,
# empty where the defaults are the anchor's protocol:
# - Cora, CiteSeer, PubMed: Kipf & Welling's GCN protocol (the defaults).
# - Amazon Photo / Computers: the same GCN on Shchur et al.'s (2018) random
#   split, redrawn per seed (20 / 30 nodes per class), 10 seeds, on the raw
#   binary bag of words: row-normalised, the FP32 GCN reaches ~80% on Photo
#   after 200 epochs, raw ~90% (Shchur et al.'s GCN figure) by epoch ~40.
# - GIN-format and TU sets: Degree-Quant's GIN (the defaults).
# - MNIST superpixels and AqSol: benchmarking-gnns' GIN 100k configs (4
#   layers x 110, batch 128, Adam lr 1e-3, no weight decay or dropout, LR
#   halved on plateau, here every 25 epochs), 4 seeds on the one fixed split.
#   AqSol is regression: model selection on the validation MAE, and a mean
#   readout where benchmarking-gnns sums: FP32, 1 seed, 20 epochs, summed
#   molecules reached test MAE 2.20 (worse than predicting the training
#   mean, 2.12), mean readout 1.48.
# - CSBM: a generated graph (data/csbm.py) with Gaussian features, which row
#   normalisation would distort; its sizes are the `csbm` section's. One
#   seed: the graphs it is for are large. Neighbour-sampled runs take 1024
#   seed nodes per batch.
_BENCHMARKING_GNNS = {
  "seeds": 4,
  "folds": 1,
  "model.hidden": 110,
  "model.num_layers": 4,
  "model.readout": "sum",
  "model.readout_dropout": 0.0,
  "train.epochs": 100,
  "train.learning_rate": 1e-3,
  "train.weight_decay": 0.0,
  "train.lr_decay_every": 25,
}
DATASET_DEFAULTS = {
  "cora": {},
  "citeseer": {},
  "pubmed": {},
  "amazon-photo": {"normalize_features": False},
  "amazon-computers": {"normalize_features": False},
  "mutag": {},
  "proteins": {},
  "nci1": {},
  "imdb-binary": {},
  "imdb-multi": {},
  "ptc": {},
  "reddit-binary": {},
  "tu-mutag": {},
  "tu-proteins": {},
  "tu-nci1": {},
  "mnist-superpixels": {**_BENCHMARKING_GNNS, "train.selection": "val_acc"},
  "aqsol": {
    **_BENCHMARKING_GNNS,
    "model.readout": "mean",
    "train.selection": "val_mae",
  },
  "csbm": {"normalize_features": False, "seeds": 1, "train.batch_size": 1024},
}

# Node samplers of `config.train.sampler`.
SAMPLERS = ("full", "neighbor")

# MixQ's node-task runs take its own GCN width and weight decay
# (frameworks.md 4.5; the other frameworks keep the dataset's). Its search
# trains every candidate's scale with Adam at the backbone's rate; at hidden
# 64 and weight decay 5e-4 that left the 50-epoch search near chance on Cora,
# so it kept 2-bit inputs and the fixed model lost about 10 points.
MIXQ_NODE_SETTINGS = {"model.hidden": 128, "train.weight_decay": 2e-4}


def use_mixq_node_settings(config, *, keep=()) -> None:
  """Sets `MIXQ_NODE_SETTINGS` on a node-task config of framework mixq.

  Args:
    config: a `get_config` config; one of another framework, or of a graph
      task, is left as it is.
    keep: dotted paths the user set explicitly, which stay as they are.
  """
  from lorap_jax._src.data import is_node_dataset

  if config.quant.framework != "mixq" or not is_node_dataset(config.dataset):
    return
  for path, value in MIXQ_NODE_SETTINGS.items():
    if path not in keep:
      set_field(config, path, value)


def set_field(config: ml_collections.ConfigDict, path: str, value) -> None:
  """Sets the dotted field `path` ("train.epochs") of `config` in place."""
  *sections, leaf = path.split(".")
  node = config
  for section in sections:
    node = node[section]
  node[leaf] = value


def with_fields(
  config: ml_collections.ConfigDict, fields: Mapping[str, Any]
) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted fields replaced: {"train.epochs": 5}."""
  copy = ml_collections.ConfigDict(config.to_dict())
  for path, value in fields.items():
    set_field(copy, path, value)
  return copy


def runs_of(config) -> str:
  """What a config's runs range over: "seeds", or "folds x seeds".

  Node tasks train on one split per seed; graph tasks with one fold
  (MNIST superpixels' and AqSol's fixed split) likewise. `config` is a
  config or its `to_dict()`.
  """
  from lorap_jax._src.data import is_node_dataset

  if is_node_dataset(config["dataset"]) or config["folds"] == 1:
    return "seeds"
  return "folds x seeds"


def get_config(dataset: str = "cora") -> ml_collections.ConfigDict:
  """The default config for `dataset` (node or graph level).

  Node tasks follow Kipf & Welling's GCN protocol (public split, 200 epochs,
  Adam lr 0.01, weight decay 5e-4, dropout 0.5). Graph tasks follow
  Degree-Quant's GIN (5 layers x 64, batch 128, BatchNorm, mean readout,
  lr halved every 50 epochs, 10-fold CV, test accuracy at the epoch of lowest
  validation loss). `DATASET_DEFAULTS` then applies each dataset's own
  settings (MNIST superpixels and AqSol: benchmarking-gnns'). An
  ``npz/<file>.npz`` name gets the node-task defaults.

  Raises:
    ValueError: If `dataset` is not a known dataset name.
  """
  from lorap_jax._src.data import is_node_dataset

  node_task = is_node_dataset(dataset)
  config = ml_collections.ConfigDict()

  # --- Data ---------------------------------------------------------------
  config.dataset = dataset
  config.data_dir = ""  # Empty: the LORAP_DATA_DIR environment variable.
  config.node_features = "auto"  # Graph sets: "auto", "tags" or "degree".
  config.normalize_features = True  # Planetoid row normalisation.
  config.sparse_input = True  # Multiply sparse features as COO when it pays.
  if dataset.lower() == "csbm":
    # The generated graph (lorap_jax.make_csbm's arguments).
    config.csbm = ml_collections.ConfigDict()
    config.csbm.num_nodes = 10_000
    config.csbm.num_classes = 4
    config.csbm.num_features = 32
    config.csbm.average_degree = 10.0
    config.csbm.homophily = 0.8
    config.csbm.signal = 1.0
    config.csbm.train_fraction = 0.1
    config.csbm.val_fraction = 0.1
    config.csbm.test_fraction = 0.8
    config.csbm.seed = 0

  # --- Runs ---------------------------------------------------------------
  config.seeds = 10 if node_task else 1
  config.folds = 10  # Graph tasks: how many of the 10 CV folds to run.
  # Graph tasks: the first fold run (0-based), so that a long protocol can
  # be split over machines or sessions: folds first_fold .. + folds - 1.
  config.first_fold = 0
  config.vmap_seeds = False  # Node tasks: train all seeds in one program.
  # Graph tasks: devices each batch is split over (data parallel); 0: all
  # that JAX sees, n: the first n. Node tasks train on the first device.
  config.devices = 0

  # --- Model --------------------------------------------------------------
  config.model = ml_collections.ConfigDict()
  config.model.architecture = "gcn" if node_task else "gin"
  config.model.hidden = 64
  config.model.num_layers = 2 if node_task else 5
  config.model.dropout = 0.5 if node_task else 0.0
  config.model.readout_dropout = 0.5
  config.model.heads = 8
  config.model.attention_dropout = 0.6
  config.model.batch_norm = not node_task
  config.model.readout = "mean"

  # --- Quantization -------------------------------------------------------
  config.quant = ml_collections.ConfigDict()
  config.quant.framework = "qat"  # One of FRAMEWORKS.
  config.quant.bits = 4
  # Plain QAT's and Degree-Quant's points; A2Q and MixQ set their own.
  config.quant.points = "input,weight,xw,message,aggregate,output"
  config.quant.calibration = "ema"  # "ema", "running" or "percentile".
  # Degree-Quant's EMA momentum 0.01 assumes many mini-batch steps per
  # epoch; a full-batch node task takes one, so its ranges would lag for
  # most of training. 0.1 there; 0.01 (the reference) for graph tasks.
  config.quant.momentum = 0.1 if node_task else 0.01
  config.quant.percentile = 0.01
  config.quant.rounding = "half_even"
  # STE: "identity" (Degree-Quant's STE), "clipped" (PyTorch's
  # fake_quantize) or "clipped_inner" (Degree-Quant's GC, which stops the
  # boundary codes too). With the identity, clipped outputs keep pushing
  # their parameters; on Cora INT4 that costs ~15 points (README), so node
  # tasks default to "clipped".
  config.quant.gradient = "clipped" if node_task else "identity"

  # Degree-Quant (framework "dq"): its own bundle, as in its reference runs
  # (GC-PER): percentile ranges (a running min/max of per-batch
  # percentiles), its clipped STE ("clipped_inner"), and protective
  # masking with probability low + change * CDF(in-degree). The
  # quant.calibration / gradient fields above do not apply to it.
  config.dq = ml_collections.ConfigDict()
  config.dq.low = config_dict.placeholder(float)  # INT4: 0.1; INT8+: 0.0.
  config.dq.change = 0.1
  config.dq.percentile = config_dict.placeholder(float)  # INT4 .01, else .001
  config.dq.per_layer_mask = False  # One mask per forward pass by default.
  # Percentiles of at most this many elements per tensor (a fixed random
  # subset, like the reference's --sample_prop); 0: exact over all.
  config.dq.sample_size = 8192

  # A2Q (framework "a2q"): learned step and bit width per output channel
  # (weights, XW) and per node (features; a nearest-neighbour pool in graph
  # tasks). Node tasks: points, learning rates and lambda of the
  # reference's Cora GCN run (`frameworks.md` 3.6). Graph tasks: those of
  # its GIN script (`lr_gin_reddit_binary.py`), whose QLinear quantizes its
  # input and weight and not the product XW; with an XW point the 4-bit
  # products, on steps of about 0.01, clip and IMDB-BINARY's loss stays
  # at ln 2. The reference's memory target, 5 KB at hidden 16 on Cora,
  # is an average of ~0.95 bits, where round(b) = 1 quantizes every feature
  # to zero; here the target is an average width (the INT4 budget), or
  # memory_target_kb when set above 0.
  config.a2q = ml_collections.ConfigDict()
  config.a2q.points = "input,weight,xw" if node_task else "input,weight"
  config.a2q.gradient = "clipped"
  config.a2q.quantize_first_input = False
  config.a2q.pool_size = 1000
  config.a2q.local_gradient = True
  config.a2q.memory_weight = 2.5 if node_task else 1e-3  # --a_loss
  config.a2q.memory_target_kb = 0.0  # --a_storage; 0: use the average.
  config.a2q.target_average_bits = 4.0
  config.a2q.lr_step_weight = 0.02
  config.a2q.lr_step_xw = 0.008 if node_task else 0.01
  config.a2q.lr_step_feature = 0.04 if node_task else 0.02
  config.a2q.lr_bits_feature = 0.1 if node_task else 0.008

  # MixQ (framework "mixq"): softmax-relaxed mixture over candidate widths
  # per component with learned scales and zero points, lambda * expected
  # memory, argmax selection, then the fixed widths trained again. Node
  # tasks: the reference's three stages (search, FP32, quantized fine-tune
  # from the best FP32 weights at finetune_lr without weight decay); graph
  # tasks: search for train.epochs, then QAT from scratch as long.
  config.mixq = ml_collections.ConfigDict()
  config.mixq.candidates = "2,4,8"
  # lambda. The reference divides its penalty by 8192 twice; this divides
  # once, so its lambda = 0.1 (Cora: ~5.9 bits) is 0.1 / 8192 here.
  config.mixq.memory_weight = 0.1 / 8192
  config.mixq.granularity = "column"
  config.mixq.points = "input,weight,xw,aggregate"
  config.mixq.search_epochs = 50
  config.mixq.fp32_epochs = 50
  config.mixq.finetune_epochs = 50
  config.mixq.finetune_lr = 1e-3
  # The fixed stage's widths, "component=bits,..."; empty: search first.
  config.mixq.selected = ""

  # --- Prompts ------------------------------------------------------------
  config.prompt = ml_collections.ConfigDict()
  config.prompt.kind = "lorap"  # none, gpf, gpf-plus, lorap, gpf-lorap.
  config.prompt.num_prompts = 10  # k
  config.prompt.rank = 4  # r
  config.prompt.init = "lora"  # "lora" (no-op start) or "glorot".
  # LoRAP after each aggregation ("post", the paper) or on each layer's
  # input before aggregation ("pre", for comparison).
  config.prompt.position = "post"
  # Prompts move in Adam steps of ~lr whatever the activation scale; at the
  # backbone's 0.01 they outgrow INT4 aggregates (~0.05) within a few
  # steps and saturate the re-quantizer, the known failure (lorap.md, 2).
  config.prompt.learning_rate = 1e-3
  config.prompt.weight_decay = 0.0
  config.prompt.implementation = config_dict.placeholder(str)

  # --- Checkpoints (orbax, under <workdir>/checkpoints) --------------------
  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.enabled = True
  config.checkpoint.every = 10  # Epochs between periodic checkpoints.
  config.checkpoint.keep = 3  # Periodic checkpoints kept per run.
  # Saves cost seconds (orbax writes each array apart): at most one a
  # minute, which a killed run repeats on resume.
  config.checkpoint.min_interval_s = 60.0

  # --- Optimisation -------------------------------------------------------
  config.train = ml_collections.ConfigDict()
  config.train.epochs = 200
  config.train.learning_rate = 0.01
  config.train.weight_decay = 5e-4 if node_task else 0.0
  # Graph tasks: graphs per batch; neighbour-sampled node tasks: seed
  # nodes per batch.
  config.train.batch_size = 128
  # Graph tasks: each batch is padded to the smallest of a ladder of sizes
  # growing by this factor (`data.make_budgets`); 0: three coarse sizes.
  # Padding changes no result beyond the random streams' shapes; on
  # REDDIT-BINARY 1.1 pads 7% where the three sizes padded 52%. Each size
  # used compiles once, so runs of a few epochs are faster with 0.
  config.train.padding_growth = 1.1
  # Node tasks: "full" (the whole graph every step) or "neighbor"
  # (GraphSAGE-style mini-batches of sampled neighbourhoods, for graphs
  # whose full-batch activations do not fit; data/sampling.py), with
  # `fanouts[l]` in-neighbours per node at hop l + 1, one per layer.
  config.train.sampler = "full"
  config.train.fanouts = (10, 10)
  config.train.lr_decay_every = 0 if node_task else 50  # Epochs; 0: none.
  config.train.lr_decay_factor = 0.5
  # Model selection: "val_acc" (best validation accuracy, the earliest
  # epoch on ties), "val_loss" (lowest validation loss, Degree-Quant) or
  # "val_mae" (lowest validation MAE, regression tasks).
  config.train.selection = "val_acc" if node_task else "val_loss"
  # Regression tasks (AqSol): "l1" (MAE, as benchmarking-gnns trains it) or
  # "mse", in the targets' own units.
  config.train.regression_loss = "l1"
  # Regression: predict mean + std * output (the training targets' mean and
  # std), so training starts at the mean predictor; MAE stays in the
  # targets' units. False: the raw output, as benchmarking-gnns.
  config.train.standardize_targets = True
  # What the optimizer updates: "all" parameters, or "prompts" only (the
  # backbone, learned quantizer parameters included, stays at its initial
  # or loaded values; range statistics and BatchNorm averages still move).
  config.train.trainable = "all"
  # Whether training steps move the quantizer ranges (EMA, running or
  # percentile) and BatchNorm averages. `lorap post-train` turns it off:
  # the trained model's ranges are part of what it loads.
  config.train.update_statistics = True
  # `lorap post-train`: how many labelled training nodes (graphs) of each
  # seed's training split the prompts are trained on, drawn per seed.
  config.train.calibration_size = 35

  for path, value in DATASET_DEFAULTS.get(dataset.lower(), {}).items():
    set_field(config, path, value)
  return config
