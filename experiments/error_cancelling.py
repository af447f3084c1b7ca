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

The rows (one per seed) go to `--out` (default
`experiments/results/plots/error_cancelling.csv`); a table of means and
sample stds is printed.
"""

import argparse
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

FIELDS = (
  "seed",
  "steps",
  "layer_1_before",
  "layer_1_after",
  "layer_2_before",
  "layer_2_after",
  "val_acc_before",
  "val_acc_after",
  "test_acc_before",
  "test_acc_after",
)


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
  trained backbone and ranges, the prompts freshly initialised from `key`."""
  fresh = model.init(key, graph, bits=bits)

  def overwrite(tree, trained):
    if not isinstance(trained, dict):
      return trained
    return {**tree, **{k: overwrite(tree[k], v) for k, v in trained.items()}}

  return {
    name: overwrite(dict(fresh[name]), dict(trained_variables[name]))
    if name in trained_variables
    else fresh[name]
    for name in fresh
  }


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


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="2 seeds, 40 epochs")
  parser.add_argument("--seeds", type=int)
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--learning-rate", type=float, default=3e-2)
  parser.add_argument("--out", type=pathlib.Path)
  args = parser.parse_args(argv)
  protocol = plots.QUICK if args.quick else plots.FULL
  seeds = args.seeds or protocol.seeds
  here = pathlib.Path(__file__).resolve().parent
  out = (
    args.out
    or here
    / "results"
    / ("plots-quick" if args.quick else "plots")
    / "error_cancelling.csv"
  )
  out.parent.mkdir(parents=True, exist_ok=True)
  dataset = lorap_jax.load_dataset("cora", os.environ.get("LORAP_DATA_DIR"))
  rows = []
  for seed in range(seeds):
    rows.append(
      cancel_one_seed(dataset, protocol, seed, args.steps, args.learning_rate)
    )
    plots.write_csv(out, rows)
    print(f"  seed {seed}: {rows[-1]}", flush=True)
  print(f"\n{len(rows)} seeds, mean ± std (written to {out}):")
  for field in FIELDS[2:]:
    mean, std = lorap_jax.mean_and_std([r[field] for r in rows])
    print(f"  {field:16s} {mean:.4f} ± {std:.4f}")


if __name__ == "__main__":
  sys.exit(main())
