"""`lorap sweep`: a hyper-parameter grid trained as vmapped programs."""

import argparse
import pathlib
import sys

from lorap_jax._src import config as config_lib
from lorap_jax._src import data as data_lib
from lorap_jax._src import sweep as sweep_lib

# Flag -> (grid axis, Python type of its values).
_AXIS_FLAGS = {
  "seeds": ("seed", int),
  "lr": ("learning_rate", float),
  "prompt_lr": ("prompt_learning_rate", float),
  "weight_decay": ("weight_decay", float),
  "bits": ("bits", int),
  "rank": ("rank", int),
  "num_prompts": ("num_prompts", int),
  "hidden": ("hidden", int),
  "layers": ("num_layers", int),
}
# Flag -> (config path, type), as `cli`'s, for settings that are not swept.
_FIXED_FLAGS = {
  "model": ("model.architecture", str),
  "framework": ("quant.framework", str),
  "prompt": ("prompt.kind", str),
  "epochs": ("train.epochs", int),
  "selection": ("train.selection", str),
  "dropout": ("model.dropout", float),
  "folds": ("folds", int),
  "first_fold": ("first_fold", int),
  "data_dir": ("data_dir", str),
}


def add_parser(commands) -> argparse.ArgumentParser:
  """Adds the `sweep` subcommand to the `lorap` subparsers; returns it."""
  sweep = commands.add_parser(
    "sweep",
    help="train a grid of hyper-parameters, vmapped",
    description=(
      "Trains every configuration of a grid: numeric axes (seeds, learning "
      "rates, weight decay, bits) are arrays of one compiled program, "
      "vmapped over --chunk-size runs per call; structural axes (rank, "
      "prompts, hidden, layers) compile once per value. Writes sweep.csv "
      "(one row per configuration), best.json and config.json to "
      "--workdir. An axis takes a comma-separated list (0.01,0.005) or, for "
      "integers, a range START:STOP (0:4 = 0,1,2,3). Graph datasets run "
      "every configuration on each of --folds folds (a row per fold) and "
      "rank configurations by their mean over seeds and folds."
    ),
  )
  sweep.add_argument("--dataset", required=True, help="a node or graph dataset")
  sweep.add_argument("--workdir", required=True, help="output directory")
  sweep.add_argument("--data-dir", help="dataset root (or LORAP_DATA_DIR)")
  sweep.add_argument("--model", help="gcn, gin or gat")
  sweep.add_argument(
    "--framework",
    help=f"one of {', '.join(sweep_lib.SWEEP_FRAMEWORKS)}",
  )
  sweep.add_argument("--prompt", help="none, gpf, gpf-plus, lorap, gpf-lorap")
  sweep.add_argument("--epochs", type=int)
  sweep.add_argument("--selection", help="val_acc or val_loss (per run)")
  sweep.add_argument("--dropout", type=float)
  sweep.add_argument(
    "--folds", type=int, help="graph datasets: folds per configuration"
  )
  sweep.add_argument(
    "--first-fold", type=int, help="graph datasets: the first fold (0)"
  )
  sweep.add_argument("--seeds", help="run seeds, e.g. 0:4 or 0,3,7")
  sweep.add_argument("--lr", help="backbone learning rates, e.g. 0.01,0.005")
  sweep.add_argument("--prompt-lr", help="prompt learning rates")
  sweep.add_argument("--weight-decay", help="backbone weight decays")
  sweep.add_argument("--bits", help="bit widths, 1..16")
  sweep.add_argument("--rank", help="LoRAP ranks r (structural)")
  sweep.add_argument("--num-prompts", help="prompts k (structural)")
  sweep.add_argument("--hidden", help="hidden widths (structural)")
  sweep.add_argument("--layers", help="layer counts (structural)")
  sweep.add_argument(
    "--chunk-size",
    type=int,
    help="configurations per compiled (vmapped) call; memory grows with it "
    "(default: 1 on a CPU, where batching does not pay, else all)",
  )
  sweep.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="override any config field, e.g. --set quant.gradient=clipped",
  )
  sweep.add_argument(
    "--devices",
    type=int,
    help="devices to split configurations over (default: all JAX sees)",
  )
  sweep.add_argument(
    "--no-progress", action="store_true", help="hide the progress bar"
  )
  return sweep


def parse_axis(flag: str, text: str, kind: type) -> list:
  """Values of one axis flag: "a,b,c", or "start:stop" for integers.

  Raises:
    ValueError: on an empty list or a value that is not a number.
  """
  name = "--" + flag.replace("_", "-")
  text = text.strip()
  if kind is int and ":" in text:
    start, _, stop = text.partition(":")
    try:
      values = list(range(int(start), int(stop)))
    except ValueError as error:
      raise ValueError(
        f"{name}={text!r} must be START:STOP with integers"
      ) from error
    if not values:
      raise ValueError(f"{name}={text!r} is an empty range")
    return values
  items = [item.strip() for item in text.split(",")]
  if not text or not all(items):
    raise ValueError(f"{name}={text!r} must be a comma-separated list")
  values = []
  for item in items:
    try:
      value = float(item)
    except ValueError as error:
      raise ValueError(f"{name}: {item!r} is not a number") from error
    if kind is int:
      if value != int(value):
        raise ValueError(f"{name}: {item!r} is not an integer")
      value = int(value)
    values.append(value)
  return values


def build(args: argparse.Namespace):
  """The base config and the grid of a `lorap sweep` command line.

  Raises:
    ValueError: on unknown names, bad values or a bad grid.
  """
  from lorap_jax._src import cli  # cli imports this module.

  if args.dataset.lower() not in data_lib.DATASET_NAMES:
    raise ValueError(
      f"unknown dataset {args.dataset!r}; known: "
      f"{', '.join(data_lib.DATASET_NAMES)}"
    )
  config = config_lib.get_config(args.dataset.lower())
  config = cli._with_flags(config, args, _FIXED_FLAGS)
  axes = {}
  for flag, (axis, kind) in _AXIS_FLAGS.items():
    text = getattr(args, flag)
    if text is not None:
      axes[axis] = parse_axis(flag, text, kind)
  return config, sweep_lib.SweepGrid.from_axes(axes)


def format_result(result: sweep_lib.SweepResult) -> str:
  """A short report: size, times and the best configurations."""
  best, mean = result.best, result.best_mean
  settings = ", ".join(
    f"{name}={best[name]}" for name in sweep_lib.AXES if name != "seed"
  )
  metric = "mae" if "val_mae" in best else "acc"
  return "\n".join(
    [
      f"{_size_text(result.rows)}; compile "
      f"{sum(result.compile_seconds):.1f} s, train "
      f"{sum(result.run_seconds):.1f} s",
      f"  best run       {_run_name(best)}, {settings}: val "
      f"{_metric(best[f'val_{metric}'], metric)}, test "
      f"{_metric(best[f'test_{metric}'], metric)} (epoch {best['best_epoch']})",
      "  best by mean   "
      + ", ".join(
        f"{name}={mean[name]}" for name in sweep_lib.AXES if name != "seed"
      )
      + f": val {_mean_metric(mean, 'val', metric)}, test "
      f"{_mean_metric(mean, 'test', metric)} ({_runs_text(mean)})",
    ]
  )


def _mean_metric(mean, split: str, metric: str) -> str:
  name = f"{split}_{metric}"
  return _metric(mean[f"{name}_mean"], metric, mean[f"{name}_std"])


def _metric(value: float, metric: str, std: float | None = None) -> str:
  """An accuracy in percent, or an MAE, with its std when given."""
  if metric == "acc":
    spread = "" if std is None else f" ± {100 * std:.2f}"
    return f"{100 * value:.2f}{spread} %"
  spread = "" if std is None else f" ± {std:.3f}"
  return f"MAE {value:.3f}{spread}"


def _count(number: int, noun: str) -> str:
  return f"{number} {noun}{'' if number == 1 else 's'}"


def _size_text(rows) -> str:
  if "fold" not in rows[0]:
    return _count(len(rows), "configuration")
  folds = len({row["fold"] for row in rows})
  return (
    f"{_count(len(rows), 'run')} ({_count(len(rows) // folds, 'configuration')}"
    f" x {_count(folds, 'fold')})"
  )


def _run_name(row) -> str:
  fold = f", fold {row['fold']}" if "fold" in row else ""
  return f"seed {row['seed']}{fold}"


def _runs_text(mean) -> str:
  if "folds" not in mean:
    return _count(len(mean["seeds"]), "seed")
  seeds, folds = len(set(mean["seeds"])), len(set(mean["folds"]))
  return (
    f"{_count(len(mean['seeds']), 'run')}: {_count(seeds, 'seed')} x "
    f"{_count(folds, 'fold')}"
  )


def main(args: argparse.Namespace) -> int:
  """Runs `lorap sweep`; returns the exit status."""
  try:
    config, grid = build(args)
    result = sweep_lib.run_sweep(
      config,
      grid,
      args.workdir,
      chunk_size=args.chunk_size,
      devices=args.devices,
      progress=not args.no_progress,
    )
  except (
    ValueError,
    NotImplementedError,
    FileNotFoundError,
  ) as error:
    print(f"lorap: error: {error}", file=sys.stderr)
    return 2
  print(format_result(result))
  workdir = pathlib.Path(args.workdir)
  print(f"  written to     {workdir / sweep_lib.CSV_NAME}")
  return 0
