"""Tests of avmae_jax/data/transforms.py against numpy computations of the spec formulas."""

import numpy as np
import pytest

tf = pytest.importorskip('tensorflow')

from avmae_jax.data import transforms as T  # pylint: disable=g-import-not-at-top

RNG = np.random.default_rng(1234)


def _fbank(b, t=64, f=16):
  return RNG.uniform(-15.0, 5.0, (b, t, f)).astype(np.float32)


def test_normalize_audio_cav_mae_and_mavil():
  x = _fbank(2)
  np.testing.assert_allclose(T.normalize_audio(x, -5.081, 4.4849).numpy(),
                             (x + 5.081) / 4.4849, rtol=1e-6)
  np.testing.assert_allclose(
      T.normalize_audio(x, -4.2677393, 4.5689974, 2.0).numpy(),
      (x + 4.2677393) / (2 * 4.5689974), rtol=1e-6)


def test_noise_and_roll_matches_numpy_torch_roll():
  x = _fbank(3)
  u = RNG.uniform(size=x.shape).astype(np.float32)
  scale = RNG.uniform(size=3).astype(np.float32)
  shifts = np.array([5, -64, 63], np.int32)
  got = T.add_noise_and_roll(x, u, scale, shifts).numpy()
  for i in range(3):
    # torch.roll(x, s, 0) == np.roll(x, s, axis=0).
    want = np.roll(x[i] + u[i] * scale[i] / 10, shifts[i], axis=0)
    np.testing.assert_allclose(got[i], want, rtol=1e-6)


def test_noise_draws_ranges():
  u, scale, shifts = (a.numpy() for a in T.noise_draws(64, 32, 4, [3, 4]))
  assert u.shape == (64, 32, 4) and 0 <= u.min() and u.max() < 1
  assert 0 <= scale.min() and scale.max() < 1
  assert shifts.min() >= -32 and shifts.max() < 32
  assert len(np.unique(shifts)) > 20


def _torchaudio_mask(size, param, u_value, u_start):
  """torchaudio.functional.mask_along_axis, written out in numpy float32."""
  value = np.float32(u_value) * np.float32(param)
  min_value = np.float32(u_start) * (np.float32(size) - value)
  start = int(min_value)
  end = start + int(value)
  m = np.zeros(size, bool)
  m[start:end] = True
  return m


def test_spec_augment_matches_torchaudio_formula():
  b, t, f = 4, 64, 16
  x = _fbank(b, t, f)
  u = RNG.uniform(size=(4, b)).astype(np.float32)
  fs, fe = T.mask_bounds(u[0], u[1], 6, f)
  ts, te = T.mask_bounds(u[2], u[3], 20, t)
  got = T.spec_augment(x, fs, fe, ts, te).numpy()
  for i in range(b):
    fm = _torchaudio_mask(f, 6, u[0, i], u[1, i])
    tm = _torchaudio_mask(t, 20, u[2, i], u[3, i])
    want = x[i].copy()
    want[:, fm] = 0.0
    want[tm, :] = 0.0
    np.testing.assert_array_equal(got[i], want)


def test_spec_augment_draws_widths_uniform_below_param():
  fs, fe, ts, te = (a.numpy() for a in T.spec_augment_draws(2000, 48, 192, 1024, 128,
                                                             [7, 8]))
  fw, tw = fe - fs, te - ts
  assert fw.min() >= 0 and fw.max() <= 47 and fw.max() >= 44
  assert tw.min() >= 0 and tw.max() <= 191 and tw.max() >= 185
  assert fs.min() >= 0 and fe.max() <= 128 and ts.min() >= 0 and te.max() <= 1024
  assert abs(fw.mean() - 23.5) < 2.0  # floor(U * 48) has mean 23.5.
  none = T.spec_augment_draws(8, 0, 0, 1024, 128, [1, 1])
  assert all(int(tf.reduce_sum(a)) == 0 for a in none)


def test_normalize_frames_imagenet():
  x = RNG.integers(0, 256, (2, 5, 5, 3)).astype(np.uint8)
  mean = np.array([0.485, 0.456, 0.406], np.float32)
  std = np.array([0.229, 0.224, 0.225], np.float32)
  np.testing.assert_allclose(T.normalize_frames(x).numpy(),
                             (x / 255.0 - mean) / std, rtol=1e-5, atol=1e-6)


def _reference_targets(y1, y2, lam, eps, mixed):
  """The reference dataloader's label loops (spec 3), one clip."""
  n = len(y1)
  out = np.zeros(n) + eps / n
  if not mixed:
    for k in np.flatnonzero(y1):
      out[k] = 1.0 - eps
    return out
  for k in np.flatnonzero(y1):
    out[k] += lam * (1.0 - eps)
  for k in np.flatnonzero(y2):
    out[k] += (1.0 - lam) * (1.0 - eps)
  return out


def test_labels_smoothing_and_mixing():
  y = (RNG.uniform(size=(4, 10)) < 0.3).astype(np.uint8)
  y[:, 0] = 1
  lam = RNG.uniform(size=4).astype(np.float32)
  partner = np.array([1, 2, 3, 0])
  for eps in (0.0, 0.1):
    got = T.smooth_labels(y, eps).numpy()
    for i in range(4):
      np.testing.assert_allclose(got[i], _reference_targets(y[i], None, 0, eps, False),
                                 rtol=1e-6)
    got = T.mix_labels(y, y[partner], lam, eps).numpy()
    for i in range(4):
      np.testing.assert_allclose(
          got[i], _reference_targets(y[i], y[partner[i]], lam[i], eps, True),
          rtol=1e-5, atol=1e-7)


def test_mix_log_mel_power_domain():
  a, b = _fbank(3), _fbank(3)
  lam = np.array([0.3, 0.5, 0.9], np.float32)
  got = T.mix_log_mel(a, b, lam).numpy()
  l = lam.astype(np.float64)[:, None, None]
  want = np.log(l**2 * np.exp(a.astype(np.float64)) +
                (1 - l)**2 * np.exp(b.astype(np.float64)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_mix_linear():
  a = RNG.normal(size=(3, 2, 4, 4, 3)).astype(np.float32)
  b = RNG.normal(size=(3, 2, 4, 4, 3)).astype(np.float32)
  lam = np.array([0.1, 0.5, 0.7], np.float32)
  l = lam[:, None, None, None, None]
  np.testing.assert_allclose(T.mix_linear(a, b, lam).numpy(), l * a + (1 - l) * b,
                             rtol=1e-6)


def test_mixup_draws_statistics():
  do_mix, lam, partner = (a.numpy() for a in T.mixup_draws(4000, 0.5, [5, 6]))
  assert abs(do_mix.mean() - 0.5) < 0.03
  # Beta(10, 10): mean 0.5, std sqrt(1 / (4 * 21)).
  assert abs(lam.mean() - 0.5) < 0.01
  assert abs(lam.std() - np.sqrt(1 / 84)) < 0.01
  assert np.all(partner != np.arange(4000)) and partner.min() >= 0
  assert partner.max() < 4000


def test_apply_mixup_only_changes_mixed_rows():
  b = 4
  a = _fbank(b)
  frames = RNG.normal(size=(b, 4, 4, 3)).astype(np.float32)
  y = np.eye(b, dtype=np.uint8)
  do_mix = np.array([True, False, True, False])
  lam = np.array([0.3, 0.4, 0.6, 0.8], np.float32)
  partner = np.array([1, 2, 3, 0], np.int32)
  ga, gf, gy = (x.numpy() for x in T.apply_mixup(a, frames, y, do_mix, lam, partner,
                                                 0.1))
  for i in range(b):
    j, l = partner[i], float(lam[i])
    if do_mix[i]:
      want_a = np.log(l**2 * np.exp(a[i].astype(np.float64)) +
                      (1 - l)**2 * np.exp(a[j].astype(np.float64)))
      np.testing.assert_allclose(ga[i], want_a, rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(gf[i], l * frames[i] + (1 - l) * frames[j], rtol=1e-5)
      np.testing.assert_allclose(gy[i], _reference_targets(y[i], y[j], l, 0.1, True),
                                 rtol=1e-5)
    else:
      np.testing.assert_array_equal(ga[i], a[i])
      np.testing.assert_array_equal(gf[i], frames[i])
      np.testing.assert_allclose(gy[i], _reference_targets(y[i], None, 0, 0.1, False),
                                 rtol=1e-6)


@pytest.mark.parametrize('spacing,stride', [(0.5, 1), (0.25, 2), (1.0, 1)])
def test_mavil_frame_indices(spacing, stride):
  n = int(round(10 / spacing))
  times = np.arange(n, dtype=np.float32) * spacing
  last_start = n - 1 - 7 * stride
  for u in (0.0, 0.5, 0.999):
    got = T.mavil_frame_indices(times, 8, 2.0, u).numpy()
    start = min(int(np.floor(u * (last_start + 1))), last_start)
    np.testing.assert_array_equal(got, start + np.arange(8) * stride)


def test_mavil_frame_indices_short_clip_repeats_last():
  got = T.mavil_frame_indices(np.arange(5, dtype=np.float32) * 0.5, 8, 2.0, 0.5).numpy()
  np.testing.assert_array_equal(got, [0, 1, 2, 3, 4, 4, 4, 4])


def test_stateless_beta_distribution():
  x = T.stateless_beta([5000], 2.0, 5.0, [1, 2]).numpy()
  assert abs(x.mean() - 2 / 7) < 0.01
  np.testing.assert_array_equal(x, T.stateless_beta([5000], 2.0, 5.0, [1, 2]).numpy())


def test_hash_uniform_statistics_and_keys():
  u = T.hash_uniform([64, 1024, 16], T.hash_keys([1, 2])).numpy()
  assert u.dtype == np.float32 and u.min() >= 0.0 and u.max() < 1.0
  assert abs(u.mean() - 0.5) < 2e-3 and abs(u.var() - 1 / 12) < 1e-3
  flat = u.ravel()
  assert abs(np.corrcoef(flat[:-1], flat[1:])[0, 1]) < 5e-3
  hist = np.histogram(flat, bins=16, range=(0, 1))[0] / flat.size
  np.testing.assert_allclose(hist, 1 / 16, atol=2e-3)
  other = T.hash_uniform([64, 1024, 16], T.hash_keys([1, 3])).numpy()
  assert abs(np.corrcoef(flat, other.ravel())[0, 1]) < 5e-3
  np.testing.assert_array_equal(u, T.hash_uniform([64, 1024, 16],
                                                  T.hash_keys([1, 2])).numpy())


def test_mix_log_mel_extreme_values_stay_finite_and_exact():
  a = np.full((2, 4, 3), -15.9424, np.float32)
  b = np.full((2, 4, 3), 25.0, np.float32)
  lam = np.array([0.999, 0.02], np.float32)
  got = T.mix_log_mel(a, b, lam).numpy()
  for i, l in enumerate(lam.astype(np.float64)):
    want = np.logaddexp(a[i] + 2 * np.log(l), b[i] + 2 * np.log(1 - l))
    np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-5)
  got = T.mix_log_mel(b, a, lam).numpy()
  for i, l in enumerate(lam.astype(np.float64)):
    want = np.logaddexp(b[i] + 2 * np.log(l), a[i] + 2 * np.log(1 - l))
    np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-5)
