"""Tests of the tf.data input pipeline (avmae_jax/data/pipeline.py).

In-memory datasets of schema examples with small frames (frame_size 32) keep these
fast; one test reads a tiny prepared TFDS dataset written to a temporary directory.
Expected values are numpy computations of the spec formulas from the stored inputs.
"""

import gc
import hashlib
import json
import os
import subprocess
import sys
import weakref

import numpy as np
import pytest

tf = pytest.importorskip('tensorflow')

from avmae_jax.data import pipeline as P  # pylint: disable=g-import-not-at-top
from tests import _helpers  # pylint: disable=g-import-not-at-top

SIZE = 32
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def _examples(n, num_classes=None, num_frames=10, seed=0, labels=None, jpeg=False,
              spacing=1.0):
  """In-memory schema examples; frame k of clip i is filled with a known value."""
  rng = np.random.default_rng(seed)
  num_classes = num_classes or n
  fbank = rng.uniform(-12.0, 3.0, (n, 1024, 128)).astype(np.float16)
  frames = np.zeros((n, num_frames, SIZE, SIZE, 3), np.uint8)
  for i in range(n):
    for k in range(num_frames):
      frames[i, k] = (7 * i + 3 * k) % 251
  if labels is None:
    labels = np.zeros((n, num_classes), np.uint8)
    labels[np.arange(n), np.arange(n) % num_classes] = 1
  d = {
      'clip_id': np.array([f'c{i:03d}' for i in range(n)]),
      'fbank': fbank,
      'labels': labels,
      'frame_times': np.tile(np.arange(num_frames, dtype=np.float32) * spacing,
                             (n, 1)),
  }
  if jpeg:
    enc = [[tf.io.encode_jpeg(frames[i, k], quality=100).numpy()
            for k in range(num_frames)] for i in range(n)]
    d['frames'] = np.array(enc, dtype=object)
  else:
    d['frames'] = frames
  return d


def _ds(d):
  return tf.data.Dataset.from_tensor_slices(d)


def _config(stage='pretrain', mode='cav_mae', batch=4, **kw):
  c = P.default_data_config(stage, mode)
  c.batch_size = batch
  c.frame_size = SIZE
  c.shuffle_buffer = 16
  c.prefetch = 1
  for k, v in kw.items():
    c[k] = v
  return c


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _id(b):
  return [c.decode() for c in b['clip_id']]


# ----------------------------------------------------------------------------- eval numerics


def test_frame_resize_averages_pixel_blocks_and_crops_audio():
  d = _examples(4)
  rng = np.random.default_rng(1)
  d['frames'] = rng.integers(0, 256, d['frames'].shape).astype(np.uint8)
  c = _config('eval', batch=4, frame_resize=SIZE // 2, target_length=256)
  batch = next(P.create_iterator(c, _ds(d), process_index=0, process_count=1))
  assert batch['frames'].shape == (4, SIZE // 2, SIZE // 2, 3)
  assert batch['audio'].shape == (4, 256, 128)
  f5 = d['frames'][:, 5].astype(np.float64)
  pooled = np.round(f5.reshape(4, SIZE // 2, 2, SIZE // 2, 2, 3).mean(axis=(2, 4)))
  np.testing.assert_allclose(batch['frames'], (pooled / 255.0 - MEAN) / STD, atol=1e-5)
  with pytest.raises(ValueError, match='frame_resize'):
    P.create_iterator(_config('eval', frame_resize=-1), _ds(d), process_index=0,
                      process_count=1)




def test_eval_batches_match_spec_normalisation_and_frame_5():
  d = _examples(10)
  c = _config('eval', batch=4)
  it = P.create_iterator(c, _ds(d), process_index=0, process_count=1)
  batches = list(it)
  assert len(batches) == 3 and it.steps_per_epoch == 3
  ids = sum((_id(b) for b in batches), [])
  mask = np.concatenate([b['mask'] for b in batches])
  np.testing.assert_array_equal(mask, [1.0] * 10 + [0.0] * 2)
  assert ids[:10] == [f'c{i:03d}' for i in range(10)]  # One ordered pass.
  audio = np.concatenate([b['audio'] for b in batches])[:10]
  frames = np.concatenate([b['frames'] for b in batches])[:10]
  labels = np.concatenate([b['labels'] for b in batches])[:10]
  want_audio = (d['fbank'].astype(np.float32) - (-5.081)) / 4.4849
  np.testing.assert_allclose(audio, want_audio, rtol=1e-5, atol=1e-5)
  want_frames = (d['frames'][:, 5].astype(np.float32) / 255.0 - MEAN) / STD
  np.testing.assert_allclose(frames, want_frames, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(labels, d['labels'].astype(np.float32))
  assert batches[0]['audio'].shape == (4, 1024, 128)
  assert batches[0]['frames'].shape == (4, SIZE, SIZE, 3)


def test_eval_all_frames_and_frame_use_and_jpeg_decoding():
  d = _examples(3, jpeg=True)
  c = _config('eval', batch=3, eval_all_frames=True)
  (b,) = list(P.create_iterator(c, _ds(d), process_index=0, process_count=1))
  assert b['frames'].shape == (3, 10, SIZE, SIZE, 3)
  raw = _examples(3)['frames'].astype(np.float32)  # JPEG q100 of flat images.
  np.testing.assert_allclose(b['frames'], (raw / 255.0 - MEAN) / STD, atol=0.05)
  c = _config('eval', batch=3, frame_use=2)
  (b,) = list(P.create_iterator(c, _ds(d), process_index=0, process_count=1))
  np.testing.assert_allclose(b['frames'], (raw[:, 2] / 255.0 - MEAN) / STD, atol=0.05)


def test_mavil_mode_eval_centred_window_and_norm():
  d = _examples(2, num_frames=20, spacing=0.5)
  c = _config('eval', mode='mavil', batch=2)
  (b,) = list(P.create_iterator(c, _ds(d), process_index=0, process_count=1))
  assert b['frames'].shape == (2, 8, SIZE, SIZE, 3)
  # 20 frames at 2/s, 8 frames: starts 0..12, centred start floor(0.5 * 13) = 6.
  want = (d['frames'][:, 6:14].astype(np.float32) / 255.0 - MEAN) / STD
  np.testing.assert_allclose(b['frames'], want, rtol=1e-5, atol=1e-5)
  want_a = (d['fbank'].astype(np.float32) + 4.2677393) / (2 * 4.5689974)
  np.testing.assert_allclose(b['audio'], want_a, rtol=1e-5, atol=1e-5)


def test_mavil_mode_training_takes_consecutive_frames_at_random_starts():
  d = _examples(4, num_frames=20, spacing=0.5)
  c = _config('pretrain', mode='mavil', batch=4, noise=False, return_clip_id=True)
  it = P.create_iterator(c, _ds(d), process_index=0, process_count=1)
  starts = set()
  for b in _take(it, 4):
    assert b['frames'].shape == (4, 8, SIZE, SIZE, 3)
    for i, cid in enumerate(_id(b)):
      clip = int(cid[1:])
      pix = np.rint((b['frames'][i, :, 0, 0, 0] * STD[0] + MEAN[0]) * 255)
      k0 = [k for k in range(13) if (7 * clip + 3 * k) % 251 == pix[0]]
      assert len(k0) == 1
      np.testing.assert_array_equal(pix, [(7 * clip + 3 * (k0[0] + j)) % 251
                                          for j in range(8)])
      starts.add(k0[0])
  assert len(starts) >= 3


def test_bfloat16_output():
  c = _config('eval', batch=2, dtype='bfloat16')
  (b,) = list(P.create_iterator(c, _ds(_examples(2)), process_index=0, process_count=1))
  assert b['audio'].dtype.name == 'bfloat16' and b['frames'].dtype.name == 'bfloat16'
  assert b['labels'].dtype == np.float32


# ----------------------------------------------------------------------------- training transforms


@pytest.mark.parametrize('noise_rng', ['hash', 'philox'])
def test_pretrain_noise_and_roll_composition(noise_rng):
  d = _examples(8)
  c = _config('pretrain', batch=4, shuffle_buffer=0, return_clip_id=True,
              noise_rng=noise_rng)
  b = next(P.create_iterator(c, _ds(d), process_index=0, process_count=1))
  shifts = set()
  for i, cid in enumerate(_id(b)):
    norm = (d['fbank'][int(cid[1:])].astype(np.float32) + 5.081) / 4.4849
    got = b['audio'][i]
    # Find the roll: the residual got - roll(norm) lies in [0, 0.1) for the right one.
    col = np.stack([np.roll(norm[:, 0], s) for s in range(1024)])
    s = int(np.argmin(np.abs(got[None, :, 0] - col - 0.05).max(axis=1)))
    resid = got - np.roll(norm, s, axis=0)
    assert resid.min() >= -1e-5 and resid.max() < 0.1 + 1e-5
    assert resid.std() > 1e-4  # Noise was added.
    shifts.add(s)
  assert len(shifts) > 1


def test_training_frames_random_over_epochs_and_each_clip_once_per_epoch():
  d = _examples(8)
  c = _config('pretrain', batch=4, noise=False, return_clip_id=True)
  it = P.create_iterator(c, _ds(d), process_index=0, process_count=1)
  assert it.steps_per_epoch == 2
  chosen = set()
  for _ in range(6):  # 3 epochs.
    ids = []
    for _ in range(2):
      b = next(it)
      ids += _id(b)
      for i, cid in enumerate(_id(b)):
        k_values = [(7 * int(cid[1:]) + 3 * k) % 251 for k in range(10)]
        pix = b['frames'][i, 0, 0] * STD + MEAN
        k = int(np.argmin([abs(pix[0] * 255 - v) for v in k_values]))
        chosen.add(k)
    assert sorted(ids) == [f'c{i:03d}' for i in range(8)]
  assert len(chosen) >= 4


def test_finetune_mixup_power_domain_in_pipeline():
  n = 8
  d = _examples(n)
  c = _config('finetune', batch=4, mixup=1.0, label_smooth=0.0, noise=False,
              freqm=0, timem=0, return_clip_id=True)
  b = next(P.create_iterator(c, _ds(d), process_index=0, process_count=1))
  for i in range(4):
    nz = np.flatnonzero(b['labels'][i])
    assert len(nz) == 2  # Clip k has the single class k, its partner another.
    own = int(_id(b)[i][1:])
    other = int(nz[nz != own][0])
    lam = float(b['labels'][i, own])
    np.testing.assert_allclose(lam + b['labels'][i, other], 1.0, rtol=1e-6)
    a = d['fbank'][own].astype(np.float64)
    p = d['fbank'][other].astype(np.float64)
    mixed = np.log(lam**2 * np.exp(a) + (1 - lam)**2 * np.exp(p))
    np.testing.assert_allclose(b['audio'][i], (mixed + 5.081) / 4.4849,
                               rtol=1e-4, atol=1e-4)


def test_finetune_specaugment_masks_set_unnormalised_zero():
  c = _config('finetune', batch=4, mixup=0.0, noise=False)
  b = next(P.create_iterator(c, _ds(_examples(8)), process_index=0, process_count=1))
  masked_value = (0.0 + 5.081) / 4.4849
  for i in range(4):
    a = b['audio'][i]
    full_rows = np.all(np.isclose(a, masked_value), axis=1)
    full_cols = np.all(np.isclose(a, masked_value), axis=0)
    assert full_rows.sum() < 192 and full_cols.sum() < 48
  n = 8
  np.testing.assert_allclose(b['labels'].sum(axis=1), 0.9 + 0.1 * (n - 1) / n,
                             rtol=1e-5)


# ----------------------------------------------------------------------------- determinism, state


def test_same_seed_same_batches_different_seed_differs():
  d = _examples(12)
  c = _config('finetune', batch=4)
  runs = [_take(P.create_iterator(c, _ds(d), process_index=0, process_count=1), 7)
          for _ in range(2)]
  _assert_batches_equal(runs[0], runs[1])
  c.seed = 1
  other = _take(P.create_iterator(c, _ds(d), process_index=0, process_count=1), 7)
  assert not np.array_equal(other[0]['audio'], runs[0][0]['audio'])


def _digest(stage, n_batches):
  """SHA-256 over the first batches of a finetune/pretrain stream of fixed data."""
  c = _config(stage, batch=4, return_clip_id=True)
  it = P.create_iterator(c, _ds(_examples(12)), process_index=0, process_count=1)
  h = hashlib.sha256()
  for b in _take(it, n_batches):
    for k in sorted(b):
      h.update(np.ascontiguousarray(b[k]).tobytes() if b[k].dtype != object
               else b''.join(b[k]))
  return h.hexdigest()


@pytest.mark.slow
def test_same_seed_same_batches_across_processes():
  root = _helpers.ROOT
  code = ('from tests.data.test_pipeline import _digest; '
          'print(_digest("finetune", 5))')
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  out = subprocess.run([sys.executable, '-c', code], cwd=root, env=env, check=True,
                       capture_output=True, text=True, timeout=120).stdout
  assert out.strip().splitlines()[-1] == _digest('finetune', 5)


@pytest.mark.parametrize('stage', ['pretrain', 'finetune'])
def test_restore_mid_epoch_gives_same_continuation(stage):
  d = _examples(12)
  c = _config(stage, batch=4, return_clip_id=True)
  it = P.create_iterator(c, _ds(d), process_index=0, process_count=1)
  _take(it, 4)  # Epoch 1, batch 1 (3 steps per epoch).
  state = json.loads(json.dumps(it.get_state()))
  assert state['epoch'] == 1 and state['step'] == 1
  expected = _take(it, 5)  # Crosses into epoch 2.
  fresh = P.create_iterator(c, _ds(d), process_index=0, process_count=1)
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 5), expected)


def test_state_round_trips_through_orbax_checkpoint_manager(tmp_path):
  ocp = pytest.importorskip('orbax.checkpoint')
  d = _examples(12)
  c = _config('pretrain', batch=4)
  it = P.create_iterator(c, _ds(d), process_index=0, process_count=1)
  _take(it, 2)
  with ocp.CheckpointManager(str(tmp_path / 'ckpt')) as mngr:
    mngr.save(2, args=ocp.args.Composite(data=ocp.args.JsonSave(it.get_state())))
    mngr.wait_until_finished()
  expected = _take(it, 3)
  with ocp.CheckpointManager(str(tmp_path / 'ckpt')) as mngr:
    restored = mngr.restore(2, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
  fresh = P.create_iterator(c, _ds(d), process_index=0, process_count=1)
  fresh.set_state(restored['data'])
  _assert_batches_equal(_take(fresh, 3), expected)


def test_dropped_iterator_is_freed_without_garbage_collection():
  # An endless iterator left to the cyclic collector would keep its prefetch
  # threads running; the pipeline keeps itself out of reference cycles.
  it = P.create_iterator(_config('finetune', batch=4), _ds(_examples(8)),
                         process_index=0, process_count=1)
  next(it)
  ref = weakref.ref(it)
  gc.disable()
  try:
    del it
    assert ref() is None
  finally:
    gc.enable()


def test_restore_rejects_inconsistent_state():
  d = _examples(8)
  c = _config('pretrain', batch=4)
  state = P.create_iterator(c, _ds(d), process_index=0, process_count=1).get_state()
  c.batch_size = 2
  it = P.create_iterator(c, _ds(d), process_index=0, process_count=1)
  with pytest.raises(ValueError, match='global_batch_size'):
    it.set_state(state)


# ----------------------------------------------------------------------------- hosts


def test_two_hosts_disjoint_shards_cover_data():
  d = _examples(11)
  c = _config('eval', batch=4)
  seen, counts = [], []
  for host in range(2):
    it = P.create_iterator(c, _ds(d), process_index=host, process_count=2)
    batches = list(it)
    counts.append(len(batches))
    for b in batches:
      assert b['audio'].shape[0] == 2  # Per-host share of the global batch.
      seen.append([cid for cid, m in zip(_id(b), b['mask']) if m > 0])
  assert counts[0] == counts[1]  # Same number of eval steps on every host.
  host0 = set(sum(seen[:counts[0]], []))
  host1 = set(sum(seen[counts[0]:], []))
  assert not host0 & host1
  assert host0 | host1 == {f'c{i:03d}' for i in range(11)}


def test_two_hosts_training_read_only_their_shard():
  d = _examples(12)
  c = _config('pretrain', batch=4, return_clip_id=True)
  per_host = []
  for host in range(2):
    it = P.create_iterator(c, _ds(d), process_index=host, process_count=2)
    per_host.append({cid for b in _take(it, 9) for cid in _id(b)})
  assert not per_host[0] & per_host[1]
  assert per_host[0] | per_host[1] == {f'c{i:03d}' for i in range(12)}


# ----------------------------------------------------------------------------- balanced sampling


def test_balanced_weights_formula():
  labels = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1], [1, 0, 1]], np.uint8)
  counts = {0: 3, 1: 1, 2: 2}
  want = [sum(1000.0 / (counts[k] + 0.01) for k in np.flatnonzero(row))
          for row in labels]
  np.testing.assert_allclose(P.balanced_weights(labels), want, rtol=1e-12)


def test_balanced_sampling_evens_out_classes_deterministically():
  n = 40
  labels = np.zeros((n, 2), np.uint8)
  labels[:36, 0] = 1  # 90% class 0, 10% class 1.
  labels[36:, 1] = 1
  d = _examples(n, labels=labels)
  c = _config('pretrain', batch=8, balanced_sampling=True, noise=False)
  it = P.create_iterator(c, _ds(d), process_index=0, process_count=1)
  got = np.concatenate([b['labels'] for b in _take(it, 25)])  # 5 epochs.
  frac1 = got[:, 1].mean()
  assert 0.35 < frac1 < 0.65  # Without balancing it would be 0.1.
  again = P.create_iterator(c, _ds(d), process_index=0, process_count=1)
  np.testing.assert_array_equal(
      np.concatenate([b['labels'] for b in _take(again, 25)]), got)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize('field,value', [
    ('mode', 'clip'), ('freqm', -1), ('timem', 2000), ('mixup', 1.5),
    ('label_smooth', 1.0), ('dtype', 'float64'), ('batch_size', 0),
    ('frame_use', -3), ('num_frames', 10), ('norm_std', 0.0),
    ('noise_rng', 'mt19937'), ('eval_all_frames', True),
])
def test_bad_config_names_the_field(field, value):
  c = _config('pretrain')
  c[field] = value
  with pytest.raises(ValueError, match=f'config.data.{field}'):
    P.validate_config(c)


def test_batch_not_divisible_by_hosts():
  with pytest.raises(ValueError, match='batch_size'):
    P.create_iterator(_config(batch=5), _ds(_examples(8)), process_index=0,
                      process_count=2)


# ----------------------------------------------------------------------------- TFDS


def test_prepared_tfds_dataset_two_hosts_and_restore(tmp_path):
  from avmae_jax.data import benchmark  # pylint: disable=import-outside-toplevel
  builder_dir = benchmark.write_dataset(str(tmp_path), num_examples=10, num_classes=5,
                                        num_shards=2)
  c = _config('eval', batch=4, builder_dir=builder_dir, split='train')
  c.frame_size = 224
  ids = []
  for host in range(2):
    for b in P.create_iterator(c, process_index=host, process_count=2):
      ids += [cid for cid, m in zip(_id(b), b['mask']) if m > 0]
  assert sorted(ids) == [f'clip{i:06d}' for i in range(10)]
  c = _config('finetune', batch=2, builder_dir=builder_dir, split='train',
              return_clip_id=True)
  c.frame_size = 224
  it = P.create_iterator(c, process_index=0, process_count=1)
  assert it.steps_per_epoch == 5
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 4)
  fresh = P.create_iterator(c, process_index=0, process_count=1)
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 4), expected)


def test_frame_use_beyond_stored_frames_is_an_error():
  c = _config('eval', batch=2, frame_use=12)
  for jpeg in (False, True):  # Static frame count: at build time; JPEGs: at run time.
    it = P.create_iterator(c, _ds(_examples(2, jpeg=jpeg)), process_index=0,
                           process_count=1)
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError), match='frame_use'):
      next(it)


def test_data_config_module_does_not_import_tensorflow():
  code = ('import sys; from avmae_jax.data import config; '
          'config.validate_config(config.default_data_config("finetune", "mavil")); '
          'print(sorted(m for m in ("tensorflow", "tensorflow_datasets") '
          'if m in sys.modules))')
  root = _helpers.ROOT
  out = subprocess.run([sys.executable, '-c', code], cwd=root, check=True,
                       capture_output=True, text=True, timeout=60).stdout
  assert out.strip() == '[]'
