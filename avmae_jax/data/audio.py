"""Audio side of dataset preparation: decoding and the reference's Kaldi log-mel filterbank.

`kaldi_fbank` is a vectorised numpy version of `torchaudio.compliance.kaldi.fbank` with the
arguments CAV-MAE uses (cav-mae spec section 1): 25 ms Hanning frames every 10 ms, snip_edges,
per-frame DC removal, pre-emphasis 0.97, |rfft|^2 over 512 points, Kaldi triangular mel filters
from 20 Hz to Nyquist, log floored at float32 eps. It keeps torchaudio's quirk that at
16 kHz / 512 points / 128 bins one filter covers no FFT bin and therefore reads log(eps).

`clip_fbank` is the reference's clip transform (waveform mean removed, pad or crop to 1024
frames) and `load_audio` decodes any container PyAV reads into 16 kHz float32, keeping the first
channel as the reference's `sox remix 1` does, or down-mixing on request.
"""

import functools
from typing import Optional
import math
import os

import av
import numpy as np
import scipy.fft

from avmae_jax.data import schema

# torch.finfo(torch.float32).eps: torchaudio's floor before the log.
FLOAT32_EPS = float(np.finfo(np.float32).eps)
LOG_EPS = math.log(FLOAT32_EPS)


class AudioError(ValueError):
  """A clip's audio cannot be used; the message names the file and the reason."""


def _mel(freq):
  return 1127.0 * np.log(1.0 + np.asarray(freq) / 700.0)


@functools.lru_cache(maxsize=16)
def mel_filters(num_mel_bins: int = schema.NUM_MEL_BINS,
                n_fft: int = 512,
                sample_rate: float = schema.SAMPLE_RATE,
                low_freq: float = 20.0,
                high_freq: float = 0.0) -> np.ndarray:
  """Kaldi triangular mel filters as torchaudio builds them, [n_fft // 2 + 1, num_mel_bins].

  Computed in float32 like torchaudio's `get_mel_banks`, so that which FFT bins a narrow
  filter catches (and the empty filter of the 128-bin case) is decided by the same rounding.
  The Nyquist row is zero: torchaudio pads the filters with one zero column.
  """
  nyquist = 0.5 * sample_rate
  if high_freq <= 0.0:
    high_freq += nyquist
  if not 0.0 <= low_freq < high_freq <= nyquist:
    raise ValueError(f"Bad mel range: low_freq={low_freq}, high_freq={high_freq}, "
                     f"nyquist={nyquist}.")
  num_fft_bins = n_fft // 2
  bin_width = sample_rate / n_fft
  # Scalars in float64 (Python math in torchaudio), tensors in float32.
  mel_low = 1127.0 * math.log(1.0 + low_freq / 700.0)
  mel_high = 1127.0 * math.log(1.0 + high_freq / 700.0)
  delta = (mel_high - mel_low) / (num_mel_bins + 1)
  b = np.arange(num_mel_bins, dtype=np.float32)[:, None]
  left = np.float32(mel_low) + b * np.float32(delta)
  center = np.float32(mel_low) + (b + np.float32(1.0)) * np.float32(delta)
  right = np.float32(mel_low) + (b + np.float32(2.0)) * np.float32(delta)
  freqs = np.float32(bin_width) * np.arange(num_fft_bins, dtype=np.float32)
  mel = (np.float32(1127.0) * np.log(np.float32(1.0) + freqs / np.float32(700.0)))[None, :]
  up = (mel - left) / (center - left)
  down = (right - mel) / (right - center)
  banks = np.maximum(np.float32(0.0), np.minimum(up, down)).astype(np.float32)
  banks = np.concatenate([banks, np.zeros((num_mel_bins, 1), np.float32)], axis=1)
  return np.ascontiguousarray(banks.T)


@functools.lru_cache(maxsize=4)
def _hanning(window_size: int) -> np.ndarray:
  # torch.hann_window(periodic=False), as torchaudio's 'hanning' window type.
  n = np.arange(window_size, dtype=np.float64)
  return (0.5 - 0.5 * np.cos(2.0 * np.pi * n / (window_size - 1))).astype(np.float32)


def kaldi_fbank(waveform: np.ndarray,
                sample_rate: int = schema.SAMPLE_RATE,
                num_mel_bins: int = schema.NUM_MEL_BINS,
                frame_length_ms: float = 25.0,
                frame_shift_ms: float = 10.0,
                preemphasis: float = 0.97,
                low_freq: float = 20.0,
                high_freq: float = 0.0) -> np.ndarray:
  """Log-mel filterbank of a mono waveform, as `torchaudio.compliance.kaldi.fbank`.

  Equivalent to `fbank(w, htk_compat=True, sample_frequency=sample_rate, use_energy=False,
  window_type='hanning', num_mel_bins=num_mel_bins, dither=0.0, frame_shift=frame_shift_ms)`
  with every other argument at torchaudio's default.

  Args:
    waveform: [num_samples] float (any scale; the reference passes [-1, 1] floats).
    sample_rate: Hz.
    num_mel_bins: number of triangular filters.
    frame_length_ms: analysis window in ms.
    frame_shift_ms: hop in ms.
    preemphasis: pre-emphasis coefficient (0 disables it).
    low_freq: lowest filter edge in Hz.
    high_freq: highest filter edge in Hz; <= 0 means offset from Nyquist.

  Returns:
    float32 [num_frames, num_mel_bins], num_frames = 1 + (n - window) // shift (0 if shorter).
  """
  x = np.asarray(waveform, dtype=np.float32)
  if x.ndim == 2 and x.shape[0] == 1:
    x = x[0]
  if x.ndim != 1:
    raise ValueError(f"kaldi_fbank expects a mono waveform, got shape {x.shape}.")
  window = int(sample_rate * frame_length_ms * 0.001)
  shift = int(sample_rate * frame_shift_ms * 0.001)
  n_fft = 1 << (window - 1).bit_length()
  if x.shape[0] < window:
    return np.zeros((0, num_mel_bins), np.float32)
  num_frames = 1 + (x.shape[0] - window) // shift
  c = np.float32(preemphasis)
  # Per-frame DC removal commutes with pre-emphasis up to a constant: emph(x - m) equals
  # emph(x) - (1 - c) * m on every sample (the first one included, Kaldi's replicate rule).
  # So pre-emphasise the whole signal once, frame it, and subtract (1 - c) * m afterwards;
  # this saves passes over the [frames, window] matrix, which dominate the cost.
  emph = np.empty_like(x)
  emph[1:] = x[1:] - c * x[:-1]
  emph[0] = x[0]
  starts = np.arange(num_frames) * shift
  framed = np.lib.stride_tricks.as_strided(
      emph, shape=(num_frames, window), strides=(shift * emph.strides[0], emph.strides[0]))
  buf = np.zeros((num_frames, n_fft), np.float32)
  frames = buf[:, :window]
  np.multiply(framed, _hanning(window), out=frames)
  # Column 0 of a frame is (1 - c) * x[start], not x[start] - c * x[start - 1].
  frames[:, 0] = (np.float32(1.0) - c) * x[starts] * _hanning(window)[0]
  csum = np.concatenate([[0.0], np.cumsum(x, dtype=np.float64)])
  means = ((csum[starts + window] - csum[starts]) / window).astype(np.float32)
  frames -= np.outer((np.float32(1.0) - c) * means, _hanning(window))
  spec = scipy.fft.rfft(buf, axis=1, overwrite_x=True)
  power = np.square(spec.real)
  power += np.square(spec.imag)
  banks = mel_filters(num_mel_bins, n_fft, float(sample_rate), float(low_freq),
                      float(high_freq))
  mel = power @ banks
  np.maximum(mel, np.float32(FLOAT32_EPS), out=mel)
  return np.log(mel, out=mel)


def clip_fbank(waveform: np.ndarray,
               target_frames: Optional[int] = schema.TARGET_FRAMES,
               num_mel_bins: int = schema.NUM_MEL_BINS,
               sample_rate: int = schema.SAMPLE_RATE) -> np.ndarray:
  """The reference's clip transform: mean removal, Kaldi fbank, zero-pad or crop the end.

  Returns float32 [target_frames, num_mel_bins] (every frame when target_frames is None).
  """
  x = np.asarray(waveform, dtype=np.float32)
  x = x - x.mean(dtype=np.float64).astype(np.float32)
  fb = kaldi_fbank(x, sample_rate=sample_rate, num_mel_bins=num_mel_bins)
  if target_frames is None:
    return fb
  if fb.shape[0] >= target_frames:
    return fb[:target_frames]
  out = np.zeros((target_frames, num_mel_bins), np.float32)
  out[:fb.shape[0]] = fb
  return out


def load_audio(path: os.PathLike | str,
               sample_rate: int = schema.SAMPLE_RATE,
               downmix: bool = False,
               quantize_int16: bool = True,
               min_seconds: float = 0.1) -> np.ndarray:
  """Decodes a file's first audio stream to mono float32 in [-1, 1] at `sample_rate`.

  Resampling uses FFmpeg's swresample through PyAV, the resampler of the reference's
  `ffmpeg -ar 16000` extraction step.

  Args:
    path: any container/codec FFmpeg reads (video or audio file).
    sample_rate: output rate in Hz.
    downmix: False keeps the first channel (the reference's `sox remix 1`); True averages
      all channels.
    quantize_int16: round to the 16-bit grid, as the reference's intermediate wav file does.
    min_seconds: shorter audio raises AudioError (too short to give one fbank frame).

  Returns:
    float32 [num_samples].

  Raises:
    AudioError: unreadable file, no audio stream, too short or non-finite samples.
  """
  path = os.fspath(path)
  try:
    container = av.open(path)
  except (av.error.FFmpegError, OSError) as e:
    raise AudioError(f"{path}: cannot open ({e})") from e
  chunks = []
  try:
    with container:
      if not container.streams.audio:
        raise AudioError(f"{path}: no audio stream")
      stream = container.streams.audio[0]
      stream.thread_type = "AUTO"
      resampler = av.AudioResampler(format="fltp", rate=sample_rate)
      try:
        for frame in container.decode(stream):
          for out in resampler.resample(frame):
            chunks.append(out.to_ndarray())
        for out in resampler.resample(None):
          chunks.append(out.to_ndarray())
      except av.error.FFmpegError as e:
        if not chunks:
          raise AudioError(f"{path}: audio decoding failed ({e})") from e
        # A damaged tail: keep what decoded, as ffmpeg's CLI does.
  except av.error.FFmpegError as e:
    raise AudioError(f"{path}: audio decoding failed ({e})") from e
  if not chunks:
    raise AudioError(f"{path}: audio stream holds no samples")
  planar = np.concatenate(chunks, axis=1)  # [channels, samples]
  wave = planar.mean(axis=0) if downmix else planar[0]
  wave = np.ascontiguousarray(wave, dtype=np.float32)
  if not np.all(np.isfinite(wave)):
    raise AudioError(f"{path}: audio has NaN or infinite samples")
  if wave.shape[0] < min_seconds * sample_rate:
    raise AudioError(f"{path}: audio too short ({wave.shape[0] / sample_rate:.3f} s)")
  if quantize_int16:
    wave = np.clip(np.round(wave * 32768.0), -32768, 32767).astype(np.float32) / 32768.0
  return wave


def resample(waveform: np.ndarray, sample_rate: int,
             target_rate: int = schema.SAMPLE_RATE) -> np.ndarray:
  """A mono float32 waveform at `target_rate`, by FFmpeg's swresample (what `load_audio`
  uses, so an array and its file give the same samples up to the file's own coding)."""
  wave = np.ascontiguousarray(waveform, dtype=np.float32)
  if not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
    raise AudioError(f"sample_rate must be a positive int in Hz, got {sample_rate!r}")
  if sample_rate == target_rate:
    return wave
  frame = av.AudioFrame.from_ndarray(wave[None], format="fltp", layout="mono")
  frame.sample_rate = int(sample_rate)
  resampler = av.AudioResampler(format="fltp", layout="mono", rate=target_rate)
  chunks = [out.to_ndarray()[0] for out in resampler.resample(frame)]
  chunks += [out.to_ndarray()[0] for out in resampler.resample(None)]
  return np.concatenate(chunks).astype(np.float32)


def load_wav(path: os.PathLike | str, sample_rate: int = schema.SAMPLE_RATE,
             downmix: bool = False) -> np.ndarray:
  """Reads an already-extracted audio file (wav/flac) as the reference's `torchaudio.load`.

  Float32 in [-1, 1], first channel (or the channel mean with `downmix`). A file at another
  rate is resampled through `load_audio` rather than rejected.
  """
  import soundfile as sf  # pylint: disable=import-outside-toplevel
  path = os.fspath(path)
  try:
    data, rate = sf.read(path, dtype="float32", always_2d=True)
  except (RuntimeError, OSError, sf.LibsndfileError) as e:
    raise AudioError(f"{path}: cannot read audio ({e})") from e
  if rate != sample_rate:
    return load_audio(path, sample_rate=sample_rate, downmix=downmix, quantize_int16=False)
  if data.shape[0] == 0:
    raise AudioError(f"{path}: audio file holds no samples")
  wave = data.mean(axis=1) if downmix else data[:, 0]
  wave = np.ascontiguousarray(wave, dtype=np.float32)
  if not np.all(np.isfinite(wave)):
    raise AudioError(f"{path}: audio has NaN or infinite samples")
  return wave
