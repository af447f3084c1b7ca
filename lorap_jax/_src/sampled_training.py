"""Neighbour-sampled mini-batch training of node tasks (large graphs).

`train.train_and_evaluate` runs this for node tasks when
``config.train.sampler == "neighbor"``. Each epoch visits the training
nodes once, in shuffled batches of ``config.train.batch_size`` seeds; each
batch is the seeds' sampled neighbourhood (``config.train.fanouts``, one
fanout per layer; `data/sampling.py`), padded to one fixed budget so that
`steps.train_step` compiles once. The loss is the mean over the seeds.

Evaluation is sampled too: validation and test nodes go through the same
`steps.eval_step` in batches of sampled neighbourhoods of the same budget,
drawn with a generator seeded by the run's seed alone, so every epoch sees
the same neighbourhoods and model selection compares like with like. The
accuracies are therefore those of the sampled-neighbourhood estimator; with
fanouts at least the largest in-degree they are the full graph's.
"""

import jax
import jax.numpy as jnp
import numpy as np

from lorap_jax._src import runs as runs_lib
from lorap_jax._src import steps as steps_lib
from lorap_jax._src import train_state as state_lib
from lorap_jax._src.data import sampling


def check_sampled_config(config) -> tuple[int, ...]:
  """The fanouts, after refusing what sampled training cannot do.

  Raises:
    ValueError: on fanouts that are not one integer >= 1 per layer, or a
      framework, or vmapped seeds, that needs the whole graph.
  """
  fanouts = tuple(config.train.fanouts)
  sampling._check_fanouts(fanouts)
  if len(fanouts) != config.model.num_layers:
    raise ValueError(
      f"train.fanouts={fanouts} needs one fanout per layer "
      f"(model.num_layers={config.model.num_layers})"
    )
  if config.quant.framework in ("a2q", "mixq"):
    # A2Q learns a step per node of the full graph; MixQ's node schedule
    # has its own staged loop.
    raise ValueError(
      f"train.sampler='neighbor' does not support quant.framework="
      f"{config.quant.framework!r}; use fp32, qat or dq"
    )
  if config.vmap_seeds:
    raise ValueError(
      "train.sampler='neighbor' trains seeds one after another; set "
      "vmap_seeds=False"
    )
  return fanouts


def train_node_runs(
  model, config, dataset, log, progress, checkpointer
) -> list[runs_lib.RunRecord]:
  """Every seed's sampled run (`checkpointer(name)` gives a run's)."""
  fanouts = check_sampled_config(config)
  csr = sampling.in_neighbor_csr(dataset.graph)
  budget = sampling.neighbor_budget(
    config.train.batch_size,
    fanouts,
    num_nodes=csr.num_nodes,
    num_edges=len(csr.indices),
  )
  records = []
  for seed in range(config.seeds):
    progress.set_description(f"seed {seed}, sampled")
    records.append(
      train_node_run(
        model,
        config,
        dataset.split_for_seed(seed),
        csr,
        fanouts,
        budget,
        seed,
        log,
        progress,
        checkpointer(f"seed_{seed}"),
      )
    )
  return records


def _batches(dataset, csr, nodes, config, fanouts, budget, *, shuffle, rng):
  for batch in sampling.iterate_node_batches(
    dataset,
    csr,
    nodes,
    config.train.batch_size,
    fanouts,
    budget,
    shuffle=shuffle,
    rng=rng,
  ):
    yield batch.graph, batch.labels, batch.seed_mask


def train_node_run(
  model,
  config,
  dataset,
  csr,
  fanouts,
  budget,
  seed,
  log,
  progress,
  checkpointer,
) -> runs_lib.RunRecord:
  train_nodes = np.flatnonzero(dataset.train_mask)
  eval_nodes = {
    "val": np.flatnonzero(dataset.val_mask),
    "test": np.flatnonzero(dataset.test_mask),
  }
  batch_size = config.train.batch_size
  steps_per_epoch = -(-len(train_nodes) // batch_size)
  rng = np.random.default_rng(seed)
  init_key, dropout_key = jax.random.split(jax.random.key(seed))

  def batches(nodes, shuffle, generator):
    return _batches(
      dataset,
      csr,
      nodes,
      config,
      fanouts,
      budget,
      shuffle=shuffle,
      rng=generator,
    )

  example, _, _ = next(batches(train_nodes, False, np.random.default_rng(0)))
  state = state_lib.initial_train_state(
    config, model, example, init_key, steps_per_epoch=steps_per_epoch
  )
  finished = runs_lib.finished_run(checkpointer, state)
  if finished is not None:
    progress.update(config.train.epochs)
    return finished
  loop = runs_lib.RunLoop(
    config, state, checkpointer, rng, name=f"seed {seed} (sampled)"
  )
  if checkpointer is not None:
    log.drop(loop.start_epoch, seed=seed)
  progress.update(loop.start_epoch)
  state = loop.state
  for epoch in range(loop.start_epoch, config.train.epochs):

    def epoch_fn(state=state, epoch=epoch):
      losses, hits = [], []
      train_batches = batches(train_nodes, True, rng)
      for i, (graph, labels, mask) in enumerate(train_batches):
        step_rng = jax.random.fold_in(dropout_key, epoch * 100_003 + i)
        batch = steps_lib.Batch(graph, labels, mask)
        state, metrics = steps_lib.train_step(state, batch, step_rng)
        losses.append(metrics["loss"] * mask.sum())
        hits.append(metrics["accuracy"] * mask.sum())
      # The same neighbourhoods every epoch: a generator of the seed alone.
      eval_rng = np.random.default_rng([seed, 1])
      sums = [
        steps_lib.eval_step(
          state, steps_lib.EvalBatch(graph, labels, {name: mask})
        )
        for name, nodes in eval_nodes.items()
        for graph, labels, mask in batches(nodes, False, eval_rng)
      ]
      count = len(train_nodes)
      train = {
        "loss": jnp.sum(jnp.stack(losses)) / count,
        "accuracy": jnp.sum(jnp.stack(hits)) / count,
      }
      return state, train, sums

    (state, train_metrics, sums), elapsed = runs_lib.timed(epoch_fn)
    metrics = steps_lib.summarize_eval(sums)
    log(
      seed=seed, epoch=epoch, train=train_metrics, metrics=metrics, ms=elapsed
    )
    loop.end_epoch(epoch, state, train_metrics["loss"], metrics, elapsed)
    progress.update(1)
  return loop.record()
