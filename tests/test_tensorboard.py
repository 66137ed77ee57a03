"""TensorBoard scalars beside metrics.jsonl (``meta.tensorboard``; optional ``tensorboardX``)."""
import glob
import json
import os
import struct
import sys

import ml_collections
import pytest

from mesajax.meta import train as meta_train


def _config(on=True):
  return ml_collections.ConfigDict({"meta": {"tensorboard": on}})


def _events(logdir):
  """(tag, step, value) of every scalar in the event files (TFRecord framing read by hand)."""
  from tensorboardX.proto import event_pb2
  out = []
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    i = 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      i += 12 + n + 4
      for v in event.summary.value:
        out.append((v.tag, event.step, v.simple_value))
  return out


ROWS = [{"outer_step": 2, "meta_loss": 0.75, "grad_norm": 0.5, "skipped": False, "num_skipped": 0,
         "meta_loss_per_seed": [0.7, 0.8]},
        {"outer_step": 4, "meta_loss": None, "grad_norm": 2.0, "skipped": True, "num_skipped": 1,
         "nonfinite": ["meta_loss"], "meta_loss_per_seed": [None, 0.25]}]


def test_rows_become_scalars(tmp_path):
  pytest.importorskip("tensorboardX")
  metrics = str(tmp_path / "metrics.jsonl")
  scalars = meta_train.Scalars(_config(), str(tmp_path), start=0)
  for row in ROWS:
    meta_train._log(metrics, row, scalars)
  scalars.close()
  got = {(tag, step): value for tag, step, value in _events(str(tmp_path / "tensorboard"))}
  want = {("meta/meta_loss", 2): 0.75, ("meta/grad_norm", 2): 0.5, ("meta/skipped", 2): 0.0,
          ("meta/num_skipped", 2): 0.0, ("meta/meta_loss_per_seed/seed0", 2): 0.7,
          ("meta/meta_loss_per_seed/seed1", 2): 0.8,
          ("meta/grad_norm", 4): 2.0, ("meta/skipped", 4): 1.0, ("meta/num_skipped", 4): 1.0,
          ("meta/meta_loss_per_seed/seed1", 4): 0.25}
  assert set(got) == set(want)  # non-finite values (None) and lists of names are left out
  for k, v in want.items():
    assert got[k] == pytest.approx(v, rel=1e-6)
  with open(metrics) as f:  # the rows themselves are unchanged
    assert [json.loads(line) for line in f] == ROWS


def test_off_or_missing_writes_nothing(tmp_path, monkeypatch, capsys):
  scalars = meta_train.Scalars(_config(on=False), str(tmp_path), start=0)
  scalars.add(ROWS[0])
  assert scalars.writer is None and not os.path.exists(tmp_path / "tensorboard")
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # as if not installed
  scalars = meta_train.Scalars(_config(), str(tmp_path), start=0)
  assert scalars.writer is None and not os.path.exists(tmp_path / "tensorboard")
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "tensorboardX is not installed" in err[0]
