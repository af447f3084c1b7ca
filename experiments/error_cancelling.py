"""Can LoRAP cancel the aggregation error when asked to, and does it help?

Usage (from the repository root, data directory in LORAP_DATA_DIR):
  .venv/bin/python experiments/error_cancelling.py            # 10 seeds
  .venv/bin/python experiments/error_cancelling.py --quick    # 2 seeds, 40 ep.

`experiments/plots.py` finds that an INT4 GCN's first-layer aggregation
error is low-rank and largely predictable from the aggregate (the form
LoRAP can express), yet LoRAP trained for the loss leaves it in place. This
asks the prompt to cancel it directly. Protocol, per seed:

1. The INT4 plain-QAT Cora GCN without a prompt, trained as `plots.py`
   trains its mechanism models (200 epochs, best-validation state).
2. LoRAP (k = 10, r = 4, the default config's) is added after every
   aggregation, and only its parameters train, backbone and quantizer
   ranges frozen: Adam (`--learning-rate`) for `--steps` full-graph steps
   on the sum over layers of ||S_q - S_fp||^2 / ||S_fp||^2
   (`plots.traced_aggregate_pairs`; all nodes, no labels), in evaluation
   mode, keeping the prompts of the step with the lowest loss.
3. Each layer's relative error ||S_q - S_fp||^2 / ||S_fp||^2, and the
   validation and test accuracy, before and after.

`--joint 0,1 --prompt-lr 1e-3,1e-2` asks instead whether LoRAP does
better trained with the backbone as usual (`plots.train_selected`, 200
epochs, best validation), with weight x the same error term in its loss
(`joint_step_factory`: the term's gradient reaches the prompts only; the
backbone trains for the task alone). Per weight, prompt learning rate and
seed: the selected state's relative errors and accuracies.

The rows (one per seed) go to `--out` (default
`experiments/results/plots/error_cancelling.csv`, with `--joint`
`error_joint.csv`); a table of means and sample stds is printed.
"""

import argparse
import functools
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorap_jax

sys.path.insert(0, os.fspath(pathlib.Path(__file__).resolve().parent))
import plots


def relative_errors(model, variables, graph, bits) -> jax.Array:
  """||S_q - S_fp||^2 / ||S_fp||^2 per layer, [layers] (differentiable)."""
  return jnp.stack(
    [
      jnp.sum((quantized - reference) ** 2) / jnp.sum(reference**2)
      for quantized, reference in plots.traced_aggregate_pairs(
        model, variables, graph, bits
      )
    ]
  )


def with_prompts(model, trained_variables, graph, bits, key):
  """`model` (with prompts) holding `trained_variables` (without): the
  trained backbone and ranges, the prompts created from `key`
  (`create_train_state`'s `start_from`; its optimizer is not used)."""
  return lorap_jax.create_train_state(
    model, optax.set_to_zero(), graph, key, bits, start_from=trained_variables
  ).variables()


def fit_prompts(model, variables, graph, bits, *, steps, learning_rate):
  """Trains only the prompt parameters of `variables` to cancel the
  aggregation error.

  The straight-through gradients of quantized aggregates make the loss
  jump from step to step (on small graphs a run can end above where it
  started), so the prompts of the step with the lowest loss are kept: the
  objective itself, on the same nodes, uses no labels.

  Returns:
    The variables with those prompts, and the loss before every step and
    after the last ([steps + 1]).
  """
  groups = jax.tree.map(
    lambda group: "prompt" if group == "prompt" else "frozen",
    lorap_jax.parameter_groups(variables["params"]),
  )
  tx = optax.multi_transform(
    {"prompt": optax.adam(learning_rate), "frozen": optax.set_to_zero()},
    groups,
  )

  def loss(params):
    return jnp.sum(
      relative_errors(model, {**variables, "params": params}, graph, bits)
    )

  @jax.jit
  def step(params, opt_state):
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  params, opt_state = variables["params"], tx.init(variables["params"])
  losses, best = [], (np.inf, params)
  for _ in range(steps):
    new_params, opt_state, value = step(params, opt_state)
    losses.append(float(value))  # The loss of `params`, before the step.
    best = min(best, (losses[-1], params), key=lambda pair: pair[0])
    params = new_params
  losses.append(float(jax.jit(loss)(params)))
  best = min(best, (losses[-1], params), key=lambda pair: pair[0])
  return {**variables, "params": best[1]}, losses


def joint_step_factory(weight: float):
  """`plots.train_selected`'s `make_step`: `lorap_jax.train_step` for plain
  QAT (no framework penalty, no Degree-Quant masks, ranges always
  updated), with `weight` x the sum of the layers' relative aggregation
  errors added to the loss (measured in evaluation mode, at the step's
  ranges); the term's gradient reaches the prompts only.
  """

  def make_step(model):
    @jax.jit
    def step(state, batch, rng):
      def loss_fn(params):
        variables = {**state.variables(), "params": params}
        logits, updates = state.apply_fn(
          variables,
          batch.graph,
          bits=state.bits,
          train=True,
          rngs={"dropout": rng},
          mutable=[lorap_jax.QUANT_STATS],
        )
        task = lorap_jax.cross_entropy_loss(
          logits=logits, labels=batch.labels, mask=batch.mask
        )
        # The error term moves the prompts only: the backbone trains for
        # the task alone, as with plain LoRAP.
        prompt_only = jax.tree.map(
          lambda p, group: p if group == "prompt" else jax.lax.stop_gradient(p),
          params,
          lorap_jax.parameter_groups(params),
        )
        error = jnp.sum(
          relative_errors(
            model, {**variables, "params": prompt_only}, batch.graph, state.bits
          )
        )
        return task + weight * error, (task, error, updates)

      grads, (task, error, updates) = jax.grad(loss_fn, has_aux=True)(
        state.params
      )
      state = state.apply_gradients(grads).replace(
        quant_stats=updates[lorap_jax.QUANT_STATS]
      )
      return state, {"loss": task, "error": error}

    return step

  return make_step


def accuracies(model, variables, graph, bits, labels, masks) -> dict:
  logits = model.apply(variables, graph, bits=bits, train=False)
  right = np.asarray(jnp.argmax(logits, -1)) == np.asarray(labels)
  return {
    split: float(right[np.asarray(m)].mean()) for split, m in masks.items()
  }


def cancel_one_seed(dataset, protocol, seed: int, steps: int, learning_rate):
  config = plots.make_config(
    protocol, **{"quant.bits": 4, "prompt.kind": "none"}
  )
  _, state, graph = plots.train_selected(config, dataset, seed)
  bits = state.bits
  prompted_config = plots.make_config(
    protocol, **{"quant.bits": 4, "prompt.kind": "lorap"}
  )
  prompted = lorap_jax.create_model(
    prompted_config, num_classes=dataset.num_classes, task="node"
  )
  prompt_key = jax.random.fold_in(jax.random.key(seed), 1)
  variables = with_prompts(prompted, state.variables(), graph, bits, prompt_key)
  masks = {"val": dataset.val_mask, "test": dataset.test_mask}
  before = relative_errors(prompted, variables, graph, bits)
  accuracy_before = accuracies(
    prompted, variables, graph, bits, dataset.labels, masks
  )
  fitted, _ = fit_prompts(
    prompted, variables, graph, bits, steps=steps, learning_rate=learning_rate
  )
  after = relative_errors(prompted, fitted, graph, bits)
  accuracy_after = accuracies(
    prompted, fitted, graph, bits, dataset.labels, masks
  )
  return {
    "seed": seed,
    "steps": steps,
    **{
      f"layer_{i + 1}_{when}": float(values[i])
      for when, values in (("before", before), ("after", after))
      for i in range(len(before))
    },
    **{
      f"{split}_acc_{when}": accs[split]
      for when, accs in (("before", accuracy_before), ("after", accuracy_after))
      for split in ("val", "test")
    },
  }


def joint_one_seed(dataset, protocol, seed: int, weight: float, prompt_lr):
  """LoRAP trained with the backbone, `weight` x the error term in the
  prompts' loss (`joint_step_factory`); the best-validation state's
  relative errors and accuracies."""
  config = plots.make_config(
    protocol,
    **{
      "quant.bits": 4,
      "prompt.kind": "lorap",
      "prompt.learning_rate": prompt_lr,
    },
  )
  model, state, graph = plots.train_selected(
    config, dataset, seed, make_step=joint_step_factory(weight)
  )
  variables = state.variables()
  errors = relative_errors(model, variables, graph, state.bits)
  masks = {"val": dataset.val_mask, "test": dataset.test_mask}
  accs = accuracies(model, variables, graph, state.bits, dataset.labels, masks)
  return {
    "weight": weight,
    "prompt_lr": prompt_lr,
    "seed": seed,
    **{f"layer_{i + 1}": float(e) for i, e in enumerate(errors)},
    **{f"{split}_acc": accs[split] for split in ("val", "test")},
  }


def _floats(text: str) -> list[float]:
  return [float(value) for value in text.split(",")]


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="2 seeds, 40 epochs")
  parser.add_argument("--seeds", type=int)
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--learning-rate", type=float, default=3e-2)
  parser.add_argument(
    "--joint",
    type=_floats,
    help="instead: train LoRAP with the backbone, these weights of the "
    "error term in the prompts' loss (e.g. 0,1)",
  )
  parser.add_argument(
    "--prompt-lr", type=_floats, default=[1e-3], help="with --joint"
  )
  parser.add_argument("--out", type=pathlib.Path)
  args = parser.parse_args(argv)
  protocol = plots.QUICK if args.quick else plots.FULL
  seeds = args.seeds or protocol.seeds
  here = pathlib.Path(__file__).resolve().parent
  name = "error_joint.csv" if args.joint else "error_cancelling.csv"
  out = args.out or (
    here / "results" / ("plots-quick" if args.quick else "plots") / name
  )
  out.parent.mkdir(parents=True, exist_ok=True)
  dataset = lorap_jax.load_dataset("cora", os.environ.get("LORAP_DATA_DIR"))
  if args.joint:
    runs = [
      functools.partial(joint_one_seed, dataset, protocol, s, w, lr)
      for w in args.joint
      for lr in args.prompt_lr
      for s in range(seeds)
    ]
  else:
    runs = [
      functools.partial(
        cancel_one_seed, dataset, protocol, s, args.steps, args.learning_rate
      )
      for s in range(seeds)
    ]
  rows = []
  for run in runs:
    rows.append(run())
    plots.write_csv(out, rows)
    print(f"  {rows[-1]}", flush=True)
  print(f"\nmean ± std over seeds (written to {out}):")
  groups = {}
  for row in rows:
    groups.setdefault((row.get("weight"), row.get("prompt_lr")), []).append(row)
  for (weight, prompt_lr), group in groups.items():
    if weight is not None:
      print(f" weight {weight}, prompt lr {prompt_lr}:")
    for field in group[0]:
      if field not in ("seed", "steps", "weight", "prompt_lr"):
        mean, std = lorap_jax.mean_and_std([r[field] for r in group])
        print(f"  {field:16s} {mean:.4f} ± {std:.4f}")


if __name__ == "__main__":
  sys.exit(main())
