# %% [markdown]
# # INT4 GCN + LoRAP on Cora, step by step
#
# A notebook-style walk through the library's lower-level API: load Cora,
# build a fake-quantized 2-layer GCN with a LoRAP prompt after each
# aggregation, train it with the jitted `train_step`, evaluate with
# `eval_step`, and plot the training curve. Runs as a plain script
# (`python experiments/notebook_example.py`) or as a notebook through
# jupytext (`jupytext --to notebook experiments/notebook_example.py`).
#
# Settings from the environment: `LORAP_DATA_DIR` (the datasets),
# `LORAP_EXAMPLE_EPOCHS` (default 200) and `LORAP_EXAMPLE_PNG` (where the
# curve goes; default `experiments/results/plots/notebook_example.png`).

# %%
import os
import pathlib

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

import lorap_jax

matplotlib.use("Agg")  # Files only; no display needed.
import matplotlib.pyplot as plt

EPOCHS = int(os.environ.get("LORAP_EXAMPLE_EPOCHS", "200"))
try:
  _HERE = pathlib.Path(__file__).resolve().parent
except NameError:  # Inside a notebook kernel.
  _HERE = pathlib.Path("experiments").resolve()
PNG = pathlib.Path(
  os.environ.get(
    "LORAP_EXAMPLE_PNG", _HERE / "results" / "plots" / "notebook_example.png"
  )
)
BITS = 4

# %% [markdown]
# ## Data
# Cora's public split. Its bag-of-words features are over 98% zeros, so the
# first layer takes them in sparse COO form (zero is exact on every affine
# grid, so only the non-zeros need quantizing).

# %%
dataset = lorap_jax.load_dataset("cora", os.environ.get("LORAP_DATA_DIR"))
features = np.asarray(dataset.graph.nodes, np.float32)
graph = jax.device_put(
  dataset.graph._replace(nodes=lorap_jax.SparseFeatures.from_dense(features))
)
labels = jnp.asarray(dataset.labels)
masks = jax.device_put(
  {
    "train": dataset.train_mask,
    "val": dataset.val_mask,
    "test": dataset.test_mask,
  }
)
train_batch = lorap_jax.Batch(graph, labels, masks["train"])
eval_batch = lorap_jax.EvalBatch(graph, labels, masks)
print(
  f"{features.shape[0]} nodes, {features.shape[1]} features, "
  f"{dataset.num_classes} classes, {int(graph.n_edge[0])} directed edges"
)

# %% [markdown]
# ## Model
# Every quantization point (input, weight, XW, message, aggregate, output)
# fake-quantized per tensor on an affine grid with EMA ranges and the
# clipped straight-through estimator; LoRAP with k = 10 basis prompts of
# rank 4 after each aggregation, re-quantized on the aggregate's grid.

# %%
model = lorap_jax.GNN(
  model=lorap_jax.ModelConfig(
    architecture="gcn",
    task="node",
    num_classes=dataset.num_classes,
    hidden=64,
    num_layers=2,
    dropout=0.5,
  ),
  quant=lorap_jax.QuantConfig(
    calibration=lorap_jax.CalibrationConfig(mode="ema", momentum=0.1),
    gradient="clipped",
  ),
  prompt=lorap_jax.PromptConfig(kind="lorap", num_prompts=10, rank=4),
)

# %% [markdown]
# ## Optimizer
# Adam with L2 weight decay for the backbone (lr 0.01) and a smaller
# learning rate for the prompt (1e-3): a prompt at the backbone's rate
# outgrows the INT4 aggregates within a few steps.
# `lorap_jax.parameter_groups` labels every parameter "backbone" or
# "prompt".


# %%
def adam_l2(learning_rate, weight_decay):
  return optax.chain(
    optax.add_decayed_weights(weight_decay),
    optax.adam(learning_rate),
  )


tx = optax.multi_transform(
  {"backbone": adam_l2(0.01, 5e-4), "prompt": adam_l2(1e-3, 0.0)},
  lorap_jax.parameter_groups,
)
init_key, dropout_key = jax.random.split(jax.random.key(0))
state = lorap_jax.create_train_state(model, tx, graph, init_key, BITS)
prompt_params = sum(
  leaf.size
  for name, tree in state.params.items()
  if name.startswith("lorap")
  for leaf in jax.tree.leaves(tree)
)
print(f"LoRAP parameters: {prompt_params}")

# %% [markdown]
# ## Training
# One full-batch step per epoch (`train_step` is jitted once), then an
# evaluation with frozen ranges; the test accuracy is read at the epoch of
# best validation accuracy.

# %%
history = {"loss": [], "train": [], "val": [], "test": []}
best = {"val": -1.0, "test": 0.0, "epoch": -1}
for epoch in range(EPOCHS):
  state, metrics = lorap_jax.train_step(
    state, train_batch, jax.random.fold_in(dropout_key, epoch)
  )
  sums = jax.device_get(lorap_jax.eval_step(state, eval_batch))
  history["loss"].append(float(metrics["loss"]))
  for split in ("train", "val", "test"):
    history[split].append(
      float(sums[split]["correct"]) / float(sums[split]["count"])
    )
  if history["val"][-1] > best["val"]:
    best = {"val": history["val"][-1], "test": history["test"][-1]}
    best["epoch"] = epoch
print(
  f"best validation {100 * best['val']:.1f}% at epoch {best['epoch']}, "
  f"test {100 * best['test']:.1f}%"
)

# %% [markdown]
# ## Training curve

# %%
fig, (loss_axis, acc_axis) = plt.subplots(1, 2, figsize=(9, 3.5))
loss_axis.plot(history["loss"])
loss_axis.set_xlabel("epoch")
loss_axis.set_ylabel("training loss")
for split in ("train", "val", "test"):
  acc_axis.plot(100 * np.asarray(history[split]), label=split)
acc_axis.axvline(best["epoch"], color="gray", ls=":", label="selected")
acc_axis.set_xlabel("epoch")
acc_axis.set_ylabel("accuracy %")
acc_axis.legend()
fig.suptitle(f"Cora GCN, INT{BITS} QAT + LoRAP (k = 10, r = 4)")
fig.tight_layout()
PNG.parent.mkdir(parents=True, exist_ok=True)
fig.savefig(PNG, dpi=110)
plt.close(fig)
print(f"wrote {PNG}")
