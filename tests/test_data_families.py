"""Real-data task families: the format readers on small files written here in each format, the
image families (MLP, task-augmented mixture) and the character-level language model."""
import gzip
import os

import jax
import numpy as np
import pytest

from mesajax.registry import make_task_family
from mesajax.tasks import datasets, images

N_TASKS, GD_STEPS = 2, 3


def _fake_images(rng, n, h, w, c=None):
  shape = (n, h, w) if c is None else (n, h, w, c)
  return rng.integers(0, 256, size=shape, dtype=np.uint8)


def _write_idx_dir(path, gz, rng, n_train=30, n_test=20, side=10):
  os.makedirs(path, exist_ok=True)
  arrays = (_fake_images(rng, n_train, side, side), rng.integers(0, 10, n_train).astype(np.uint8),
            _fake_images(rng, n_test, side, side), rng.integers(0, 10, n_test).astype(np.uint8))
  for name, arr in zip(datasets.IDX_FILES, arrays):
    datasets.write_idx(os.path.join(path, name + (".gz" if gz else "")), arr)
  return arrays


def _clear_cache():
  datasets.load.cache_clear()


@pytest.fixture(autouse=True)
def _fresh_cache():
  _clear_cache()
  yield
  _clear_cache()


# --- format readers ------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
def test_idx_reader_round_trip(tmp_path, gz):
  rng = np.random.default_rng(0)
  x_train, y_train, x_test, y_test = _write_idx_dir(str(tmp_path), gz, rng)
  if gz:  # really gzipped on disk
    with open(tmp_path / "train-images-idx3-ubyte.gz", "rb") as f:
      assert f.read(2) == b"\x1f\x8b"
    assert gzip.decompress((tmp_path / "train-images-idx3-ubyte.gz").read_bytes())[:4] == bytes(
        [0, 0, 8, 3])
  ds = datasets.load("mnist", str(tmp_path))
  np.testing.assert_array_equal(ds.x_train[..., 0], x_train)
  np.testing.assert_array_equal(ds.y_train, y_train)
  np.testing.assert_array_equal(ds.x_test[..., 0], x_test)
  np.testing.assert_array_equal(ds.y_test, y_test)
  assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int32
  assert ds.image_shape == (10, 10, 1) and ds.n_classes == int(max(y_train.max(), y_test.max())) + 1


def test_idx_reader_rejects_bad_files(tmp_path):
  bad = tmp_path / "bad"
  bad.write_bytes(b"\x00\x00\x08\x01" + np.asarray([5], ">u4").tobytes() + b"abc")  # 3 of 5 bytes
  with pytest.raises(ValueError, match="IDX header"):
    datasets.read_idx(str(bad))
  bad.write_bytes(b"PK\x03\x04junk")
  with pytest.raises(ValueError, match="magic"):
    datasets.read_idx(str(bad))


def test_cifar_reader_round_trip(tmp_path):
  rng = np.random.default_rng(1)
  folder = tmp_path / "cifar-10-batches-py"  # the tarball's folder, found from its parent
  folder.mkdir()
  batches = []
  for name in datasets.CIFAR_FILES:
    x, y = _fake_images(rng, 6, 32, 32, 3), rng.integers(0, 10, 6)
    datasets.write_cifar_batch(str(folder / name), x, y)
    batches.append((x, y))
  ds = datasets.load("cifar10", str(tmp_path))
  np.testing.assert_array_equal(ds.x_train, np.concatenate([b[0] for b in batches[:5]]))
  np.testing.assert_array_equal(ds.y_train, np.concatenate([b[1] for b in batches[:5]]))
  np.testing.assert_array_equal(ds.x_test, batches[5][0])
  assert ds.image_shape == (32, 32, 3)
  # The channel layout is CIFAR's: 1024 red, then green, then blue values, row-major.
  row = datasets.read_cifar_batch(str(folder / "test_batch"))[0][0]
  np.testing.assert_array_equal(row[0, 1], batches[5][0][0, 0, 1])


def test_npz_reader_layouts(tmp_path):
  rng = np.random.default_rng(2)
  flat = tmp_path / "flat.npz"
  np.savez(flat, x_train=rng.random((12, 16)).astype(np.float32), y_train=np.arange(12) % 3,
           x_test=rng.random((5, 16)).astype(np.float32), y_test=np.arange(5) % 3)
  ds = datasets.load("npz", str(flat))
  assert ds.image_shape == (4, 4, 1) and ds.x_train.dtype == np.float32 and ds.n_classes == 3
  folder = tmp_path / "folder"
  folder.mkdir()
  np.savez(folder / "only.npz", x_train=_fake_images(rng, 8, 5, 5, 3), y_train=np.arange(8) % 2,
           x_test=_fake_images(rng, 4, 5, 5, 3), y_test=np.arange(4) % 2)
  ds = datasets.load("npz", str(folder))  # a folder holding exactly one .npz
  assert ds.image_shape == (5, 5, 3) and ds.x_train.dtype == np.uint8
  np.savez(tmp_path / "partial.npz", x_train=np.zeros((2, 4)), y_train=np.zeros(2, int))
  with pytest.raises(ValueError, match="lacks"):
    datasets.load("npz", str(tmp_path / "partial.npz"))


@pytest.mark.parametrize("dataset,pattern", [
    ("mnist", "put train-images-idx3-ubyte.*t10k-labels-idx1-ubyte"),
    ("fashion_mnist", "put train-images-idx3-ubyte"),
    ("cifar10", "put the python batches data_batch_1"),
    ("npz", "no file"),
])
def test_missing_files_one_clear_line(tmp_path, dataset, pattern):
  with pytest.raises(ValueError, match=pattern) as err:
    make_task_family("image_mlp", {"dataset": dataset, "data_dir": str(tmp_path / "absent")})
  assert "\n" not in str(err.value) and "nothing is downloaded" in str(err.value) or \
      dataset == "npz"


@pytest.mark.parametrize("knobs,pattern", [
    ({"dataset": "mnist"}, "needs data_dir"),
    ({"dataset": "svhn"}, "dataset must be one of"),
    ({"source": "web"}, "source must be one of"),
    ({"data_dir": "/tmp"}, "embedded"),
    ({"image_size": 1}, "image_size"),
    ({"width": 0}, "width"),
    ({"depth": -1}, "depth"),
    ({"standardize": 1}, "standardize"),
    ({"n_train": 1500, "n_val": 500}, "no test split"),
])
def test_image_mlp_rejects_bad_knobs(knobs, pattern):
  with pytest.raises(ValueError, match=pattern) as err:
    make_task_family("image_mlp", knobs)
  assert "\n" not in str(err.value)


@pytest.mark.parametrize("knobs,pattern", [
    ({"widths": ()}, "widths"), ({"widths": (0, 4)}, "widths"), ({"image_sizes": (1,)},
                                                                  "image_sizes"),
    ({"grad_scale": 0.5}, "grad_scale"),
])
def test_mixture_rejects_bad_knobs(knobs, pattern):
  with pytest.raises(ValueError, match=pattern):
    make_task_family("image_mlp_mixture", knobs)


def test_optional_sources_fail_cleanly_when_absent():
  for source, module in (("tfds", "tensorflow_datasets"), ("hf", "datasets")):
    try:
      __import__(module)
      continue  # installed: its loader is exercised by users with a local cache
    except ImportError:
      pass
    with pytest.raises(ValueError, match=f"source='{source}' needs"):
      make_task_family("image_mlp", {"dataset": "mnist", "source": source})


# --- the families on written files ------------------------------------------------------------------
def _run(family, key):
  """Sample, init, losses, gradients and a few full-batch GD steps, vmapped over tasks."""
  k_task, k_init, k_loss = jax.random.split(key, 3)
  tasks = family.sample_batch(k_task, N_TASKS)
  params = jax.vmap(family.init)(jax.random.split(k_init, N_TASKS), tasks)
  keys = jax.random.split(k_loss, N_TASKS)
  out = {"train": jax.vmap(family.train_loss)(params, tasks, keys),
         "outer": jax.vmap(family.outer_loss)(params, tasks, keys),
         "train_full": jax.vmap(family.train_loss_full)(params, tasks)}
  for name, phi in family.proxies().items():
    out[name] = jax.vmap(phi)(params, tasks)

  def gd_step(p, _):
    g = jax.vmap(jax.grad(family.train_loss_full))(p, tasks)
    return jax.tree.map(lambda a, b: a - family.gd_lr * b, p, g), None

  final, _ = jax.lax.scan(gd_step, params, None, length=GD_STEPS)
  out["after_gd"] = jax.vmap(family.train_loss_full)(final, tasks)
  return tasks, out


def _check_run(family):
  tasks, out = jax.jit(lambda k: _run(family, k))(jax.random.PRNGKey(0))
  for what, v in out.items():
    assert v.shape == (N_TASKS,) and np.all(np.isfinite(v)), (what, v)
  assert np.all(out["after_gd"] < out["train_full"]), out
  return tasks


def test_image_mlp_on_idx_files_resized_and_standardised(tmp_path):
  rng = np.random.default_rng(3)
  x_train, y_train, x_test, y_test = _write_idx_dir(str(tmp_path), True, rng)
  family = make_task_family("image_mlp", {
      "dataset": "fashion_mnist", "data_dir": str(tmp_path), "image_size": 8, "width": 8,
      "n_train": 20, "n_val": 12, "batch_size": 8})
  assert family.arch.in_dim == 64 and family.num_params() == 64 * 8 + 8 + 8 * 10 + 10
  tasks, raw = jax.jit(lambda k: (family.sample_batch(k, N_TASKS), family._raw_images(k)))(
      jax.random.PRNGKey(4))
  assert tasks["x_train"].shape == (N_TASKS, 20, 64) and tasks["x_val"].shape == (N_TASKS, 12, 64)
  x = np.asarray(tasks["x_train"][0])
  assert abs(x.mean()) < 1e-4 and abs(x.std() - 1.0) < 1e-3  # standardised on its training rows
  # Labels are the files' labels of distinct rows (train from the train file, val from test).
  for xs, ys, pool_x, pool_y in ((raw[0], raw[1], x_train, y_train), (raw[2], raw[3], x_test,
                                                                      y_test)):
    xs = np.round(np.asarray(xs)[..., 0] * 255.0).astype(np.uint8)
    rows = [int(np.flatnonzero((pool_x == xi).all(axis=(1, 2)))[0]) for xi in xs]
    assert len(set(rows)) == len(rows)
    np.testing.assert_array_equal(np.asarray(ys), pool_y[rows])


def test_image_mlp_on_cifar_and_npz(tmp_path):
  rng = np.random.default_rng(5)
  for name in datasets.CIFAR_FILES:
    datasets.write_cifar_batch(str(tmp_path / name), _fake_images(rng, 8, 32, 32, 3),
                               rng.integers(0, 10, 8))
  family = make_task_family("image_mlp", {
      "dataset": "cifar10", "data_dir": str(tmp_path), "image_size": 4, "width": 6,
      "n_train": 16, "n_val": 8, "batch_size": 4, "depth": 2})
  assert family.arch.in_dim == 4 * 4 * 3
  out = jax.eval_shape(lambda k: family.sample_batch(k, N_TASKS), jax.random.PRNGKey(0))
  assert out["x_train"].shape == (N_TASKS, 16, 48)
  path = tmp_path / "d.npz"
  np.savez(path, x_train=rng.random((30, 6, 6)).astype(np.float32), y_train=np.arange(30) % 4,
           x_test=rng.random((10, 6, 6)).astype(np.float32), y_test=np.arange(10) % 4)
  family = make_task_family("image_mlp", {"dataset": "npz", "data_dir": str(path), "width": 5,
                                          "n_train": 20, "n_val": 10, "standardize": False})
  tasks = jax.jit(lambda k: family.sample_batch(k, N_TASKS))(jax.random.PRNGKey(6))
  assert family.arch.n_classes == 4 and tasks["x_train"].shape == (N_TASKS, 20, 36)
  assert float(tasks["x_train"].min()) >= 0.0 and float(tasks["x_train"].max()) <= 1.0


def test_image_mlp_digits_default_smoke_and_shifts():
  pytest.importorskip("sklearn")
  cls = images.ImageMLP
  family = make_task_family("image_mlp", cls.test_kwargs)
  tasks = _check_run(family)
  assert tasks["x_train"].shape == (N_TASKS, 48, 64)
  knobs = family.knobs()
  assert set(cls.test_shift) | set(cls.file_knobs) == set(knobs)
  for knob, value in cls.test_shift.items():
    shifted = family.replace(**{knob: value})
    assert value != knobs[knob]
    out = jax.eval_shape(lambda k: shifted.sample_batch(k, N_TASKS), jax.random.PRNGKey(0))
    assert out["x_train"].shape[0] == N_TASKS
  family.replace(**cls.test_shift)
  # The ~1e5-parameter task: digits resized to 28x28, one hidden layer of 128 units.
  big = make_task_family("image_mlp", {"image_size": 28, "width": 128})
  shapes = jax.eval_shape(big.init, jax.random.PRNGKey(0), None)
  assert sum(s.size for s in jax.tree.leaves(shapes)) == big.num_params() == 101_770


def test_distinct_indices_large_pool():
  idx = jax.jit(lambda k: jax.vmap(lambda kk: images.distinct_indices(kk, 60_000, 5_000))(
      jax.random.split(k, 3)))(jax.random.PRNGKey(7))
  idx = np.asarray(idx)
  for row in idx:
    assert len(np.unique(row)) == 5_000 and row.min() >= 0 and row.max() < 60_000
  assert len(np.intersect1d(idx[0], idx[1])) < 2_000  # different tasks, different subsets


def test_mixture_masks_widths_sizes_and_scales():
  pytest.importorskip("sklearn")
  cls = images.ImageMLPMixture
  family = make_task_family("image_mlp_mixture", {**cls.test_kwargs, "widths": (4, 8),
                                                  "image_sizes": (4, 8), "grad_scale": 4.0})
  tasks = jax.jit(lambda k: family.sample_batch(k, 64))(jax.random.PRNGKey(8))
  widths = np.asarray(tasks["mask"]).sum(1)
  assert set(widths) == {4.0, 8.0}
  scale = np.asarray(tasks["scale"])
  assert scale.min() >= 0.25 - 1e-6 and scale.max() <= 4.0 + 1e-6 and scale.std() > 0.1
  # Small inputs are zero-padded: the padded pixels are exactly zero in some tasks only.
  x = np.asarray(tasks["x_train"]).reshape(64, -1, 8, 8)
  padded = np.all(x[:, :, 4:, :] == 0, axis=(1, 2, 3))
  assert 0 < padded.sum() < 64
  # Masked hidden units and padded inputs get zero gradient; the training loss is scaled.
  one = jax.tree.map(lambda a: a[0], tasks)
  params = family.init(jax.random.PRNGKey(9), one)
  g = jax.grad(family.train_loss_full)(params, one)
  w = int(widths[0])
  assert np.all(np.asarray(g["out"]["kernel"])[w:] == 0) and np.any(
      np.asarray(g["out"]["kernel"])[:w] != 0)
  unscaled = family.train_loss_full(params, one) / one["scale"]
  assert float(unscaled) == pytest.approx(float(family.replace(grad_scale=1.0).outer_loss_full(
      params, {**one, "x_val": one["x_train"], "y_val": one["y_train"]})), rel=1e-5)
  knobs = family.knobs()
  assert set(cls.test_shift) | set(cls.file_knobs) == set(knobs)
  for knob, value in cls.test_shift.items():
    shifted = family.replace(**{knob: value})
    jax.eval_shape(lambda k: shifted.sample_batch(k, N_TASKS), jax.random.PRNGKey(0))


@pytest.mark.slow
@pytest.mark.parametrize("which", ["idx", "cifar", "mixture"])
def test_families_gd_run_slow(tmp_path, which):
  """Losses, proxies and full-batch GD through jit/vmap on the other data paths."""
  rng = np.random.default_rng(10)
  if which == "idx":
    _write_idx_dir(str(tmp_path), False, rng)
    knobs = {"dataset": "mnist", "data_dir": str(tmp_path), "image_size": 16, "n_train": 20,
             "n_val": 12, "width": 8}
  elif which == "cifar":
    for name in datasets.CIFAR_FILES:
      datasets.write_cifar_batch(str(tmp_path / name), _fake_images(rng, 8, 32, 32, 3),
                                 rng.integers(0, 10, 8))
    knobs = {"dataset": "cifar10", "data_dir": str(tmp_path), "image_size": 8, "n_train": 16,
             "n_val": 8, "width": 8}
  else:
    pytest.importorskip("sklearn")
    _check_run(make_task_family("image_mlp_mixture", images.ImageMLPMixture.test_kwargs))
    return
  _check_run(make_task_family("image_mlp", knobs))


# --- character-level language model ------------------------------------------------------------------
def test_charlm_default_text_smoke_and_shifts():
  from mesajax.tasks import charlm
  tokens = charlm.load_text(None)
  assert 400_000 < len(tokens) < 600_000 and tokens.max() < charlm.VOCAB
  cls = charlm.CharLM
  family = make_task_family("charlm", cls.test_kwargs)
  tasks = _check_run(family)
  assert tasks["x_train"].shape == (N_TASKS, 16, 9) and tasks["x_val"].shape == (N_TASKS, 8, 9)
  assert make_task_family("charlm").num_params() == 22_112
  knobs = family.knobs()
  assert set(cls.test_shift) | set(cls.file_knobs) == set(knobs)
  for knob, value in cls.test_shift.items():
    shifted = family.replace(**{knob: value})
    assert value != knobs[knob]
    out = jax.eval_shape(lambda k: shifted.outer_loss_full(
        shifted.init(k, None), shifted.sample(k)), jax.random.PRNGKey(0))
    assert out.shape == ()


def test_charlm_windows_from_the_right_slices_and_causal(tmp_path):
  from mesajax.tasks import charlm
  text = "".join(chr(97 + (i * 7919 % 26)) for i in range(900)) + "é" * 100  # non-ASCII -> ?
  path = tmp_path / "t.txt"
  path.write_text(text, encoding="utf-8")
  family = make_task_family("charlm", {"text_file": str(path), "seq_len": 6, "n_train": 30,
                                       "n_val": 20, "d_model": 8, "val_fraction": 0.2})
  tokens = charlm.load_text(str(path))
  assert len(tokens) == 1000 and set(tokens[900:]) == {ord("?")}
  task = jax.jit(family.sample)(jax.random.PRNGKey(1))
  raw = tokens.tobytes()
  for split, (lo, hi) in (("x_train", (0, 800)), ("x_val", (800, 1000))):
    for w in np.asarray(task[split]):
      pos = raw.find(bytes(w.astype(np.uint8)), lo)
      assert lo <= pos and pos + len(w) <= hi, (split, pos)
  params = family.init(jax.random.PRNGKey(2), task)
  x = task["x_train"][:2, :-1]
  y = x.at[:, 4:].set(5)  # change the future: earlier logits must not move
  a, b = jax.jit(lambda p, x, y: (charlm.apply(p, family.arch, x), charlm.apply(
      p, family.arch, y)))(params, x, y)
  np.testing.assert_allclose(a[:, :4], b[:, :4], atol=1e-5)
  assert np.abs(np.asarray(a[:, 4:] - b[:, 4:])).max() > 1e-4
  with pytest.raises(ValueError, match="no text file") as err:
    make_task_family("charlm", {"text_file": str(tmp_path / "absent.txt")})
  assert "\n" not in str(err.value)
  for knobs in ({"d_model": 6, "n_heads": 4}, {"val_fraction": 0.0}, {"seq_len": 1},
                {"text_file": str(path), "seq_len": 300}):
    with pytest.raises(ValueError):
      make_task_family("charlm", knobs)


# --- benchmark sweep --------------------------------------------------------------------------------
def test_sweep_cells_and_table():
  import ml_collections
  from mesajax import bench
  config = ml_collections.ConfigDict({"meta": {"num_tasks": 8}})
  cells = bench.sweep_cells(config, (32, 48), devices=(1,))
  assert cells == [{"num_tasks": 32, "num_devices": 1}, {"num_tasks": 48, "num_devices": 1}]
  assert all(c["num_devices"] <= jax.device_count() for c in bench.sweep_cells(config, (64,)))
  with pytest.raises(ValueError, match="available"):
    bench.sweep_cells(config, (32,), devices=(jax.device_count() + 1,))
  config.meta.num_seeds = 1  # seeds are swept only where the trainer has meta.num_seeds
  cells = bench.sweep_cells(config, (32,), seeds=(1, 4), devices=(1,))
  assert [c["num_seeds"] for c in cells] == [1, 4]
  table = bench.markdown_table([{"num_tasks": 32, "num_devices": 1, "estimator": "pes",
                                 "compile_s": 4.21, "outer_steps_per_s": 12.5,
                                 "inner_steps_per_s": 40000.0},
                                {"num_tasks": 4096, "error": "MemoryError: x"}])
  lines = table.strip().splitlines()
  assert len(lines) == 4 and "| 32 |" in lines[2] and "40,000" in lines[2]
  assert "MemoryError" in lines[3]
  assert bench._ints("32,64", ()) == (32, 64)
  with pytest.raises(ValueError):
    bench._ints("0,a", ())


@pytest.mark.slow
def test_sweep_runs_and_writes_table(tmp_path):
  from configs.quickstart import get_config
  from mesajax import bench
  from mesajax.config import resolve
  config = resolve(get_config("smoke"))
  out = tmp_path / "sweep.md"
  rows = bench.run_sweep(config, bench.sweep_cells(config, (2, 4), devices=(1,)), steps=1,
                         out=str(out), log=lambda _: None)
  assert [r["num_tasks"] for r in rows] == [2, 4] and all(r["inner_steps_per_s"] > 0 for r in rows)
  assert out.read_text().count("\n| ") == 3 and (tmp_path / "sweep.json").exists()
