"""The `lorap` command line: `lorap train`, `lorap post-train` and
`lorap sweep`."""

import argparse
import ast
import pathlib
import sys

from lorap_jax._src import (
  compilation_cache,
  distributed,
  models,
  post_training,
  prompts,
  sweep_cli,
)
from lorap_jax._src import config as config_lib
from lorap_jax._src import data as data_lib
from lorap_jax._src import quantization as q
from lorap_jax._src import train as train_lib
from lorap_jax._src.data import DATASET_NAMES

# Flag -> (config path, type). Only flags the user gives override the
# dataset's defaults.
_FLAG_TO_CONFIG = {
  "model": ("model.architecture", str),
  "framework": ("quant.framework", str),
  "bits": ("quant.bits", int),
  "prompt": ("prompt.kind", str),
  "rank": ("prompt.rank", int),
  "num_prompts": ("prompt.num_prompts", int),
  "prompt_lr": ("prompt.learning_rate", float),
  "epochs": ("train.epochs", int),
  "lr": ("train.learning_rate", float),
  "weight_decay": ("train.weight_decay", float),
  "batch_size": ("train.batch_size", int),
  "selection": ("train.selection", str),
  "trainable": ("train.trainable", str),
  "hidden": ("model.hidden", int),
  "layers": ("model.num_layers", int),
  "dropout": ("model.dropout", float),
  "seeds": ("seeds", int),
  "folds": ("folds", int),
  "first_fold": ("first_fold", int),
  "data_dir": ("data_dir", str),
  "vmap_seeds": ("vmap_seeds", bool),
  "devices": ("devices", int),
}


def add_multi_host_flags(command: argparse.ArgumentParser) -> None:
  """`--coordinator`, `--num-processes`, `--process-id` (jax.distributed)."""
  group = command.add_argument_group(
    "multi-host (run the same command on every host)"
  )
  group.add_argument("--coordinator", help="host:port of process 0")
  group.add_argument("--num-processes", type=int, default=1)
  group.add_argument("--process-id", type=int, default=0)


def join_multi_host(args: argparse.Namespace) -> None:
  """Starts `jax.distributed` when `--coordinator` is given."""
  coordinator = getattr(args, "coordinator", None)  # post-train has none.
  num_processes = getattr(args, "num_processes", 1)
  if coordinator:
    distributed.initialize_multi_host(
      coordinator, num_processes, args.process_id
    )
  elif num_processes != 1:
    raise ValueError("--num-processes above 1 needs --coordinator host:port")


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="lorap",
    description="Quantization-aware GNN training with LoRAP prompts (JAX).",
  )
  commands = parser.add_subparsers(dest="command", required=True)
  train = commands.add_parser(
    "train",
    help="train and evaluate one configuration over several seeds or folds",
    description=(
      "Trains a (quantized) GNN and writes config.json, metrics.jsonl and "
      "summary.json to --workdir. Flags left out keep the dataset's defaults."
    ),
  )
  train.add_argument("--dataset", required=True, help=", ".join(DATASET_NAMES))
  train.add_argument("--workdir", required=True, help="output directory")
  train.add_argument("--data-dir", help="dataset root (or LORAP_DATA_DIR)")
  train.add_argument(
    "--download",
    action="store_true",
    help="first fetch missing Planetoid / TU files from their public source "
    "into the data dir (checksum-verified)",
  )
  train.add_argument("--model", help="gcn, gin or gat")
  train.add_argument(
    "--framework", help=f"one of {', '.join(config_lib.FRAMEWORKS)}"
  )
  train.add_argument("--bits", type=int, help="bit width, 1..16")
  train.add_argument("--prompt", help="none, gpf, gpf-plus, lorap, gpf-lorap")
  train.add_argument("--rank", type=int, help="LoRAP rank r")
  train.add_argument("--num-prompts", type=int, help="prompts k")
  train.add_argument("--prompt-lr", type=float, help="prompt learning rate")
  train.add_argument("--epochs", type=int)
  train.add_argument("--lr", type=float, help="backbone learning rate")
  train.add_argument("--weight-decay", type=float)
  train.add_argument("--batch-size", type=int, help="graph tasks")
  train.add_argument(
    "--selection", help="val_acc or val_loss; val_mae (regression)"
  )
  train.add_argument(
    "--trainable",
    help="all (default) or prompts: train only the prompts, the backbone "
    "frozen at its initial values",
  )
  train.add_argument("--hidden", type=int)
  train.add_argument("--layers", type=int)
  train.add_argument("--dropout", type=float)
  train.add_argument("--seeds", type=int, help="runs (per fold)")
  train.add_argument(
    "--folds", type=int, help="graph tasks: CV folds to run, 1..10"
  )
  train.add_argument(
    "--first-fold",
    type=int,
    help="graph tasks: the first fold to run, 0-based (default 0)",
  )
  train.add_argument(
    "--devices",
    type=int,
    help="graph tasks: devices each batch is split over (0: all)",
  )
  train.add_argument(
    "--vmap-seeds",
    action="store_true",
    default=None,
    help="node tasks: train all seeds at once, vmapped",
  )
  train.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="override any config field, e.g. --set quant.gradient=clipped",
  )
  train.add_argument(
    "--no-progress", action="store_true", help="hide the progress bar"
  )
  train.add_argument(
    "--resume",
    action="store_true",
    help="continue the run saved in --workdir from its checkpoints",
  )
  _add_post_train_parser(commands)
  for command in (train, sweep_cli.add_parser(commands)):
    add_multi_host_flags(command)
  return parser


# post-train flag -> (config path, type).
_POST_TRAIN_FLAGS = {
  "prompt": ("prompt.kind", str),
  "rank": ("prompt.rank", int),
  "num_prompts": ("prompt.num_prompts", int),
  "prompt_lr": ("prompt.learning_rate", float),
  "epochs": ("train.epochs", int),
  "calibration_size": ("train.calibration_size", int),
  "seeds": ("seeds", int),
  "data_dir": ("data_dir", str),
}


def _add_post_train_parser(commands) -> None:
  post = commands.add_parser(
    "post-train",
    help="train only the prompts of a trained model on a calibration set",
    description=(
      "Loads each seed's selected model from a finished `lorap train` "
      "workdir (--from), adds prompts (fresh unless the run had the same "
      "ones), and trains only the prompts on --calibration-size labelled "
      "training nodes, the backbone and its quantizer ranges frozen. "
      "Writes a new --workdir; the source is only read. Node tasks."
    ),
  )
  post.add_argument(
    "--from", dest="source", required=True, help="trained run's workdir"
  )
  post.add_argument("--workdir", required=True, help="new output directory")
  post.add_argument("--data-dir", help="dataset root (or LORAP_DATA_DIR)")
  post.add_argument("--prompt", help="gpf, gpf-plus, lorap, gpf-lorap")
  post.add_argument("--rank", type=int, help="LoRAP rank r")
  post.add_argument("--num-prompts", type=int, help="prompts k")
  post.add_argument("--prompt-lr", type=float, help="prompt learning rate")
  post.add_argument("--epochs", type=int, help="prompt-training epochs")
  post.add_argument(
    "--calibration-size",
    type=int,
    help="labelled training nodes per seed (default 35)",
  )
  post.add_argument("--seeds", type=int, help="seeds of the source run used")
  post.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="override any config field but the backbone's",
  )
  post.add_argument(
    "--no-progress", action="store_true", help="hide the progress bar"
  )


def build_post_train_config(args: argparse.Namespace):
  """The source run's config, for its prompts, with the flags applied."""
  config = post_training.post_training_config(args.source)
  return _with_flags(config, args, _POST_TRAIN_FLAGS)


def _with_flags(config, args: argparse.Namespace, flags: dict):
  """`config` with the given flags, then each `--set KEY=VALUE`, applied,
  and names and fold settings checked."""
  for flag, (path, _) in flags.items():
    value = getattr(args, flag)
    if value is not None:
      _set(config, path, value)
  for key, raw in _set_items(args):
    _set_text(config, key, raw)
  _check_names(config)
  _check_fold_settings(config, _explicit_paths(args, flags))
  return config


def _set_items(args: argparse.Namespace) -> list[tuple[str, str]]:
  """Each `--set KEY=VALUE` as (key, raw value)."""
  items = []
  for item in args.set:
    key, sep, raw = item.partition("=")
    if not sep:
      raise ValueError(f"--set {item!r} must look like KEY=VALUE")
    items.append((key, raw))
  return items


def build_config(args: argparse.Namespace):
  """The dataset's default config with the given flags applied.

  Raises:
    ValueError: on unknown names or out-of-range values.
  """
  # Refuses unknown names; npz/<file>.npz paths keep their case.
  data_lib.is_node_dataset(args.dataset)
  name = args.dataset
  config = config_lib.get_config(name if "/" in name else name.lower())
  config = _with_flags(config, args, _FLAG_TO_CONFIG)
  # MixQ's own node-task width and weight decay, as the result tables run
  # it, where no flag sets them.
  config_lib.use_mixq_node_settings(
    config, keep=_explicit_paths(args, _FLAG_TO_CONFIG)
  )
  return config


def _check_fold_settings(config, explicit_paths) -> None:
  """Refuses fold settings on a node dataset, which has no folds to run.

  A node config keeps the graph tasks' `folds` default, unused; only a value
  the command line gives is a mistake (it would be ignored silently).
  """
  given = sorted({"folds", "first_fold"} & set(explicit_paths))
  if given and data_lib.is_node_dataset(config.dataset):
    raise ValueError(
      f"{' and '.join(given)}: cross-validation folds belong to graph "
      f"datasets; {config.dataset} is a node dataset, whose runs range over "
      "seeds (--seeds)"
    )


def _explicit_paths(args: argparse.Namespace, flags: dict) -> set[str]:
  """The config paths the command line sets (flags and `--set`)."""
  paths = {
    path for flag, (path, _) in flags.items() if getattr(args, flag) is not None
  }
  paths |= {key for key, _ in _set_items(args)}
  return paths


def _parse_value(raw: str):
  try:
    return ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    return raw


def _field(config, path: str):
  """The section holding the dotted field `path`, and the field's name."""
  *parents, leaf = path.split(".")
  node = config
  for name in parents:
    if name not in node:
      raise ValueError(f"unknown config field {path!r}")
    node = node[name]
  if leaf not in node:
    raise ValueError(f"unknown config field {path!r}")
  return node, leaf


def _set_text(config, path: str, raw: str) -> None:
  """`--set PATH=RAW`: a Python literal, or the text itself for a text
  field (`mixq.candidates=8` is the string "8", not the integer)."""
  value = _parse_value(raw)
  node, leaf = _field(config, path)
  if (
    value is not None
    and not isinstance(value, str)
    and node.get_type(leaf) is str
  ):
    value = raw
  _set(config, path, value)


def _set(config, path: str, value) -> None:
  node, leaf = _field(config, path)
  try:
    node[leaf] = value
  except TypeError as error:  # ml_collections keeps each field's type.
    raise ValueError(
      f"config field {path!r} cannot be set to {value!r}: {error}"
    ) from error


def _check_names(config) -> None:
  """Early, readable refusals for the common mistakes."""
  if config.model.architecture not in models.ARCHITECTURES:
    raise ValueError(
      f"unknown model {config.model.architecture!r}; "
      f"choose from {models.ARCHITECTURES}"
    )
  if config.quant.framework not in config_lib.FRAMEWORKS:
    raise ValueError(
      f"unknown framework {config.quant.framework!r}; "
      f"choose from {config_lib.FRAMEWORKS}"
    )
  if config.prompt.kind not in prompts.PROMPT_KINDS:
    raise ValueError(
      f"unknown prompt {config.prompt.kind!r}; "
      f"choose from {prompts.PROMPT_KINDS}"
    )
  q.check_bits(config.quant.bits)
  for name, value in (
    ("rank", config.prompt.rank),
    ("num-prompts", config.prompt.num_prompts),
  ):
    if value < 1:
      raise ValueError(f"--{name}={value} must be at least 1")


def _epoch_time(milliseconds: float | None) -> str:
  # None: every epoch of the run included compilation (two or fewer).
  if milliseconds is None:
    return "n/a (no epoch after the first two)"
  return f"{milliseconds:.2f} ms (median)"


def _headline_lines(summary: dict) -> list[str]:
  runs = f"({summary['num_runs']} runs)"
  if "test_mae_mean" in summary:  # Regression.
    return [
      f"  test MAE       {summary['test_mae_mean']:.4f} "
      f"± {summary['test_mae_std']:.4f}  {runs}",
      f"  val MAE        {summary['val_mae_mean']:.4f} "
      f"± {summary['val_mae_std']:.4f}",
    ]
  lines = [
    f"  test accuracy  {100 * summary['test_acc_mean']:.2f} "
    f"± {100 * summary['test_acc_std']:.2f} %  {runs}",
    f"  val accuracy   {100 * summary['val_acc_mean']:.2f} "
    f"± {100 * summary['val_acc_std']:.2f} %",
  ]
  post = summary.get("post_training")
  if post:
    accs = [100 * a for a in post["initial_test_accs"]]
    mean = sum(accs) / len(accs)
    lines.append(
      f"  before prompts {mean:.2f} % test (mean; "
      f"{post['calibration_size']} calibration nodes per seed)"
    )
  return lines


def format_summary(summary: dict) -> str:
  """A short human-readable report of a run."""
  bits = "FP32" if summary["bits"] is None else f"INT{summary['bits']}"
  lines = [
    f"{summary['dataset']} / {summary['model'].upper()} / {bits} "
    f"{summary['framework']} / prompt: {summary['prompt']}",
    *_headline_lines(summary),
    f"  epoch time     {_epoch_time(summary['epoch_time_ms_median'])}",
    f"  parameters     {summary['num_params']:,} "
    f"({summary['num_prompt_params']:,} in prompts)",
    f"  protocol       {summary['protocol']}",
  ]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  # Off with LORAP_COMPILATION_CACHE=off.
  compilation_cache.use_compilation_cache()
  try:
    join_multi_host(args)
  except ValueError as error:
    print(f"lorap: error: {error}", file=sys.stderr)
    return 2
  if args.command == "sweep":
    return sweep_cli.main(args)
  try:
    if args.command == "post-train":
      summary = post_training.post_train_prompts(
        build_post_train_config(args),
        args.source,
        args.workdir,
        progress=not args.no_progress,
      )
    else:
      summary = _train(args)
  except (
    ValueError,
    FileNotFoundError,
    FloatingPointError,
    data_lib.DownloadError,
  ) as error:
    print(f"lorap: error: {error}", file=sys.stderr)
    return 2
  print(format_summary(summary))
  print(f"  written to     {pathlib.Path(args.workdir) / 'summary.json'}")
  return 0


def _train(args) -> dict:
  config = build_config(args)
  if args.download:
    for path in data_lib.fetch_dataset(config.dataset, config.data_dir or None):
      print(f"lorap: downloaded {path}", file=sys.stderr)
  return train_lib.train_and_evaluate(
    config, args.workdir, progress=not args.no_progress, resume=args.resume
  )


if __name__ == "__main__":
  sys.exit(main())
