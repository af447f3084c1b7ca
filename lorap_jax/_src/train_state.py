"""The training state and what builds it from a config.

`TrainState` holds everything a step changes. `quant_config`,
`prompt_config` and `create_model` turn a config into its model,
`create_optimizer` into its optimizer (learning rates and weight decays
injected as arrays, so a sweep can vmap them), and `initial_train_state`
into the initialised state.
"""

import functools
import json
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import flax.traverse_util
import jax
import jax.numpy as jnp
import jraph
import ml_collections
import optax

from lorap_jax._src import (
  a2q,
  degree_quant,
  mixq,
  models,
  prompts,
  threefry_cpu,
)
from lorap_jax._src import config as config_lib
from lorap_jax._src import data as data_lib
from lorap_jax._src import quant_points as qp
from lorap_jax._src import quantization as q

# Dropout draws random bits every step: same bits, ~0.3 ms less per Cora
# epoch on CPU (see threefry_cpu.py).
threefry_cpu.use_unrolled_threefry_on_cpu()

# The collections a training step updates beside the parameters.
MUTABLE = (
  qp.QUANT_STATS,
  "batch_stats",
  a2q.FEATURE_MEMORY,
  mixq.EXPECTED_MEMORY,
)


# Training losses: classification, then the regression losses.
LOSSES = ("cross_entropy", "l1", "mse")
REGRESSION_LOSSES = ("l1", "mse")


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training, as one pytree.

  The bit width lives here as an array, so a sweep can vmap over it like
  over the learning rate (which `optax.inject_hyperparams` keeps in
  `opt_state`).
  """

  step: jax.Array
  params: Any
  quant_stats: Any
  batch_stats: Any
  opt_state: optax.OptState
  bits: jax.Array
  apply_fn: Callable = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  # The model's quantization, for framework penalties in the loss.
  quant: qp.QuantConfig = flax.struct.field(pytree_node=False, default=qp.FP32)
  # The training loss, one of LOSSES: classification or regression.
  loss: str = flax.struct.field(pytree_node=False, default="cross_entropy")
  # Regression: [shift, scale]; the prediction is shift + scale * output,
  # so a network with outputs near 0 starts at the training mean. None:
  # the output itself.
  target_affine: jax.Array | None = None
  # False: training steps keep the quantizer ranges and BatchNorm averages
  # as they are (post-training a calibrated model).
  update_statistics: bool = flax.struct.field(pytree_node=False, default=True)

  def variables(self) -> dict:
    return {
      "params": self.params,
      qp.QUANT_STATS: self.quant_stats,
      "batch_stats": self.batch_stats,
    }

  def apply_gradients(self, grads) -> "TrainState":
    """One optimizer step from `grads`: parameters, optimizer state and
    step count; statistics are left to the caller."""
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    return self.replace(
      step=self.step + 1,
      params=optax.apply_updates(self.params, updates),
      opt_state=opt_state,
    )


# ---------------------------------------------------------------------------
# From config to objects.
# ---------------------------------------------------------------------------


def quant_config(config: ml_collections.ConfigDict) -> qp.QuantConfig:
  """The `QuantConfig` of a run; refuses unknown frameworks and bad bits."""
  framework = config.quant.framework
  q.check_choice("framework", framework, config_lib.FRAMEWORKS)
  if framework == "fp32":
    return qp.FP32
  q.check_bits(config.quant.bits)
  points = _parse_points(config.quant.points)
  _refuse_fields_it_does_not_read(config, points)
  if framework == "dq":
    return _degree_quant_config(config, points)
  if framework == "a2q":
    return _a2q_config(config)
  if framework == "mixq":
    return _mixq_config(config)
  return qp.QuantConfig(
    points=points,
    calibration=q.CalibrationConfig(
      mode=config.quant.calibration,
      momentum=config.quant.momentum,
      percentile=config.quant.percentile,
    ),
    rounding=config.quant.rounding,
    gradient=config.quant.gradient,
  )


# The `quant` fields a framework does not read (plain QAT reads them all),
# and what it uses instead.
_UNREAD_QUANT_FIELDS = {
  "dq": (
    ("calibration", "momentum", "percentile", "gradient"),
    "percentile ranges at dq.percentile and its clipped_inner STE",
  ),
  "a2q": (
    ("calibration", "momentum", "percentile", "rounding", "gradient"),
    "learned steps and widths; its STE is a2q.gradient",
  ),
  "mixq": (
    ("calibration", "momentum", "percentile", "rounding", "gradient"),
    "learned scales and zero points",
  ),
}


def _refuse_fields_it_does_not_read(config, points) -> None:
  """A changed setting that the framework ignores would mislead; refuse it."""
  framework = config.quant.framework
  if framework in ("a2q", "mixq") and set(points) != set(qp.POINT_NAMES):
    # Each has its own points field.
    raise ValueError(
      f"quant.points={config.quant.points!r} does not apply to framework "
      f"{framework!r}: set {framework}.points (now "
      f"{config[framework].points!r})"
    )
  if framework not in _UNREAD_QUANT_FIELDS:
    return
  fields, instead = _UNREAD_QUANT_FIELDS[framework]
  defaults = config_lib.get_config(config.dataset).quant
  changed = [
    f"quant.{name}={config.quant[name]!r}"
    for name in fields
    if config.quant[name] != defaults[name]
  ]
  if changed:
    raise ValueError(
      f"{', '.join(changed)} does not apply to framework {framework!r}, "
      f"which uses {instead}"
    )


def _parse_points(text: str) -> tuple[str, ...]:
  """The names in a comma list, blanks dropped; QuantConfig checks them."""
  return tuple(name for name in (p.strip() for p in text.split(",")) if name)


def _a2q_config(config) -> qp.QuantConfig:
  """A2Q's quantizer at its own points (per channel / per node or pool)."""
  settings = config.a2q
  points = _parse_points(settings.points)
  transductive = data_lib.is_node_dataset(config.dataset)
  return qp.QuantConfig(
    points=points,
    gradient=settings.gradient,
    a2q=a2q.A2QConfig(
      transductive=transductive,
      **({} if transductive else a2q.GRAPH_TASK_SETTINGS),
      quantize_first_input=settings.quantize_first_input,
      pool_size=settings.pool_size,
      local_gradient=settings.local_gradient,
      memory_weight=settings.memory_weight,
      memory_target_kb=settings.memory_target_kb or None,
      target_average_bits=settings.target_average_bits,
    ),
  )


def _mixq_config(config) -> qp.QuantConfig:
  settings = config.mixq
  try:
    candidates = tuple(int(b) for b in settings.candidates.split(","))
    selected = None
    if settings.selected:
      pairs = (item.rsplit("=", 1) for item in settings.selected.split(","))
      selected = tuple((name, int(bits)) for name, bits in pairs)
  except ValueError as error:
    raise ValueError(
      f"mixq.candidates={settings.candidates!r} and mixq.selected="
      f"{settings.selected!r} must be 'b1,b2,...' and 'component=bits,...'"
    ) from error
  return qp.QuantConfig(
    points=_parse_points(settings.points),
    gradient="clipped",
    mixq=mixq.MixQConfig(
      candidates=candidates,
      memory_weight=settings.memory_weight,
      granularity=settings.granularity,
      selected=selected,
    ),
  )


def _degree_quant_config(config, points) -> qp.QuantConfig:
  """Degree-Quant's GC-PER bundle; defaults by bit width as its runs."""
  low_bits = config.quant.bits <= 4
  dq = config.dq
  low = dq.low if dq.low is not None else (0.1 if low_bits else 0.0)
  percentile = dq.percentile
  if percentile is None:
    percentile = 0.01 if low_bits else 0.001
  return qp.QuantConfig(
    points=points,
    calibration=q.CalibrationConfig(
      mode="percentile",
      percentile=percentile,
      sample_size=dq.sample_size or None,
    ),
    rounding=config.quant.rounding,
    # GC as the reference codes it: the boundary codes pass no gradient
    # either (PyTorch's fake_quantize, "clipped", keeps them).
    gradient="clipped_inner",
    protection=degree_quant.DegreeProtection(
      p_min=low,
      p_max=min(1.0, low + dq.change),
      per_layer=dq.per_layer_mask,
    ),
  )


def prompt_config(config: ml_collections.ConfigDict) -> prompts.PromptConfig:
  return prompts.PromptConfig(
    kind=config.prompt.kind,
    num_prompts=config.prompt.num_prompts,
    rank=config.prompt.rank,
    init=config.prompt.init,
    position=config.prompt.get("position", "post"),
    implementation=config.prompt.implementation,
  )


def create_model(
  config: ml_collections.ConfigDict, *, num_classes: int, task: str
) -> models.GNN:
  """Builds the GNN of a config.

  Raises:
    ValueError: on unknown architecture, framework or prompt names, bits
      outside 1..16, or ranks / prompt counts below 1.
  """
  return _model(
    model_config(config, num_classes=num_classes, task=task),
    quant_config(config),
    prompt_config(config),
  )


def model_config(
  config: ml_collections.ConfigDict, *, num_classes: int, task: str
) -> models.ModelConfig:
  """The `ModelConfig` of a run; refuses bad widths, rates and names."""
  return models.ModelConfig(
    architecture=config.model.architecture,
    task=task,
    num_classes=num_classes,
    hidden=config.model.hidden,
    num_layers=config.model.num_layers,
    dropout=config.model.dropout,
    readout_dropout=config.model.readout_dropout,
    heads=config.model.heads,
    attention_dropout=config.model.attention_dropout,
    batch_norm=config.model.batch_norm,
    readout=config.model.readout,
  )


@functools.cache
def _model(model_config, quant, prompt) -> models.GNN:
  # One object per distinct model. TrainState keeps `model.apply`, a bound
  # method, and bound methods compare by their object's identity: equal
  # models built twice (MixQ's stages in every fold, a second call of
  # train_and_evaluate) would otherwise recompile every step.
  return models.GNN(model=model_config, quant=quant, prompt=prompt)


# Optimizer groups of A2Q's quantizer parameters, by leaf name. The
# reference never hands weight and XW bit widths to its optimizer: they stay
# at their initial value ("a2q_frozen").
A2Q_GROUPS = {
  "a2q_weight_step": "a2q_step_weight",
  "a2q_xw_step": "a2q_step_xw",
  "a2q_weight_bits": "a2q_frozen",
  "a2q_xw_bits": "a2q_frozen",
}


def parameter_groups(params) -> Any:
  """Labels every parameter with its optimizer group.

  "prompt" (GPF / LoRAP modules), "backbone", or an A2Q quantizer group:
  "a2q_step_weight", "a2q_step_xw", "a2q_step_feature", "a2q_bits_feature"
  or "a2q_frozen".
  """

  def label(path, _):
    names = [str(getattr(k, "key", k)) for k in path]
    leaf = names[-1]
    if leaf.startswith("a2q_"):
      default = "a2q_bits_feature" if leaf.endswith("_bits") else None
      return A2Q_GROUPS.get(leaf, default or "a2q_step_feature")
    is_prompt = any(n.startswith(prompts.PROMPT_MODULE_PREFIXES) for n in names)
    return "prompt" if is_prompt else "backbone"

  return jax.tree_util.tree_map_with_path(label, params)


def _adam_with_l2(
  learning_rate, weight_decay, decay_every_steps=0, decay_factor=1.0
):
  # PyTorch's Adam(weight_decay=...) adds the L2 term to the gradient before
  # the moment estimates (coupled, unlike AdamW); the anchors all use it.
  if decay_every_steps:
    # The step decay is built here, from the injected rate, rather than
    # being the injected value: the rate then stays a number in the state,
    # which can change or be vmapped without a new optimizer.
    learning_rate = optax.exponential_decay(
      learning_rate,
      transition_steps=decay_every_steps,
      decay_rate=decay_factor,
      staircase=True,
    )
  return optax.chain(
    optax.add_decayed_weights(weight_decay),
    optax.scale_by_adam(),
    optax.scale_by_learning_rate(learning_rate),
  )


def create_optimizer(
  config: ml_collections.ConfigDict, *, steps_per_epoch: int = 1
) -> optax.GradientTransformation:
  """Adam (L2-coupled) with a separate learning rate for prompt parameters.

  Learning rates and weight decays are injected hyper-parameters (they can
  change, or be vmapped in sweeps, without a new optimizer); a step decay
  (`lr_decay_every` epochs of `steps_per_epoch` steps) applies to every
  group.
  """
  train = config.train
  adam = optax.inject_hyperparams(
    _adam_with_l2, static_args=("decay_every_steps", "decay_factor")
  )
  transforms = {
    group: adam(
      **values,
      decay_every_steps=train.lr_decay_every * steps_per_epoch,
      decay_factor=train.lr_decay_factor,
    )
    for group, values in injected_hyperparameters(config).items()
  }
  # A2Q's weight and XW bit widths stay at their initial value (A2Q_GROUPS).
  transforms["a2q_frozen"] = optax.set_to_zero()
  return optax.multi_transform(
    _trainable_transforms(transforms, train.trainable), parameter_groups
  )


TRAINABLE = ("all", "prompts")


def _trainable_transforms(transforms: dict, trainable: str) -> dict:
  """`transforms` with every group but "prompt" zeroed when only prompts
  train: the backbone and A2Q's learned quantizer parameters then get
  zero updates (and keep no optimizer moments)."""
  q.check_choice("train.trainable", trainable, TRAINABLE)
  if trainable == "all":
    return transforms
  return {
    group: transform if group == "prompt" else optax.set_to_zero()
    for group, transform in transforms.items()
  }


# A2Q's learned quantizer parameters: their own learning rates, no weight
# decay (the reference's groups).
A2Q_QUANTIZER_GROUPS = (
  "step_weight",
  "step_xw",
  "step_feature",
  "bits_feature",
)


def hyperparameter_paths(config) -> list[tuple[str, str, str, str]]:
  """(group, name, config section, config field) of each injected value the
  config sets; A2Q's groups only where it has A2Q settings."""
  paths = [
    ("backbone", "learning_rate", "train", "learning_rate"),
    ("backbone", "weight_decay", "train", "weight_decay"),
    ("prompt", "learning_rate", "prompt", "learning_rate"),
    ("prompt", "weight_decay", "prompt", "weight_decay"),
  ]
  if config.get("a2q"):
    paths += [
      (f"a2q_{group}", "learning_rate", "a2q", f"lr_{group}")
      for group in A2Q_QUANTIZER_GROUPS
    ]
  return paths


def injected_hyperparameters(config) -> dict[str, dict[str, float]]:
  """The learning rate and weight decay of each optimizer group, from
  `config`: the values `create_optimizer` injects."""
  # A2Q's groups have no weight decay, and no learning rate without A2Q.
  values = {
    f"a2q_{group}": {"learning_rate": 0.0, "weight_decay": 0.0}
    for group in A2Q_QUANTIZER_GROUPS
  }
  for group, name, section, field in hyperparameter_paths(config):
    values.setdefault(group, {})[name] = config[section][field]
  return values


def with_hyperparameters(opt_state, values: Mapping[str, Mapping[str, Any]]):
  """`opt_state` of `create_optimizer` with `values[group][name]` injected.

  `optax.inject_hyperparams` keeps the values as arrays in the state, so
  they can change (or be vmapped) without changing the optimizer. A group
  without them (a frozen group's `set_to_zero`) is left alone.
  """
  inner = dict(opt_state.inner_states)
  for group, settings in values.items():
    masked = inner[group]
    hyperparams = getattr(masked.inner_state, "hyperparams", None)
    if hyperparams is None:
      continue
    hyperparams = dict(hyperparams)
    for name, value in settings.items():
      hyperparams[name] = jnp.asarray(value, hyperparams[name].dtype)
    inner[group] = masked._replace(
      inner_state=masked.inner_state._replace(hyperparams=hyperparams)
    )
  return opt_state._replace(inner_states=inner)


@functools.cache
def _cached_optimizer(config_json: str, steps_per_epoch: int):
  config = ml_collections.ConfigDict(json.loads(config_json))
  return create_optimizer(config, steps_per_epoch=steps_per_epoch)


def _optimizer(config, *, steps_per_epoch: int):
  # The optimizer is a static field of TrainState: one object per optimizer
  # structure keeps jit's cache warm across seeds, folds and calls. Learning
  # rates and weight decays are not part of that structure (they live in
  # the state: `initial_train_state` writes them), so a run at a new
  # learning rate does not recompile its steps; nor, without a step decay,
  # do epochs of another length, which only the decay counts.
  if not config.train.lr_decay_every:
    steps_per_epoch = 1
  config = config.copy_and_resolve_references()
  for _, _, section, field in hyperparameter_paths(config):
    config[section][field] = 0.0
  return _cached_optimizer(config.to_json(), steps_per_epoch)


def initial_train_state(
  config, model, graph, key, *, steps_per_epoch: int = 1, bits=None, **kwargs
) -> TrainState:
  """`create_train_state` with `config`'s optimizer and hyper-parameters.

  `bits` defaults to `config.quant.bits`; `kwargs` go to
  `create_train_state`.
  """
  tx = _optimizer(config, steps_per_epoch=steps_per_epoch)
  state = create_train_state(
    model,
    tx,
    graph,
    key,
    config.quant.bits if bits is None else bits,
    **kwargs,
  )
  return state.replace(
    opt_state=with_hyperparameters(
      state.opt_state, injected_hyperparameters(config)
    )
  )


@functools.partial(jax.jit, static_argnums=(0, 4))
def init_variables(model: models.GNN, rng, graph, bits, train: bool = False):
  # One compiled program rather than hundreds of eager ops, and one per
  # model (modules hash by value): seeds and folds reuse it. In training
  # mode (MixQ's calibration with BatchNorm) dropout draws from `rng` too,
  # and BatchNorm normalises by the batch but, while initialising, leaves
  # its running averages at their start.
  return model.init(
    {"params": rng, "dropout": rng}, graph, bits=bits, train=train
  )


def create_train_state(
  model: models.GNN,
  tx: optax.GradientTransformation,
  graph: jraph.GraphsTuple,
  rng: jax.Array,
  bits,
  *,
  start_from: Mapping[str, Any] | None = None,
  loss: str = "cross_entropy",
  target_affine=None,
  update_statistics: bool = True,
) -> TrainState:
  """Initialises parameters, quantizer ranges and the optimizer state.

  Args:
    model: the model.
    tx: the optimizer.
    graph: an example input (a node task's graph, or a training batch);
      data-dependent initialisers (MixQ's calibration) see it.
    rng: the initialisation key.
    bits: the bit width (array).
    start_from: variables ({"params": ..., "batch_stats": ...}) of a
      trained model to start from, e.g. MixQ's FP32 stage. Parameters it
      lacks (the quantizers') are created on `graph` as computed with its
      weights, i.e. calibrated on the trained model.
    loss: the training loss (`LOSSES`): "cross_entropy" for
      classification, "l1" or "mse" for regression (output column 0).
    target_affine: regression: (shift, scale) of the predictions, e.g. the
      training targets' mean and std; None: the raw output.
    update_statistics: whether training steps update the quantizer ranges
      and BatchNorm averages (`train.update_statistics`).
  """
  q.check_choice("loss", loss, LOSSES)
  bits = jnp.asarray(bits, jnp.float32)
  variables = init_variables(
    model,
    rng,
    graph,
    bits,
    start_from is None and _mixq_calibrates_in_training_mode(model),
  )
  if start_from is not None:
    _, created = model.apply(
      {**variables, **start_from},
      graph,
      bits=bits,
      train=False,
      mutable=["params"],
      rngs={"params": rng},
    )
    variables = {**variables, **start_from, "params": created["params"]}
  params = variables["params"]
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    quant_stats=variables.get(qp.QUANT_STATS, {}),
    batch_stats=variables.get("batch_stats", {}),
    opt_state=tx.init(params),
    bits=bits,
    apply_fn=model.apply,
    tx=tx,
    quant=model.quant,
    loss=loss,
    target_affine=None
    if target_affine is None
    else jnp.asarray(target_affine, jnp.float32),
    update_statistics=update_statistics,
  )


def _mixq_calibrates_in_training_mode(model: models.GNN) -> bool:
  """Whether MixQ calibrates `model` in a training-mode `init`.

  MixQ calibrates once, on its first (training) batch. In evaluation mode
  BatchNorm divides by its initial running averages (the identity): the
  sums of a GIN on dense graphs then grow layer by layer (IMDB-MULTI:
  degrees near 100, five layers), and scales calibrated on them are orders
  of magnitude wider than the batch-normalised activations of training
  (2026-12-06: every IMDB-MULTI run diverged, losses in the thousands).
  Models without BatchNorm keep an evaluation-mode `init`, whose
  calibration differs from a training pass by dropout only.
  """
  return (
    model.quant.mixq is not None
    and model.model.architecture == "gin"
    and model.model.batch_norm
  )
