"""Tests of the Kaldi filterbank and audio decoding against independent references.

References: kaldi-native-fbank (a C++ Kaldi port, <= 126 bins) and a float64 numpy derivation
of the torchaudio algorithm written here from the Kaldi formulas, loop by loop.
"""

import os
import time

import numpy as np
import pytest

from avmae_jax.data import audio
from avmae_jax.data import synthetic
from tests import _helpers

SAMPLES = _helpers.SAMPLES
CLIPS = sorted(SAMPLES.glob("*.mp4"))
TOL = 1e-3


def _knf_fbank(wave, num_bins):
  knf = pytest.importorskip("kaldi_native_fbank")
  opts = knf.FbankOptions()
  opts.frame_opts.dither = 0.0
  opts.frame_opts.window_type = "hanning"
  opts.frame_opts.samp_freq = 16000
  opts.frame_opts.snip_edges = True
  opts.mel_opts.num_bins = num_bins
  opts.use_energy = False
  opts.htk_compat = True
  fb = knf.OnlineFbank(opts)
  fb.accept_waveform(16000, np.asarray(wave, np.float32).tolist())
  fb.input_finished()
  return np.stack([fb.get_frame(i) for i in range(fb.num_frames_ready)])


def _float64_fbank(wave, num_bins=128, sr=16000.0):
  """torchaudio.compliance.kaldi.fbank (reference arguments) re-derived in float64."""
  wave = np.asarray(wave, np.float64)
  win, hop, nfft = 400, 160, 512
  n = 1 + (len(wave) - win) // hop
  hann = np.array([0.5 - 0.5 * np.cos(2 * np.pi * i / (win - 1)) for i in range(win)])
  mel = lambda f: 1127.0 * np.log(1.0 + f / 700.0)  # pylint: disable=unnecessary-lambda-assignment
  lo, hi = mel(20.0), mel(sr / 2)
  step = (hi - lo) / (num_bins + 1)
  filt = np.zeros((num_bins, nfft // 2 + 1))
  for m in range(num_bins):
    left, centre, right = lo + m * step, lo + (m + 1) * step, lo + (m + 2) * step
    for k in range(nfft // 2):  # the Nyquist bin stays 0, as in torchaudio
      z = mel(k * sr / nfft)
      if left < z < right:
        filt[m, k] = (z - left) / (centre - left) if z <= centre else (right - z) / (right - centre)
  out = np.empty((n, num_bins))
  for t in range(n):
    x = wave[t * hop:t * hop + win].copy()
    x -= x.mean()
    x = np.concatenate([[x[0] - 0.97 * x[0]], x[1:] - 0.97 * x[:-1]])
    spec = np.abs(np.fft.rfft(x * hann, nfft)) ** 2
    out[t] = np.log(np.maximum(filt @ spec, np.finfo(np.float32).eps))
  return out, filt


def _signals():
  rng = np.random.default_rng(0)
  t = np.arange(48000) / 16000.0
  floor = 3e-3 * rng.standard_normal(48000)
  sweep = 0.5 * np.sin(2 * np.pi * (50 * t + 1300 * t**2)) + floor  # 50 Hz -> 7.85 kHz
  clicks = np.zeros(48000)
  clicks[::4000] = 0.9
  scene = synthetic.synthesize_audio(synthetic.draw_scene(3, "train", 5, seconds=3.0))
  return {"sweep": sweep, "noise": 0.1 * rng.standard_normal(48000),
          "clicks": clicks + 1e-3 * rng.standard_normal(48000), "scene": scene}


@pytest.fixture(scope="module")
def sample_waves():
  if not CLIPS:
    pytest.skip(f"official samples not found under {SAMPLES}")
  return {p.name: audio.load_audio(p) for p in CLIPS}


def test_filters_match_float64_derivation_and_empty_bin():
  _, filt = _float64_fbank(np.zeros(400))
  ours = audio.mel_filters()
  assert ours.shape == (257, 128)
  # float32 mel values near 2800 carry ~2e-4 rounding over an ~18 mel slope: ~1e-5.
  np.testing.assert_allclose(ours.T, filt, atol=1e-4)
  empty = np.flatnonzero(ours.sum(axis=0) == 0)
  assert empty.tolist() == np.flatnonzero(filt.sum(axis=1) == 0).tolist()
  assert len(empty) == 1


@pytest.mark.parametrize("name", ["sweep", "noise", "clicks", "scene"])
def test_fbank_synthetic_signals(name):
  wave = _signals()[name].astype(np.float32)
  ours = audio.kaldi_fbank(wave)
  ref, filt = _float64_fbank(wave)
  assert ours.shape == ref.shape == (1 + (len(wave) - 400) // 160, 128)
  # Against float64, cells more than e^12 (~1.6e5) below their frame's strongest are left out:
  # float32 FFT rounding (torchaudio's as much as ours) is that large relative to them.
  strong = ref >= ref.max(axis=1, keepdims=True) - 12.0
  assert strong.mean() > 0.1
  assert np.abs(ours - ref)[strong].max() <= TOL
  knf = _knf_fbank(wave, 126)
  strong126 = knf >= knf.max(axis=1, keepdims=True) - 12.0
  assert np.abs(audio.kaldi_fbank(wave, num_mel_bins=126) - knf)[strong126].max() <= TOL
  empty = np.flatnonzero(filt.sum(axis=1) == 0)[0]
  assert np.all(ours[:, empty] == np.float32(np.log(np.finfo(np.float32).eps)))


def test_fbank_official_samples(sample_waves):
  for name, wave in sample_waves.items():
    wave = wave - wave.mean()
    ours126 = audio.kaldi_fbank(wave, num_mel_bins=126)
    assert np.abs(ours126 - _knf_fbank(wave, 126)).max() <= TOL, name
    seg = wave[:16000 * 3]  # the float64 loop is slow: 3 s of each clip
    ref, _ = _float64_fbank(seg)
    assert np.abs(audio.kaldi_fbank(seg) - ref).max() <= TOL, name
    full = audio.kaldi_fbank(wave)
    assert full.shape == (1 + (len(wave) - 400) // 160, 128)
    assert np.all(full[:, 3] == np.float32(audio.LOG_EPS))
    assert audio.LOG_EPS == pytest.approx(-15.9424, abs=1e-4)


def test_clip_fbank_mean_pad_and_crop():
  rng = np.random.default_rng(1)
  short = 0.1 * rng.standard_normal(16000 * 3).astype(np.float32)
  out = audio.clip_fbank(short + 0.3)  # an offset must be removed by the mean subtraction
  n = 1 + (len(short) - 400) // 160
  assert out.shape == (1024, 128) and out.dtype == np.float32
  np.testing.assert_allclose(out[:n], audio.kaldi_fbank(short - short.mean()), atol=TOL)
  assert np.all(out[n:] == 0)
  long = 0.1 * rng.standard_normal(16000 * 30).astype(np.float32)
  np.testing.assert_allclose(audio.clip_fbank(long),
                             audio.kaldi_fbank(long - long.mean())[:1024], atol=TOL)


def test_fbank_speed():
  # Opt-in: on a shared 2-core CI machine other jobs' load makes timings meaningless.
  if not os.environ.get("AVMAE_TIMING"):
    pytest.skip("set AVMAE_TIMING=1 to check the 5 ms per clip budget")
  wave = np.random.default_rng(0).standard_normal(160000).astype(np.float32) * 0.1
  audio.kaldi_fbank(wave)
  best = min(_timed(audio.kaldi_fbank, wave) for _ in range(30))
  assert best < 5e-3, f"{best * 1e3:.2f} ms per 10 s clip"


def _timed(fn, *args):
  t = time.perf_counter()
  fn(*args)
  return time.perf_counter() - t


def test_load_audio_channels_rates_and_errors(tmp_path):
  scene = synthetic.draw_scene(0, "train", 2, seconds=2.0)
  stereo = tmp_path / "s.mkv"
  synthetic.write_video(stereo, scene, width=64, height=48, fps=5, audio_codec="pcm_s16le",
                        sample_rate=48000, channels=2)
  first = audio.load_audio(stereo)
  mixed = audio.load_audio(stereo, downmix=True)
  assert abs(len(first) - 32000) <= 200 and first.dtype == np.float32
  # write_video puts half the first channel in the second: the down-mix is 0.75x.
  ratio = np.sqrt(np.mean(mixed**2) / np.mean(first**2))
  assert ratio == pytest.approx(0.75, abs=0.02)
  # The int16 grid of the reference's intermediate wav file.
  np.testing.assert_array_equal(first * 32768, np.round(first * 32768))
  silent = tmp_path / "v.mp4"
  synthetic.write_video(silent, scene, width=64, height=48, fps=5, audio_codec=None)
  with pytest.raises(audio.AudioError, match="no audio stream"):
    audio.load_audio(silent)
  bad = tmp_path / "bad.mp4"
  bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
  with pytest.raises(audio.AudioError, match="bad.mp4"):
    audio.load_audio(bad)


def test_resample_an_array_to_16k():
  # A 440 Hz tone at 44.1 kHz and 8 kHz comes out as the same tone sampled at 16 kHz (the
  # analytic signal; edges skipped, where the filter has no past or future).
  tone = lambda rate, n: np.sin(2 * np.pi * 440 * np.arange(n) / rate).astype(np.float32)
  for rate in (44100, 8000):
    got = audio.resample(tone(rate, rate), rate)
    assert got.dtype == np.float32 and abs(len(got) - 16000) <= 1, (rate, len(got))
    np.testing.assert_allclose(got[200:15800], tone(16000, 16000)[200:15800], atol=2e-3)
  same = tone(16000, 1600)
  np.testing.assert_array_equal(audio.resample(same, 16000), same)
  with pytest.raises(audio.AudioError, match="sample_rate must be a positive int"):
    audio.resample(same, 0)
