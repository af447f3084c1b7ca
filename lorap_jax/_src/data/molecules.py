"""AqSol: molecular graph regression (aqueous solubility, MAE), as
benchmarking-gnns builds it.

ZINC-12k's training molecules are not available offline; AqSol is
benchmarking-gnns' other molecular regression set (about 10k molecules,
scaffold split). Its files live under ``aqsol/`` of the data directory:

* ``asqol_graph_raw/{val,test}.pickle``: benchmarking-gnns' own graphs of
  the validation and test molecules, used as they are: tuples
  ``(atom types, bond types, edge_index, solubility)``.
* ``curated-solubility-dataset.csv`` (AqSolDB) and
  ``derived_split_rows/train.txt``: the training molecules, built here from
  their SMILES with RDKit as benchmarking-gnns' ``generate_AqSol_raw``
  notebook does: one node per atom in RDKit order, typed by
  ``atom_dict[atom.GetSymbol()]``; one edge per bond in each direction,
  typed by ``bond_dict[str(bond.GetBondType())]``.
* ``asqol_graph_raw/{atom,bond}_dict.pickle``: those dictionaries (65
  element symbols; NONE, SINGLE, DOUBLE, AROMATIC, TRIPLE).

Then, as benchmarking-gnns' ``MoleculeAqSolDGL``, graphs without bonds and
graphs with trailing atoms outside every bond (salts) are dropped, leaving
7,831 / 996 / 996 graphs. Node features are the one-hot atom types (65
columns; ``node_features="degree"`` gives degree features instead); the bond
types are kept as ``edges`` (int32 ``[n_edges]``, aligned with the sorted
edges), which the models here do not use. Targets are float32 log
solubilities (mol/L).

The pickles are read by an unpickler that accepts only numpy arrays and the
notebook's ``Dictionary`` class (replaced by a plain stand-in), so a crafted
file cannot run code. RDKit is an optional dependency:
``pip install 'lorap_jax[datasets]'``.
"""

import csv
import importlib
import os
import pathlib
import pickle
from typing import Any, NamedTuple

import numpy as np

from lorap_jax._src.data.containers import Fold, GraphDataset
from lorap_jax._src.data.datasets import (
  _degree_features,
  _one_hot,
  _single_graph,
)
from lorap_jax._src.data.files import (
  DataFileError,
  require_file,
  resolve_data_dir,
)
from lorap_jax._src.data.npz import NUMPY_PICKLE_GLOBALS
from lorap_jax._src.data.validation import validate_graph_dataset

NAME = "aqsol"
SPLITS = ("train", "val", "test")
_RAW_DIR = "aqsol/asqol_graph_raw"  # sic: the original folder name
_CSV = "aqsol/curated-solubility-dataset.csv"
_EXTRA_HINT = (
  "Building the AqSol training graphs needs RDKit: "
  "pip install 'lorap_jax[datasets]' (or pip install rdkit)."
)


class _Dictionary:
  """Stand-in for the notebook's ``Dictionary`` (``word2idx``, ...)."""


class _AqSolUnpickler(pickle.Unpickler):
  """Unpickles numpy arrays and ``Dictionary`` objects, nothing else."""

  def find_class(self, module: str, name: str) -> Any:
    if name == "Dictionary":
      return _Dictionary
    if (module, name) not in NUMPY_PICKLE_GLOBALS:
      raise pickle.UnpicklingError(
        f"refusing to unpickle {module}.{name}: the AqSol pickles hold only "
        "numpy arrays and Dictionary objects"
      )
    return super().find_class(module, name)


def _unpickle(path: pathlib.Path) -> Any:
  """Loads one AqSol pickle, or raises DataFileError naming it."""
  try:
    with path.open("rb") as f:
      return _AqSolUnpickler(f).load()
  except Exception as error:  # A damaged pickle fails in many ways.
    raise DataFileError(f"Cannot unpickle {path}: {error!r}.") from error


def _word2idx(data_dir: pathlib.Path, which: str) -> dict[str, int]:
  """The ``word2idx`` map of ``atom_dict`` or ``bond_dict``."""
  path = require_file(data_dir, f"{_RAW_DIR}/{which}_dict.pickle")
  value = _unpickle(path)
  mapping = getattr(value, "word2idx", None)
  if not isinstance(mapping, dict):
    raise DataFileError(f"{path} holds no word2idx dictionary.")
  return {str(k): int(v) for k, v in mapping.items()}


class Molecule(NamedTuple):
  """One molecule graph as benchmarking-gnns stores it.

  Attributes:
    atoms: int64 ``[n_atoms]`` atom types (`atom_dict` indices).
    bonds: int64 ``[2 * n_bonds]`` bond types, one per directed edge.
    edge_index: int64 ``[2, 2 * n_bonds]`` (sender, receiver) pairs, every
      bond in both directions.
    target: The log solubility.
  """

  atoms: np.ndarray
  bonds: np.ndarray
  edge_index: np.ndarray
  target: float


def _stored_molecules(data_dir: pathlib.Path, split: str) -> list[Molecule]:
  """Reads benchmarking-gnns' ``val.pickle`` or ``test.pickle``."""
  path = require_file(data_dir, f"{_RAW_DIR}/{split}.pickle")
  value = _unpickle(path)
  if not isinstance(value, list | tuple):
    raise DataFileError(f"{path} should hold a list of molecules.")
  molecules = []
  for i, entry in enumerate(value):
    try:
      atoms, bonds, edge_index, target = entry
      molecule = Molecule(
        np.asarray(atoms, np.int64).reshape(-1),
        np.asarray(bonds, np.int64).reshape(-1),
        np.asarray(edge_index, np.int64).reshape(2, -1),
        float(target),
      )
    except (TypeError, ValueError) as error:
      raise DataFileError(
        f"{path}, molecule {i}: expected (atom types, bond types, "
        f"edge_index, solubility), found {type(entry).__name__}: {error}."
      ) from error
    molecules.append(molecule)
  return molecules


def _require_rdkit():
  """Returns the `rdkit.Chem` module, or raises ImportError with a hint."""
  try:
    return importlib.import_module("rdkit.Chem")
  except ImportError as error:
    raise ImportError(_EXTRA_HINT) from error


def molecule_from_smiles(
  smiles: str,
  target: float,
  atom_types: dict[str, int],
  bond_types: dict[str, int],
) -> Molecule | None:
  """Builds one molecule graph as benchmarking-gnns' notebook does.

  Args:
    smiles: The SMILES string.
    target: The molecule's regression target.
    atom_types: Element symbol -> atom type (``atom_dict.word2idx``).
    bond_types: RDKit bond type name -> bond type (``bond_dict.word2idx``).

  Returns:
    The molecule, or None if RDKit cannot parse `smiles`.

  Raises:
    ImportError: If RDKit is not installed.
    KeyError: If an element or bond type has no entry in the maps.
  """
  chem = _require_rdkit()
  blocker = importlib.import_module("rdkit.rdBase").BlockLogs()
  try:
    molecule = chem.MolFromSmiles(smiles)
  finally:
    del blocker  # Parse warnings are RDKit's business, not the user's.
  if molecule is None:
    return None
  atoms = [atom_types[atom.GetSymbol()] for atom in molecule.GetAtoms()]
  edge_index, bonds = [], []
  for bond in molecule.GetBonds():
    i, j = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
    kind = bond_types[str(bond.GetBondType())]
    edge_index += [(i, j), (j, i)]
    bonds += [kind, kind]
  return Molecule(
    np.array(atoms, np.int64),
    np.array(bonds, np.int64),
    np.array(edge_index, np.int64).reshape(-1, 2).T,
    float(target),
  )


def _csv_rows(path: pathlib.Path) -> list[tuple[str, float]]:
  """(SMILES, Solubility) of every CSV row, in file order."""
  with path.open(newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    missing = {"SMILES", "Solubility"} - set(reader.fieldnames or ())
    if missing:
      raise DataFileError(f"{path} has no column(s) {sorted(missing)}.")
    try:
      return [(row["SMILES"], float(row["Solubility"])) for row in reader]
    except ValueError as error:
      raise DataFileError(
        f"{path}, line {reader.line_num}: {error}."
      ) from error


def _train_molecules(
  data_dir: pathlib.Path,
  atom_types: dict[str, int],
  bond_types: dict[str, int],
) -> list[Molecule]:
  """Builds the training molecules from the CSV rows listed for them."""
  _require_rdkit()  # Before reading anything.
  csv_path = require_file(data_dir, _CSV)
  rows_path = require_file(data_dir, "aqsol/derived_split_rows/train.txt")
  rows = _csv_rows(csv_path)
  try:
    indices = [int(line) for line in rows_path.read_text().split()]
  except ValueError as error:
    raise DataFileError(f"{rows_path}: {error}.") from error
  molecules = []
  for index in indices:
    if not 0 <= index < len(rows):
      raise DataFileError(
        f"{rows_path}: row {index} is outside the {len(rows)} rows of "
        f"{csv_path.name}."
      )
    smiles, target = rows[index]
    try:
      molecule = molecule_from_smiles(smiles, target, atom_types, bond_types)
    except KeyError as error:
      raise DataFileError(
        f"{csv_path}, row {index}: {error} has no entry in the AqSol atom "
        "or bond dictionary."
      ) from error
    if molecule is None:
      raise DataFileError(
        f"{csv_path}, row {index}: RDKit cannot parse the SMILES {smiles!r}."
      )
    molecules.append(molecule)
  return molecules


def _keep(molecule: Molecule) -> bool:
  """benchmarking-gnns' filter: a bond, and no atom after the last bonded."""
  if molecule.edge_index.size == 0:
    return False
  return int(molecule.edge_index.max()) + 1 == len(molecule.atoms)


def _canonical_bonds(
  molecule: Molecule, where: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Sorts a molecule's edges by (receiver, sender), bond types along.

  Returns:
    ``(senders, receivers, bond_types)``, int32 each.

  Raises:
    DataFileError: If an edge is a self-loop, repeats, or lacks its reverse.
  """
  num_atoms = len(molecule.atoms)
  senders, receivers = molecule.edge_index
  if len(molecule.bonds) != len(senders):
    raise DataFileError(
      f"{where}: {len(molecule.bonds)} bond types for {len(senders)} edges."
    )
  if senders.min() < 0 or max(senders.max(), receivers.max()) >= num_atoms:
    raise DataFileError(f"{where}: an edge names an atom that does not exist.")
  keys = receivers * num_atoms + senders
  order = np.argsort(keys, kind="stable")
  keys = keys[order]
  reverse = np.sort(senders * num_atoms + receivers)
  if (
    np.any(senders == receivers)
    or np.any(keys[1:] == keys[:-1])
    or not np.array_equal(keys, reverse)
  ):
    raise DataFileError(
      f"{where}: the edges must list every bond once in each direction, "
      "without self-loops."
    )
  return (
    senders[order].astype(np.int32),
    receivers[order].astype(np.int32),
    molecule.bonds[order].astype(np.int32),
  )


def load_aqsol(
  data_dir: str | os.PathLike | None = None,
  *,
  node_features: str = "auto",
) -> GraphDataset:
  """Loads AqSol as benchmarking-gnns' ``MoleculeAqSolDGL`` (module doc).

  Args:
    data_dir: The data directory (``aqsol/``), or None for
      ``LORAP_DATA_DIR``.
    node_features: ``"auto"`` or ``"tags"``: one-hot atom types (65
      columns); ``"degree"``: Degree-Quant's degree features.

  Returns:
    The regression dataset (``task="regression"``, ``num_classes=1``,
    float32 targets) with one fold: 7,831 train / 996 val / 996 test graphs.

  Raises:
    ValueError: If `node_features` is not a known option.
    ImportError: If RDKit is not installed.
    FileNotFoundError: If the data directory or a file is missing.
    DataFileError: If a file is corrupt or malformed.
  """
  if node_features not in ("auto", "tags", "degree"):
    raise ValueError(
      f"{node_features=} is not one of 'auto', 'tags', 'degree' for AqSol."
    )
  data_dir = resolve_data_dir(data_dir)
  atom_types = _word2idx(data_dir, "atom")
  bond_types = _word2idx(data_dir, "bond")
  molecules = {
    "train": _train_molecules(data_dir, atom_types, bond_types),
    "val": _stored_molecules(data_dir, "val"),
    "test": _stored_molecules(data_dir, "test"),
  }
  kept = {split: [m for m in molecules[split] if _keep(m)] for split in SPLITS}
  everything = [m for split in SPLITS for m in kept[split]]
  num_types = len(atom_types)
  all_atoms = np.concatenate([m.atoms for m in everything])
  if all_atoms.min() < 0 or all_atoms.max() >= num_types:
    raise DataFileError(
      f"An AqSol atom type is outside 0..{num_types - 1} (the atom dictionary)."
    )
  edges = [
    _canonical_bonds(m, f"AqSol {split} molecule {i}")
    for split in SPLITS
    for i, m in enumerate(kept[split])
  ]
  if node_features == "degree":
    pairs = zip(everything, edges, strict=True)
    degrees = np.concatenate(
      [np.bincount(e[1], minlength=len(m.atoms)) for m, e in pairs]
    )
    features = _degree_features(degrees)
  else:
    features = _one_hot(all_atoms, num_types)
  offsets = np.concatenate([[0], np.cumsum([len(m.atoms) for m in everything])])
  graphs = tuple(
    _single_graph(features[offsets[i] : offsets[i + 1]], s, r)._replace(
      edges=bonds
    )
    for i, (s, r, bonds) in enumerate(edges)
  )
  sizes = [len(kept[split]) for split in SPLITS]
  starts = np.concatenate([[0], np.cumsum(sizes)])
  fold = Fold(
    *(np.arange(starts[i], starts[i + 1], dtype=np.int32) for i in range(3))
  )
  dataset = GraphDataset(
    name=NAME,
    graphs=graphs,
    labels=np.array([m.target for m in everything], dtype=np.float32),
    num_classes=1,
    folds=(fold,),
    task="regression",
  )
  return validate_graph_dataset(
    dataset, source=f"AqSol files under {data_dir / 'aqsol'}"
  )
