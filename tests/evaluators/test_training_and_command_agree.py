"""The training loop's evaluation and `python -m avmae_jax.evaluate` give the same figures
for the same checkpoint (both use avmae_jax/evaluators): retrieval at the end of the train
command's demo run (the session's `demo_pretrain_workdir`), and classification averaged over
the 10 frames of each clip at the end of a fine-tuning run from it."""

import json
import math
import os
import subprocess
import sys

import pytest

from tests import _helpers

# The session's synthetic dataset (conftest.py), as the shared demo run reads it.
DATA = list(_helpers.DEMO_DATA_FLAGS)


def _small(config):
  _helpers.use_demo_data(config)
  config.batch_size = 8
  config.data.shuffle_buffer = 32
  config.log_every = 1
  return config


def _evaluate(config_spec, workdir, out, *flags):
  cmd = [sys.executable, "-m", "avmae_jax.evaluate", "--config", config_spec, *DATA,
         "--workdir", out, "--checkpoint", workdir, *flags]
  result = subprocess.run(cmd, cwd=_helpers.ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


@pytest.mark.slow
def test_training_evaluation_and_the_evaluate_command_agree(tmp_path, synthetic_data_dir,
                                                           demo_pretrain_workdir, capsys):
  from avmae_jax import config_args, train  # pylint: disable=import-outside-toplevel
  from avmae_jax.training import summary  # pylint: disable=import-outside-toplevel
  data_dir, pre = synthetic_data_dir, demo_pretrain_workdir
  demo = f"demo.py:data_dir={data_dir}"
  # The train command's evaluation at the last step of the shared demo run.
  (during,) = summary.read_metrics(pre, kind="eval")
  assert during["step"] == 8 and during["num_clips"] == 8 and "eval_loss_mae_a" in during
  _evaluate(_helpers.config_path(demo), pre, str(tmp_path / "eval_pre"), "--task", "retrieval")
  with open(tmp_path / "eval_pre" / "eval_retrieval.json") as f:
    command = json.load(f)
  for key in ("num_clips", "a2v_r1", "a2v_r5", "a2v_r10", "a2v_median_rank", "v2a_r1",
              "v2a_r5", "v2a_r10", "v2a_median_rank"):
    assert command[key] == during[key], key

  # Fine-tuning from that run: the final evaluation (the last model: no weight averaging in
  # 2 steps) averages the outputs over all 10 frames.
  finetune = _helpers.config_path(f"demo_finetune.py:data_dir={data_dir},steps=2,init_from={pre}")
  ft = str(tmp_path / "ft")
  train.train(_small(config_args.load_config(finetune)), ft)
  assert "held-out classification on 8 clips (multimodal, last model, 10 frames per clip)" \
      in capsys.readouterr().out
  with open(os.path.join(ft, "final_eval.json")) as f:
    final = json.load(f)
  assert final["frames"] == 10 and final["model"] == "last"
  assert len(final["per_class_ap"]["multimodal"]) == 8
  _evaluate(finetune, ft, str(tmp_path / "eval_ft"), "--task", "classify", "--average_frames")
  with open(tmp_path / "eval_ft" / "eval_classify_multimodal.json") as f:
    command = json.load(f)
  assert command["frames_averaged"] == 10 and command["activation"] == "softmax"
  assert command["num_clips"] == final["num_clips"] == 8
  for name in ("mAP", "mAUC", "d_prime", "accuracy"):
    assert command[name] == final[f"eval_{name}"], name
  assert [None if math.isnan(ap) else ap for ap in command["per_class_ap"]] == (
      final["per_class_ap"]["multimodal"])
