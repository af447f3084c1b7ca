"""Losses, and the jitted training and evaluation steps."""

from collections.abc import Iterable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jraph
import ml_collections
import numpy as np
import optax

from lorap_jax._src import a2q, mixq
from lorap_jax._src import quant_points as qp
from lorap_jax._src import quantization as q
from lorap_jax._src import train_state as state_lib


class Batch(NamedTuple):
  """One training batch: the graph, labels, and which outputs count."""

  graph: jraph.GraphsTuple
  labels: jax.Array  # int32 [n_outputs]
  mask: jax.Array  # bool [n_outputs]


class EvalBatch(NamedTuple):
  """One evaluation batch with several named masks (e.g. train/val/test)."""

  graph: jraph.GraphsTuple
  labels: jax.Array
  masks: Mapping[str, jax.Array]


def cross_entropy_loss(*, logits, labels, mask) -> jax.Array:
  """Mean softmax cross-entropy over the outputs where `mask` is True."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  weights = mask.astype(losses.dtype)
  return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def regression_loss(*, predictions, targets, mask, kind="l1") -> jax.Array:
  """Mean absolute ("l1") or squared ("mse") error where `mask` is True."""
  q.check_choice("kind", kind, state_lib.REGRESSION_LOSSES)
  errors = _regression_errors(predictions, targets, kind)
  weights = mask.astype(errors.dtype)
  return jnp.sum(errors * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _regression_errors(predictions, targets, kind) -> jax.Array:
  difference = predictions - targets
  return jnp.abs(difference) if kind == "l1" else jnp.square(difference)


def task_loss(config: ml_collections.ConfigDict, task: str) -> str:
  """The training loss of a task: cross-entropy, or the regression loss.

  Raises:
    ValueError: on an unknown `train.regression_loss`, or a selection
      criterion that does not fit the task (val_acc for regression, val_mae
      for classification).
  """
  selection = config.train.selection
  if task == "regression":
    loss = config.train.regression_loss
    q.check_choice("train.regression_loss", loss, state_lib.REGRESSION_LOSSES)
    if selection == "val_acc":
      raise ValueError(
        f"{config.dataset} is a regression task: selection='val_acc' has "
        "no accuracy to select on; use 'val_mae' or 'val_loss'"
      )
    return loss
  if selection == "val_mae":
    raise ValueError(
      f"selection='val_mae' needs a regression task; {config.dataset} is "
      "classification: use 'val_acc' or 'val_loss'"
    )
  return "cross_entropy"


def regression_predictions(outputs, target_affine) -> jax.Array:
  """[n] predictions from [n, 1] outputs: shift + scale * output."""
  if target_affine is None:
    return outputs[:, 0]
  return target_affine[0] + target_affine[1] * outputs[:, 0]


def _loss_and_metric(state, outputs, labels, mask):
  """(loss, {"accuracy" or "mae": ...}) of a batch."""
  kind = state.loss
  weight = jnp.maximum(jnp.sum(mask), 1)
  if kind == "cross_entropy":
    loss = cross_entropy_loss(logits=outputs, labels=labels, mask=mask)
    correct = (jnp.argmax(outputs, -1) == labels) & mask
    return loss, {"accuracy": jnp.sum(correct) / weight}
  predictions = regression_predictions(outputs, state.target_affine)
  loss = regression_loss(
    predictions=predictions, targets=labels, mask=mask, kind=kind
  )
  absolute = jnp.where(mask, jnp.abs(predictions - labels), 0.0)
  return loss, {"mae": jnp.sum(absolute) / weight}


def quantization_penalty(quant: qp.QuantConfig, updates) -> jax.Array:
  """The framework's regulariser from what the forward pass sowed.

  A2Q: lambda * ReLU(M_feat - M_target)^2 on the feature memory (KB).
  MixQ: lambda * the expected memory (KB) of every component.
  """
  if quant.mixq is not None and updates.get(mixq.EXPECTED_MEMORY):
    expected = sum(jax.tree.leaves(updates[mixq.EXPECTED_MEMORY]))
    return mixq.memory_penalty(expected, quant.mixq)
  sown = updates.get(a2q.FEATURE_MEMORY)
  if quant.a2q is None or not sown:
    return jnp.zeros(())
  return a2q.memory_penalty(sum(jax.tree.leaves(sown)), quant.a2q)


@jax.jit
def train_step(state: state_lib.TrainState, batch: Batch, rng: jax.Array):
  """One optimizer step. Returns the new state and {"loss", "accuracy"}
  ({"loss", "mae"} for a regression loss)."""

  def loss_fn(params):
    logits, updates = state.apply_fn(
      {**state.variables(), "params": params},
      batch.graph,
      bits=state.bits,
      train=True,
      rngs={"dropout": rng, "protect": jax.random.fold_in(rng, 1)},
      mutable=state_lib.MUTABLE,
    )
    loss, metric = _loss_and_metric(state, logits, batch.labels, batch.mask)
    loss = loss + quantization_penalty(state.quant, updates)
    return loss, (metric, updates)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, (metric, updates)), grads = grad_fn(state.params)
  new_state = state.apply_gradients(grads)
  if state.update_statistics:
    new_state = new_state.replace(
      quant_stats=updates.get(qp.QUANT_STATS, state.quant_stats),
      batch_stats=updates.get("batch_stats", state.batch_stats),
    )
  return new_state, {"loss": loss, **metric}


@jax.jit
def eval_step(state: state_lib.TrainState, batch: EvalBatch) -> dict:
  """Frozen-range forward pass; per mask: loss sum, count, and the correct
  count (classification) or the absolute-error sum (regression)."""
  logits = state.apply_fn(
    state.variables(), batch.graph, bits=state.bits, train=False
  )
  if state.loss == "cross_entropy":
    losses = optax.softmax_cross_entropy_with_integer_labels(
      logits, batch.labels
    )
    name, values = "correct", jnp.argmax(logits, -1) == batch.labels
  else:
    predictions = regression_predictions(logits, state.target_affine)
    losses = _regression_errors(predictions, batch.labels, state.loss)
    name, values = "abs_error", jnp.abs(predictions - batch.labels)
  return {
    split: {
      "loss_sum": jnp.sum(jnp.where(mask, losses, 0.0)),
      name: jnp.sum(jnp.where(mask, values, 0)),
      "count": jnp.sum(mask),
    }
    for split, mask in batch.masks.items()
  }


def summarize_eval(sums: Iterable[dict]) -> dict[str, dict[str, float]]:
  """Adds per-batch eval sums and turns them into means per split: "loss",
  and "accuracy" (classification) or "mae" (regression)."""
  total: dict[str, dict[str, float]] = {}
  for batch_sums in sums:
    for split, stats in jax.device_get(batch_sums).items():
      running = total.setdefault(split, {})
      for key, value in stats.items():
        running[key] = running.get(key, 0.0) + np.float64(value)
  means = {"loss_sum": "loss", "correct": "accuracy", "abs_error": "mae"}
  return {
    split: {
      mean: float(stats[key] / max(stats["count"], 1))
      for key, mean in means.items()
      if key in stats
    }
    for split, stats in total.items()
  }
