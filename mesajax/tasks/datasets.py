"""Readers for the standard public image-classification formats, from a local directory.

Nothing is downloaded: every reader takes a path the user names in the config, and a missing or
incomplete directory raises one ``ValueError`` line saying which files to put where.

==================  ==========================================================================
dataset             files (in ``data_dir``)
==================  ==========================================================================
``digits``          none: scikit-learn's bundled 8x8 digits (1797 images, no test split)
``mnist``           ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``fashion_mnist``   ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (IDX, each file
                    gzipped (``.gz``) or not; the Fashion-MNIST files have the same names)
``cifar10``         the python batches ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``
                    (in ``data_dir`` or in its ``cifar-10-batches-py`` folder)
``npz``             ``data_dir`` is a ``.npz`` file (or a folder holding exactly one) with arrays
                    ``x_train, y_train, x_test, y_test``; images ``[N, H, W]``, ``[N, H, W, C]``
                    or flat ``[N, H*H]``; integer labels ``0 .. n_classes - 1``
==================  ==========================================================================

With ``source="tfds"`` or ``source="hf"`` the same data sets come from an installed
``tensorflow_datasets`` / Hugging Face ``datasets`` instead, from their local caches (``data_dir``
is their cache folder, or ``None`` for the default); neither package is a dependency of mesajax.

Every loader returns an :class:`ImageData`: ``uint8`` images in ``[N, H, W, C]`` (or ``float32``
in [0, 1] for digits and float ``.npz`` files) and ``int32`` labels, loaded once per
``(dataset, data_dir, source)`` and cached for the process.
"""
from __future__ import annotations

import functools
import gzip
import os
import pickle
from typing import NamedTuple

import numpy as np

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "npz")
SOURCES = ("files", "tfds", "hf")

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")
CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
# Names of the same data sets in the optional libraries.
TFDS_NAMES = {"mnist": "mnist", "fashion_mnist": "fashion_mnist", "cifar10": "cifar10"}
HF_NAMES = {"mnist": "mnist", "fashion_mnist": "fashion_mnist", "cifar10": "cifar10"}


class ImageData(NamedTuple):
  """One data set: ``x_*`` are ``[N, H, W, C]`` (``uint8`` 0..255 or ``float32`` in [0, 1])."""

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray | None  # None: no separate test split (digits)
  y_test: np.ndarray | None
  n_classes: int

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.x_train.shape[1:])


# --- IDX (MNIST, Fashion-MNIST) -----------------------------------------------------------------
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
  """An IDX file (LeCun's MNIST format), gzipped or not (detected from the content)."""
  with open(path, "rb") as f:
    raw = f.read()
  if raw[:2] == b"\x1f\x8b":
    raw = gzip.decompress(raw)
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
    raise ValueError(f"{path}: not an IDX file (bad magic number)")
  ndim = raw[3]
  shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
  dtype = np.dtype(_IDX_DTYPES[raw[2]])
  count = int(np.prod(shape))
  offset = 4 + 4 * ndim
  if len(raw) - offset != count * dtype.itemsize:
    raise ValueError(f"{path}: IDX header says {shape} but the file holds "
                     f"{len(raw) - offset} bytes of data")
  return np.frombuffer(raw, dtype, count=count, offset=offset).reshape(shape).astype(
      dtype.newbyteorder("="))


def _find(directory: str, name: str) -> str | None:
  for candidate in (name, name + ".gz"):
    path = os.path.join(directory, candidate)
    if os.path.isfile(path):
      return path
  return None


def load_idx_dir(directory: str, dataset: str = "mnist") -> ImageData:
  """MNIST-style IDX files in ``directory`` (gzipped or not)."""
  paths = [_find(directory, name) for name in IDX_FILES] if os.path.isdir(directory) else [None]
  if None in paths:
    raise ValueError(
        f"{dataset}: put {', '.join(IDX_FILES)} (each gzipped as .gz or not) in "
        f"{os.path.abspath(directory)!r}; nothing is downloaded")
  x_train, y_train, x_test, y_test = (read_idx(p) for p in paths)
  if x_train.ndim != 3 or x_test.ndim != 3 or len(x_train) != len(y_train) or len(x_test) != len(
      y_test):
    raise ValueError(f"{dataset}: IDX files in {directory!r} have inconsistent shapes")
  return _finish(x_train[..., None], y_train, x_test[..., None], y_test, dataset)


# --- CIFAR-10 python batches --------------------------------------------------------------------
def read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
  """One CIFAR-10 python batch: ``(uint8 [N, 32, 32, 3], labels [N])``."""
  with open(path, "rb") as f:
    batch = pickle.load(f, encoding="bytes")
  data = np.asarray(batch[b"data"] if b"data" in batch else batch["data"], np.uint8)
  labels = batch.get(b"labels", batch.get("labels"))
  return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.asarray(labels)


def load_cifar10_dir(directory: str) -> ImageData:
  nested = os.path.join(directory, "cifar-10-batches-py")
  if os.path.isdir(nested):
    directory = nested
  missing = [n for n in CIFAR_FILES if not os.path.isfile(os.path.join(directory, n))]
  if missing:
    raise ValueError(
        f"cifar10: put the python batches {', '.join(CIFAR_FILES)} (from "
        f"cifar-10-python.tar.gz) in {os.path.abspath(directory)!r}; nothing is downloaded")
  parts = [read_cifar_batch(os.path.join(directory, n)) for n in CIFAR_FILES]
  x_train = np.concatenate([p[0] for p in parts[:-1]])
  y_train = np.concatenate([p[1] for p in parts[:-1]])
  return _finish(x_train, y_train, parts[-1][0], parts[-1][1], "cifar10")


# --- .npz ---------------------------------------------------------------------------------------
def load_npz(path: str) -> ImageData:
  if os.path.isdir(path):
    found = sorted(f for f in os.listdir(path) if f.endswith(".npz"))
    if len(found) != 1:
      raise ValueError(f"npz: {os.path.abspath(path)!r} must hold exactly one .npz file "
                       f"(found {len(found)}); or set data_dir to the file itself")
    path = os.path.join(path, found[0])
  if not os.path.isfile(path):
    raise ValueError(f"npz: no file {os.path.abspath(path)!r}; data_dir must name a .npz file "
                     "with arrays x_train, y_train, x_test, y_test")
  with np.load(path, allow_pickle=False) as z:
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in z.files]
    if missing:
      raise ValueError(f"npz: {path!r} lacks array(s) {missing}; it needs x_train, y_train, "
                       "x_test, y_test")
    arrays = [z[k] for k in ("x_train", "y_train", "x_test", "y_test")]
  x_train, y_train, x_test, y_test = arrays
  return _finish(_as_images(x_train, path), y_train, _as_images(x_test, path), y_test, "npz")


def _as_images(x: np.ndarray, path: str) -> np.ndarray:
  if x.ndim == 2:
    side = int(round(np.sqrt(x.shape[1])))
    if side * side != x.shape[1]:
      raise ValueError(f"npz: flat images in {path!r} have {x.shape[1]} pixels, not a square")
    x = x.reshape(len(x), side, side)
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4:
    raise ValueError(f"npz: images in {path!r} must be [N, H, W], [N, H, W, C] or [N, H*W], "
                     f"got shape {x.shape}")
  return x


# --- checks shared by every loader ----------------------------------------------------------------
def _pixels(x: np.ndarray, what: str) -> np.ndarray:
  if x.dtype == np.uint8:
    return x
  if np.issubdtype(x.dtype, np.integer):
    if x.min() < 0 or x.max() > 255:
      raise ValueError(f"{what}: integer pixels must be in 0..255")
    return x.astype(np.uint8)
  x = x.astype(np.float32)
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{what}: images hold non-finite values")
  return x


def _finish(x_train, y_train, x_test, y_test, what: str) -> ImageData:
  y_train = np.asarray(y_train).reshape(-1)
  labels = [y_train] if y_test is None else [y_train, np.asarray(y_test).reshape(-1)]
  for y in labels:
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
      raise ValueError(f"{what}: labels must be integers >= 0")
  if len(x_train) != len(labels[0]) or (y_test is not None and len(x_test) != len(labels[1])):
    raise ValueError(f"{what}: images and labels differ in number")
  if x_test is not None and x_test.shape[1:] != x_train.shape[1:]:
    raise ValueError(f"{what}: train images {x_train.shape[1:]} and test images "
                     f"{x_test.shape[1:]} differ in shape")
  n_classes = int(max(int(y.max()) for y in labels)) + 1
  return ImageData(_pixels(x_train, what), labels[0].astype(np.int32),
                   None if x_test is None else _pixels(x_test, what),
                   None if y_test is None else labels[1].astype(np.int32), n_classes)


# --- embedded default and optional libraries ------------------------------------------------------
def load_digits() -> ImageData:
  from mesajax.tasks import digits
  x, y = digits.load()
  return ImageData(x.reshape(-1, 8, 8, 1), y, None, None, 10)


def _load_tfds(dataset: str, data_dir: str | None) -> ImageData:
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise ValueError("source='tfds' needs tensorflow_datasets installed") from None
  try:
    train, test = tfds.as_numpy(tfds.load(TFDS_NAMES[dataset], split=["train", "test"],
                                          batch_size=-1, data_dir=data_dir, download=False))
  except Exception as e:  # noqa: BLE001 - tfds raises many kinds; report one line
    raise ValueError(f"tfds: {dataset} is not in the local tensorflow_datasets cache "
                     f"({type(e).__name__}); prepare it once with tfds.builder(...)."
                     "download_and_prepare()") from None
  return _finish(train["image"], train["label"], test["image"], test["label"], dataset)


def _load_hf(dataset: str, data_dir: str | None) -> ImageData:
  try:
    import datasets as hf
  except ImportError:
    raise ValueError("source='hf' needs Hugging Face datasets installed") from None
  try:
    ds = hf.load_dataset(HF_NAMES[dataset], cache_dir=data_dir,
                         download_mode="reuse_dataset_if_exists")
  except Exception as e:  # noqa: BLE001
    raise ValueError(f"hf: {dataset} is not in the local Hugging Face cache "
                     f"({type(e).__name__}); load it once with datasets.load_dataset") from None

  def arrays(split):
    cols = ds[split].column_names
    image_col = "image" if "image" in cols else "img"
    x = np.stack([np.asarray(im) for im in ds[split][image_col]])
    return (x if x.ndim == 4 else x[..., None]), np.asarray(ds[split]["label"])

  (x_train, y_train), (x_test, y_test) = arrays("train"), arrays("test")
  return _finish(x_train, y_train, x_test, y_test, dataset)


def check_args(dataset: str, data_dir: str | None, source: str) -> None:
  """One-line ``ValueError`` for inconsistent ``(dataset, data_dir, source)`` (no file access)."""
  if dataset not in DATASETS:
    raise ValueError(f"dataset must be one of {list(DATASETS)}, got {dataset!r}")
  if source not in SOURCES:
    raise ValueError(f"source must be one of {list(SOURCES)}, got {source!r}")
  if data_dir is not None and not isinstance(data_dir, str):
    raise ValueError(f"data_dir must be a path string or None, got {data_dir!r}")
  if dataset == "digits" and (data_dir is not None or source != "files"):
    raise ValueError("dataset 'digits' is embedded: leave data_dir None and source 'files'")
  if dataset == "npz" and source != "files":
    raise ValueError("dataset 'npz' is read from a file: source must be 'files'")
  if source == "files" and dataset != "digits" and data_dir is None:
    raise ValueError(f"dataset {dataset!r} needs data_dir, the local folder holding its files "
                     "(nothing is downloaded)")


@functools.lru_cache(maxsize=8)
def load(dataset: str = "digits", data_dir: str | None = None, source: str = "files") -> ImageData:
  """The data set, loaded once per arguments (see the module docstring)."""
  check_args(dataset, data_dir, source)
  if dataset == "digits":
    return load_digits()
  if source == "tfds":
    return _load_tfds(dataset, data_dir)
  if source == "hf":
    return _load_hf(dataset, data_dir)
  data_dir = os.path.expanduser(data_dir)
  if dataset == "npz":
    return load_npz(data_dir)
  if dataset == "cifar10":
    return load_cifar10_dir(data_dir)
  return load_idx_dir(data_dir, dataset)


# --- writers (for tests and for converting other data to a readable format) ----------------------
def write_idx(path: str, array: np.ndarray) -> None:
  """Writes ``array`` (uint8) as an IDX file; gzipped when ``path`` ends in ``.gz``."""
  array = np.ascontiguousarray(array, np.uint8)
  header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  raw = header + array.tobytes()
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(raw)


def write_cifar_batch(path: str, images_NHWC: np.ndarray, labels: np.ndarray) -> None:
  """Writes a CIFAR-10 python batch (``{b"data": [N, 3072] uint8, b"labels": list}``)."""
  data = np.asarray(images_NHWC, np.uint8).transpose(0, 3, 1, 2).reshape(len(images_NHWC), -1)
  with open(path, "wb") as f:
    pickle.dump({b"data": data, b"labels": [int(v) for v in labels]}, f)
