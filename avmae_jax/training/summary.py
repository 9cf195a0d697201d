"""Training metrics out: `metrics.jsonl` (one JSON object per logged step) and TensorBoard.

TensorBoard event files are written with the `tensorboard` package's own writer, so the
training side never imports TensorFlow. Only process 0 writes.
"""

import json
import math
import os
import time
from typing import Mapping, Optional

import jax

METRICS_FILE = "metrics.jsonl"


class MetricWriter:
  """Appends scalars to DIR/metrics.jsonl and DIR/tensorboard/ (process 0 only)."""

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, METRICS_FILE)
    self._events = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      if tensorboard:
        from tensorboard.summary.writer.event_file_writer import EventFileWriter  # pylint: disable=import-outside-toplevel
        self._events = EventFileWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: Mapping[str, float], kind: Optional[str] = None):
    if not self.enabled:
      return
    record = {"step": int(step)}
    if kind:
      record["kind"] = kind
    record.update({k: _plain(v) for k, v in scalars.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._events is not None:
      from tensorboard.compat.proto import event_pb2, summary_pb2  # pylint: disable=import-outside-toplevel
      prefix = f"{kind}/" if kind else ""
      values = [summary_pb2.Summary.Value(tag=prefix + k, simple_value=float(v))
                for k, v in record.items() if k not in ("step", "kind")
                and isinstance(v, (int, float))]
      self._events.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                             summary=summary_pb2.Summary(value=values)))
      self._events.flush()

  def close(self):
    if self._events is not None:
      self._events.close()


def _plain(value):
  value = float(value) if hasattr(value, "__float__") else value
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/inf
  return value


def read_metrics(workdir: str, kind: Optional[str] = None) -> list[dict]:
  """The records of DIR/metrics.jsonl (of one kind: None = training steps)."""
  with open(os.path.join(workdir, METRICS_FILE)) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [r for r in records if r.get("kind") == kind]
