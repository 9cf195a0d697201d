"""The reference's input transforms as small TensorFlow functions.

Each transform is split in two: a pure function of its input and of explicit random
draws (uniform numbers, shifts, indices), which tests compare against numpy
computations of the spec formulas (/work/shared/spec/cav-mae.md sections 1-3), and a
`*_random` wrapper that makes the draws with TensorFlow's stateless random ops from a
seed (int32/int64 tensor of shape [2]), so that every augmentation is reproducible from
(config seed, epoch, host, position) with no hidden random state.

Batch transforms work on a leading batch axis B; audio is [B, T=1024, F=128] (time,
frequency), frames are NHWC.
"""

import tensorflow as tf

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- seeds


def fold_in(seed, *data):
  """Derives a new stateless seed from `seed` ([2] ints) and integers `data`."""
  seed = tf.cast(seed, tf.int64)
  for d in data:
    seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(d, tf.int64))
  return seed


def split_seed(seed, num):
  """Splits a stateless seed into `num` independent ones, [num, 2]."""
  return tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num)


# ----------------------------------------------------------------------------- audio


def normalize_audio(fbank, mean, std, std_factor=1.0):
  """Spec 1.6: (x - mean) / std; MAViL uses std_factor=2, i.e. (x - mean) / (2 std)."""
  return (tf.convert_to_tensor(fbank) - mean) / (std_factor * std)


def add_noise_and_roll(audio, noise_u, noise_scale, shifts):
  """Spec 1.7 on a batch: audio += noise_u * noise_scale / 10, then roll along time.

  Args:
    audio: float [B, T, F], already normalised.
    noise_u: float [B, T, F] uniform in [0, 1) (the reference's torch.rand(T, F)).
    noise_scale: float [B] uniform in [0, 1) (the reference's np.random.rand()).
    shifts: int [B] in [-T, T) (np.random.randint(-T, T)); torch.roll semantics,
      out[t] = in[(t - shift) mod T].
  Returns:
    float [B, T, F].
  """
  audio = audio + noise_u * (noise_scale[:, None, None] / 10.0)
  return roll_time(audio, shifts)


def roll_time(audio, shifts):
  """Circular roll of each example of [B, T, F] by its own shift along T."""
  t = tf.shape(audio)[1]
  src = tf.math.floormod(
      tf.range(t)[None, :] - tf.cast(shifts, tf.int32)[:, None], t)
  return tf.gather(audio, src, axis=1, batch_dims=1)


def noise_draws(batch_size, time_size, freq_size, seed, with_noise=True):
  """The spec 1.7 randomness of a batch: (noise_u or None, noise_scale, shifts)."""
  s = split_seed(seed, 3)
  noise_u = (tf.random.stateless_uniform([batch_size, time_size, freq_size], s[0])
             if with_noise else None)
  noise_scale = tf.random.stateless_uniform([batch_size], s[1])
  shifts = tf.random.stateless_uniform(
      [batch_size], s[2], minval=-time_size, maxval=time_size, dtype=tf.int32)
  return noise_u, noise_scale, shifts


def hash_keys(seed):
  """Two uint32 keys for `hash_uniform`, drawn from a stateless seed."""
  return tf.random.stateless_uniform([2], tf.cast(seed, tf.int64), minval=None,
                                     maxval=None, dtype=tf.uint32)


def _lowbias32(x):
  # A well-mixed 32-bit integer hash (Wellons' "lowbias32"); uint32 ops wrap.
  x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))
  x = x * tf.constant(0x7FEB352D, tf.uint32)
  x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 15))
  x = x * tf.constant(0x846CA68B, tf.uint32)
  return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))


def hash_uniform(shape, keys):
  """Uniform float32 in [0, 1) (24-bit grid) from a counter-based hash of the index.

  Two rounds of lowbias32 over (element index, keys). It is several times cheaper
  than Philox on CPU and fuses into the surrounding XLA computation, which matters
  for the 131k noise values per clip (spec 1.7); its quality is ample for additive
  augmentation noise. `keys` is uint32 [2] (see `hash_keys`).
  """
  n = 1
  for d in shape:
    n *= d
  idx = tf.range(n, dtype=tf.int32)
  x = tf.bitcast(idx, tf.uint32)
  x = _lowbias32(tf.bitwise.bitwise_xor(x, keys[0]))
  x = _lowbias32(tf.bitwise.bitwise_xor(x + tf.constant(0x9E3779B9, tf.uint32), keys[1]))
  u = tf.cast(tf.bitwise.right_shift(x, 8), tf.float32) * (1.0 / (1 << 24))
  return tf.reshape(u, shape)


def noise_and_roll_random(audio, seed):
  """Draws the spec 1.7 randomness from `seed` and applies it to a batch."""
  b, t, f = audio.shape
  return add_noise_and_roll(audio, *noise_draws(b, t, f, seed))


def mask_bounds(u_value, u_start, mask_param, size):
  """torchaudio `mask_along_axis` bounds from its two uniform draws.

  value = u_value * mask_param; min_value = u_start * (size - value);
  masked = [int(min_value), int(min_value) + int(value)). Width is uniform in
  [0, mask_param) as in torchaudio's FrequencyMasking / TimeMasking.
  """
  value = u_value * float(mask_param)
  min_value = u_start * (float(size) - value)
  start = tf.cast(tf.floor(min_value), tf.int32)
  end = start + tf.cast(tf.floor(value), tf.int32)
  return start, end


def spec_augment(fbank, freq_start, freq_end, time_start, time_end):
  """Spec 1.5 on a batch: one frequency and one time mask per example, set to 0.

  Applied to the UN-normalised log-mel, as the reference does (masked cells become
  (0 - mean) / std after normalisation).

  Args:
    fbank: float [B, T, F].
    freq_start, freq_end, time_start, time_end: int [B], half-open mask ranges.
  Returns:
    float [B, T, F].
  """
  t, f = tf.shape(fbank)[1], tf.shape(fbank)[2]
  tr = tf.range(t)[None, :]
  fr = tf.range(f)[None, :]
  tmask = (tr >= time_start[:, None]) & (tr < time_end[:, None])  # [B, T]
  fmask = (fr >= freq_start[:, None]) & (fr < freq_end[:, None])  # [B, F]
  mask = tmask[:, :, None] | fmask[:, None, :]
  return tf.where(mask, tf.zeros_like(fbank), fbank)


def spec_augment_draws(batch_size, freqm, timem, time_size, freq_size, seed):
  """SpecAugment mask ranges of a batch: (freq_start, freq_end, time_start, time_end).

  A width of 0 (freqm or timem = 0) disables that mask (empty ranges).
  """
  u = tf.random.stateless_uniform([4, batch_size], tf.cast(seed, tf.int64))
  zeros = tf.zeros([batch_size], tf.int32)
  fs, fe = (mask_bounds(u[0], u[1], freqm, freq_size) if freqm else (zeros, zeros))
  ts, te = (mask_bounds(u[2], u[3], timem, time_size) if timem else (zeros, zeros))
  return fs, fe, ts, te


def spec_augment_random(fbank, freqm, timem, seed):
  """Draws SpecAugment masks (freqm, timem widths; 0 disables one) and applies them."""
  if not freqm and not timem:
    return fbank
  b, t, f = fbank.shape
  return spec_augment(fbank, *spec_augment_draws(b, freqm, timem, t, f, seed))


# ----------------------------------------------------------------------------- frames


def normalize_frames(frames_uint8, dtype=tf.float32):
  """ToTensor + Normalize(ImageNet mean/std) in NHWC: (x / 255 - mean) / std."""
  x = tf.cast(frames_uint8, tf.float32) * (1.0 / 255.0)
  mean = tf.constant(IMAGENET_MEAN, tf.float32)
  std = tf.constant(IMAGENET_STD, tf.float32)
  return tf.cast((x - mean) / std, dtype)


def decode_frames(frames, indices, frame_size):
  """Returns uint8 [len(indices), H, W, 3] for the chosen frame indices.

  `frames` is either a string [N] of JPEGs (only the chosen ones are decoded, which is
  why the pipeline reads frames with SkipDecoding) or an already decoded uint8
  [N, H, W, 3].
  """
  if frames.dtype == tf.string:
    chosen = tf.gather(frames, indices)
    k = chosen.shape[0]
    if k is not None:  # Unrolled: cheaper than map_fn's loop for a few frames.
      out = tf.stack([tf.io.decode_jpeg(chosen[i], channels=3) for i in range(k)])
    else:
      out = tf.map_fn(
          lambda s: tf.io.decode_jpeg(s, channels=3), chosen,
          fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8))
  else:
    out = tf.gather(frames, indices)
  return tf.ensure_shape(out, [None, frame_size, frame_size, 3])


def decode_one_frame(frames, index, frame_size):
  """Like `decode_frames` for one index, without map_fn; uint8 [H, W, 3]."""
  if frames.dtype == tf.string:
    out = tf.io.decode_jpeg(frames[index], channels=3)
  else:
    out = frames[index]
  return tf.ensure_shape(out, [frame_size, frame_size, 3])


def mavil_frame_indices(frame_times, num_frames, fps, start_u):
  """Indices of a clip of `num_frames` frames at `fps` from the stored frames.

  MAViL takes 8 frames of a 4 s window at 2 frames/s. The stored frames have times
  `frame_times` (float [N]); the stride between chosen stored frames is
  round((1 / fps) / stored_spacing), at least 1, so denser storage is subsampled. The
  window start is `start_u` (in [0, 1]) of the way through the valid starts: uniform
  in training, 0.5 (centred) in evaluation. Clips too short repeat the last frame.
  """
  n = tf.shape(frame_times)[0]
  nf = tf.cast(n, tf.float32)
  span = frame_times[n - 1] - frame_times[0]
  spacing = tf.where(n > 1, span / tf.maximum(nf - 1.0, 1.0), 1.0 / fps)
  stride = tf.maximum(
      tf.cast(tf.round((1.0 / fps) / tf.maximum(spacing, 1e-6)), tf.int32), 1)
  last_start = tf.maximum(n - 1 - (num_frames - 1) * stride, 0)
  start = tf.cast(
      tf.floor(start_u * tf.cast(last_start + 1, tf.float32)), tf.int32)
  start = tf.minimum(start, last_start)
  idx = start + tf.range(num_frames) * stride
  return tf.minimum(idx, n - 1)


# ----------------------------------------------------------------------------- labels, mixup


def smooth_labels(labels, label_smooth):
  """Spec 3 without mixup: eps/N everywhere, positives set to 1 - eps. [B, C]."""
  labels = tf.cast(labels, tf.float32)
  n = tf.cast(tf.shape(labels)[-1], tf.float32)
  return tf.where(labels > 0, 1.0 - label_smooth, label_smooth / n)


def mix_labels(labels, partner_labels, lam, label_smooth):
  """Spec 3 with mixup: eps/N + l (1 - eps) y1 + (1 - l)(1 - eps) y2. [B, C]."""
  y1 = tf.cast(labels, tf.float32)
  y2 = tf.cast(partner_labels, tf.float32)
  n = tf.cast(tf.shape(y1)[-1], tf.float32)
  lam = lam[:, None]
  return (label_smooth / n + lam * (1.0 - label_smooth) * y1 +
          (1.0 - lam) * (1.0 - label_smooth) * y2)


def mix_log_mel(a, b, lam):
  """Power-domain mixup of un-normalised log-mel spectrograms, [B, T, F].

  The reference mixes waveforms, w = l w1 + (1 - l) w2, and then computes the log-mel.
  The power spectrum of the mix is l^2 P1 + (1 - l)^2 P2 + 2 l (1 - l) Re(X1 X2*); the
  cross term has zero mean for independent signals, so with only the log-mels A, B
  stored we use its expectation: log(l^2 exp(A) + (1 - l)^2 exp(B)), computed as a
  logaddexp for numerical safety. Mel filtering is linear in power, so this holds per
  mel bin. (It ignores the reference's log floor and re-subtracted mean, both small.)
  """
  lam = tf.cast(lam, a.dtype)[:, None, None]
  lam = tf.clip_by_value(lam, 1e-6, 1.0 - 1e-6)
  # logaddexp(A + 2 log l, B + 2 log(1 - l)) = A + 2 log l + softplus(z), with one
  # exp and one log per cell; log(1 + exp(z)) is faster under XLA on CPU than
  # tf.math.softplus. For z > 30, softplus(z) = z to float precision (and exp stays
  # finite); for very negative z the absolute error is below float32 eps.
  log_l = 2.0 * tf.math.log(lam)
  log_m = 2.0 * tf.math.log(1.0 - lam)
  z = b - a + (log_m - log_l)
  sp = tf.where(z > 30.0, z, tf.math.log(1.0 + tf.exp(tf.minimum(z, 30.0))))
  return a + log_l + sp


def mix_linear(a, b, lam):
  """Linear mixup of images (any rank >= 1 with batch first): l a + (1 - l) b."""
  a, b = tf.convert_to_tensor(a), tf.convert_to_tensor(b)
  lam = tf.reshape(tf.cast(lam, a.dtype), [-1] + [1] * (a.shape.rank - 1))
  return lam * a + (1.0 - lam) * b


def stateless_beta(shape, alpha, beta, seed):
  """Beta(alpha, beta) samples as G1 / (G1 + G2) with stateless gamma draws."""
  s = split_seed(seed, 2)
  g1 = tf.random.stateless_gamma(shape, s[0], alpha=alpha)
  g2 = tf.random.stateless_gamma(shape, s[1], alpha=beta)
  return g1 / (g1 + g2)


def mixup_draws(batch_size, mixup_prob, seed, alpha=10.0):
  """The mixup randomness of a batch.

  Returns (do_mix bool [B], lam float [B] ~ Beta(alpha, alpha), partner int [B]). With
  probability `mixup_prob` an example is mixed with a partner drawn uniformly from the
  OTHER examples of its (shuffled) batch: a uniform draw from the shuffled stream, the
  streaming stand-in for the reference's uniform draw from the whole dataset.
  """
  s = split_seed(seed, 3)
  do_mix = tf.random.stateless_uniform([batch_size], s[0]) < mixup_prob
  lam = stateless_beta([batch_size], alpha, alpha, s[1])
  if batch_size > 1:
    offset = tf.random.stateless_uniform(
        [batch_size], s[2], minval=1, maxval=batch_size, dtype=tf.int32)
    partner = tf.math.floormod(tf.range(batch_size) + offset, batch_size)
  else:
    partner = tf.zeros([batch_size], tf.int32)
    do_mix = tf.zeros([batch_size], tf.bool)
  return do_mix, lam, partner


def apply_mixup(fbank, frames, labels, do_mix, lam, partner, label_smooth):
  """Mixes examples with their partners where `do_mix`; spec section 3.

  Args:
    fbank: float [B, T, F] un-normalised log-mel (mixed in the power domain).
    frames: float [B, ..., H, W, 3] normalised (or not: mixing is linear) frames.
    labels: multi-hot [B, C].
    do_mix, lam, partner: from `mixup_draws`.
    label_smooth: eps.
  Returns:
    (fbank, frames, targets float [B, C]).
  """
  fbank, frames = tf.convert_to_tensor(fbank), tf.convert_to_tensor(frames)
  pf = tf.gather(fbank, partner)
  pv = tf.gather(frames, partner)
  pl = tf.gather(labels, partner)
  mixed_a = mix_log_mel(fbank, pf, lam)
  mixed_v = mix_linear(frames, pv, lam)
  mixed_y = mix_labels(labels, pl, lam, label_smooth)
  plain_y = smooth_labels(labels, label_smooth)
  m3 = do_mix[:, None, None]
  fbank = tf.where(m3, mixed_a, fbank)
  mv = tf.reshape(do_mix, [-1] + [1] * (frames.shape.rank - 1))
  frames = tf.where(mv, mixed_v, frames)
  targets = tf.where(do_mix[:, None], mixed_y, plain_y)
  return fbank, frames, targets
