"""Integer-only inference of Cora GCNs: agreement with QAT, and memory.

Trains Cora GCNs with fake quantization (plain QAT and Degree-Quant, INT8
and INT4, LoRAP by default), exports each to integer codes
(`lorap_jax.export_integer_model`), runs `lorap_jax.integer_forward`, and
prints, per model, the agreement of predictions with the fake-quantized
model (its eval forward), the largest logit difference in output
quantization steps, both test accuracies, and a memory table (model and
node features, KB, for FP32, INT8 and INT4).

Usage (from the repository root, data directory in LORAP_DATA_DIR):
  .venv/bin/python experiments/integer_inference.py
  .venv/bin/python experiments/integer_inference.py --epochs 200 \\
      --frameworks qat --prompt none
"""

import argparse
import tempfile

import jax
import numpy as np

import lorap_jax


def train(framework, bits, args, workdir):
  config = lorap_jax.get_config("cora")
  config.seeds = 1
  config.train.epochs = args.epochs
  config.model.hidden = args.hidden
  config.checkpoint.enabled = False
  config.quant.framework = framework
  config.quant.bits = bits
  config.prompt.kind = args.prompt
  summary = lorap_jax.train_and_evaluate(config, f"{workdir}/{framework}{bits}")
  return summary["states"][0]


def cora_graph(dataset, prompt):
  """The graph as training feeds it: sparse features unless densified."""
  graph = dataset.graph
  features = np.asarray(graph.nodes, np.float32)
  if prompt in ("none", "lorap"):
    graph = graph._replace(nodes=lorap_jax.SparseFeatures.from_dense(features))
  return jax.device_put(graph)


@jax.jit
def eval_forward(state, graph):
  """The logits of `lorap_jax.eval_step` (frozen ranges, no dropout)."""
  return state.apply_fn(state.variables(), graph, bits=state.bits, train=False)


def compare(state, graph, dataset, requantization=None):
  """Agreement, logit steps and accuracies of integer vs fake inference."""
  fake = np.asarray(eval_forward(state, graph))
  integer_model = lorap_jax.export_integer_model(
    state, requantization=requantization
  )
  out = lorap_jax.integer_forward(integer_model, graph)
  logits = np.asarray(out.logits)
  step = float(integer_model.layers[-1].output.scale)
  steps = np.abs(logits - fake) / step
  predicted, predicted_fake = logits.argmax(-1), fake.argmax(-1)
  labels, test = np.asarray(dataset.labels), np.asarray(dataset.test_mask)
  return integer_model, {
    "agreement": np.mean(predicted == predicted_fake),
    "max_steps": steps.max(),
    "within_one": np.mean(steps.max(axis=1) <= 1.0 + 1e-3),
    "logits_differing": int(np.sum(steps > 1e-3)),
    "acc_int": np.mean((predicted == labels)[test]),
    "acc_fake": np.mean((predicted_fake == labels)[test]),
  }


def weight_kb(tree) -> float:
  """KB of the weight matrices alone (kernels, or their integer codes)."""
  if isinstance(tree, lorap_jax.IntegerModel):
    return sum(layer.weight.data.nbytes for layer in tree.layers) / 1024
  kernels = [v["linear"]["kernel"] for k, v in tree.items() if "conv" in k]
  return sum(np.asarray(k).nbytes for k in kernels) / 1024


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--epochs", type=int, default=50)
  parser.add_argument("--hidden", type=int, default=64)
  parser.add_argument("--prompt", default="lorap")
  parser.add_argument("--frameworks", default="qat,dq")
  parser.add_argument("--bits", default="8,4")
  parser.add_argument("--workdir", default=None)
  args = parser.parse_args()
  dataset = lorap_jax.load_dataset("cora")
  graph = cora_graph(dataset, args.prompt)
  n_nodes = graph.nodes.shape[0]
  exported = {}
  print(
    f"Cora GCN, hidden {args.hidden}, {args.epochs} epochs, prompt "
    f"{args.prompt}; integer vs fake-quantized inference, {n_nodes} nodes\n"
  )
  print(
    "| model | agreement | nodes within 1 step | max diff (steps) | "
    "logits differing | test acc int | test acc fake | gemmlowp agreement |"
  )
  print("|---|---|---|---|---|---|---|---|")
  with tempfile.TemporaryDirectory() as tmp:
    workdir = args.workdir or tmp
    for framework in args.frameworks.split(","):
      for bits in (int(b) for b in args.bits.split(",")):
        state = train(framework, bits, args, workdir)
        integer_model, r = compare(state, graph, dataset)
        _, double = compare(state, graph, dataset, "gemmlowp")
        exported[framework, bits] = (integer_model, state)
        print(
          f"| {framework.upper()} INT{bits} | {100 * r['agreement']:.2f}% | "
          f"{100 * r['within_one']:.2f}% | {r['max_steps']:.0f} | "
          f"{r['logits_differing']} | {100 * r['acc_int']:.1f} | "
          f"{100 * r['acc_fake']:.1f} | {100 * double['agreement']:.2f}% |"
        )
  print(
    "\nMemory (KB = 1024 bytes). Model: every stored array (weights, "
    "biases, scales, zero points, multipliers, tables, float LoRAP "
    "parameters); features: the node tensors stored between layers "
    "(each layer's input, dense, then the logits)."
  )
  print(
    "\n| precision | weights | model total | features (sum) | "
    "largest feature tensor |"
  )
  print("|---|---|---|---|---|")
  framework = args.frameworks.split(",")[0]
  any_model, any_state = next(iter(exported.values()))
  fp32_features = lorap_jax.feature_memory_kb(any_model, n_nodes, bits=32)
  print(
    f"| FP32 | {weight_kb(any_state.params):.1f} | "
    f"{lorap_jax.model_memory_kb(any_state.params):.1f} | "
    f"{fp32_features.total_kb:.1f} | {fp32_features.largest_kb:.1f} |"
  )
  for (name, bits), (integer_model, _) in exported.items():
    if name != framework:
      continue
    features = lorap_jax.feature_memory_kb(integer_model, n_nodes)
    print(
      f"| INT{bits} | {weight_kb(integer_model):.1f} | "
      f"{lorap_jax.model_memory_kb(integer_model):.1f} | "
      f"{features.total_kb:.1f} | {features.largest_kb:.1f} |"
    )


if __name__ == "__main__":
  main()
