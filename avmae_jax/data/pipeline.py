"""The tf.data input pipeline: prepared examples (schema.py) in, numpy batches out.

Reads a prepared TFDS dataset (by builder name + data_dir, or a builder directory) or
any `tf.data.Dataset` of schema examples, takes this host's disjoint shard, shuffles,
decodes only the frames it needs, applies the reference's transforms (transforms.py)
and yields this host's share of the global batch as a dict of numpy arrays, ready for
`jax.make_array_from_process_local_data`:

  audio   [b, target_length, 128]            normalised log-mel (float32 or bfloat16)
  frames  [b, 224, 224, 3]                   CAV-MAE, ImageNet-normalised, NHWC
          [b, 10, 224, 224, 3]               CAV-MAE with eval_all_frames
          [b, num_frames, 224, 224, 3]       MAViL
  labels  [b, C] float32                     soft targets (smoothing, mixup)
  mask    [b] float32                        1 for real examples, 0 for the padding of
                                             the last evaluation batch
  clip_id [b] bytes (object)                 only with return_clip_id; drop it before
                                             putting the batch on devices

Determinism and state. There is no hidden random state: an epoch's order is a graph
function of (seed, host, epoch) (file order and shuffle buffer are seeded with it,
balanced-sampling draws too), and every augmentation draw uses stateless ops keyed on
(seed, host, epoch, example position or batch step). Epochs are chained inside one
tf.data pipeline (`Dataset.range(epoch, ...).flat_map(epoch)`), so there is no stall
or rebuild between epochs. The iterator state is just (epoch, batches consumed in
it): `get_state()` returns a small JSON-able dict and `set_state()` rebuilds the
pipeline and skips the consumed records while they are still serialized (parsing,
the zlib log-mel and the JPEGs come after), so a mid-epoch restore costs one read of
the skipped records (about 0.25 ms of CPU each on this 2-core machine) and continues
exactly. Only the frames a batch needs are decoded (SkipDecoding, then
decode_jpeg). We chose this over tf.train.Checkpoint(iterator=...), which stores the
shuffle buffer (hundreds of MB of encoded clips) in every checkpoint. Order depends on TensorFlow's global seed too
(Dataset.shuffle combines it with the op seed): do not call tf.random.set_seed with
different values across a save and its restore.

Multi-host. Each process reads `tfds.even_splits(split, process_count)[process_index]`
(or `Dataset.shard` for in-memory datasets) and yields batch_size // process_count
examples per step. In training every host runs the same number of steps per epoch
(the smallest shard decides), so the state is the same on every host; in evaluation
every host yields the same number of batches (the largest shard decides), padding
with mask = 0.

Balanced sampling (spec 3): per-class weight 1000 / (count + 0.01), clip weight = sum
over its labels; each epoch draws the host's shard size of clips with replacement
(inverse-CDF draws counted per clip: exact multinomial counts), emits each clip as
many times as it was drawn and shuffles (copies of a clip then lie within about a
shuffle buffer of each other, where the reference's sampler spreads them over the
epoch). The weights need one pass over the shard's labels when the pipeline is built,
with the class counts of the host's shard (proportional to the global ones up to
sampling noise), or come per clip from a file (balanced_weights_file, in the shard's
read order).

Mixup (spec 3) is done per batch, before SpecAugment and normalisation as in the
reference: the partner is another clip of the same shuffled batch; the log-mels are
mixed in the power domain, log(l^2 exp(A) + (1 - l)^2 exp(B)), on the UN-normalised
values (transforms.mix_log_mel explains why), images linearly, labels as the spec.

Augmentations (noise and roll, SpecAugment, mixup, label smoothing, random frames)
apply only when `training`; evaluation always gives plain normalised inputs.
"""

import copy
import dataclasses
import json
from typing import Any, Iterator, Mapping, Optional

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from avmae_jax.data import config as data_config
from avmae_jax.data import prepared
from avmae_jax.data import schema
from avmae_jax.data import transforms as T

STATE_VERSION = 1
DTYPES = {'float32': tf.float32, 'bfloat16': tf.bfloat16}
MODES = data_config.MODES
default_data_config = data_config.default_data_config
validate_config = data_config.validate_config


# ----------------------------------------------------------------------------- sources


class _TfdsSource:
  """One host's shard of a prepared TFDS split, heavy features left encoded."""

  def __init__(self, builder, split, process_index, process_count):
    self._builder = builder
    self._features = builder.info.features
    shards = tfds.even_splits(split, n=process_count)
    self.shard_sizes = [builder.info.splits[s].num_examples for s in shards]
    self._split = shards[process_index]
    self.num_examples = self.shard_sizes[process_index]
    self.description = f'{builder.name}:{split}'

    instructions = builder.info.splits[self._split].file_instructions
    self._files = (
        tf.constant([fi.filename for fi in instructions], tf.string),
        tf.constant([fi.skip for fi in instructions], tf.int64),
        tf.constant([fi.take for fi in instructions], tf.int64),
    )
    self._num_files = len(instructions)
    self._decoders = {
        schema.FBANK: tfds.decode.SkipDecoding(),
        schema.FRAMES: tfds.decode.SkipDecoding(),
    }

  def records(self, shuffle_seed=None) -> tf.data.Dataset:
    """The shard's serialized records, files in a seeded order if `shuffle_seed`.

    Reads the split's file instructions directly (rather than `as_dataset`) so that an
    epoch's file order can be a graph function of the epoch (a tensor seed), letting
    epochs chain inside one tf.data pipeline with no restart between them. Records
    stay serialized until after the shuffle and any restore skip, so skipping costs
    only the read.
    """
    files = tf.data.Dataset.from_tensor_slices(self._files)
    if shuffle_seed is not None and self._num_files > 1:
      files = files.shuffle(self._num_files, seed=shuffle_seed,
                            reshuffle_each_iteration=False)
    return files.interleave(
        lambda f, skip, take: tf.data.TFRecordDataset(f).skip(skip).take(take),
        cycle_length=min(16, max(self._num_files, 1)), block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def parse(self, record):
    """A serialized record -> schema dict, fbank and frames still encoded."""
    return _select_keys(
        self._features.deserialize_example(record, decoders=self._decoders))

  def decode_fbank(self, raw):
    return self._features[schema.FBANK].decode_example(raw)


class _DatasetSource:
  """One host's shard (`Dataset.shard`) of an in-memory dataset of schema examples.

  Elements are dicts with fbank (float [T, 128]), frames (string [N] of JPEGs or
  uint8 [N, H, W, 3]), labels (multi-hot [C]) and optionally clip_id, frame_times.
  """

  def __init__(self, dataset, process_index, process_count):
    n = int(dataset.cardinality())
    if n < 0:  # Unknown or infinite: count once (finite datasets only).
      n = int(dataset.reduce(np.int64(0), lambda a, _: a + 1))
    self.shard_sizes = [len(range(i, n, process_count))
                        for i in range(process_count)]
    self.num_examples = self.shard_sizes[process_index]
    self._ds = dataset.shard(process_count, process_index).map(_select_keys)
    self.description = 'in-memory dataset'

  def records(self, shuffle_seed=None) -> tf.data.Dataset:
    del shuffle_seed  # In-memory order is canonical; the shuffle buffer shuffles.
    return self._ds

  def parse(self, element):
    return element

  def decode_fbank(self, x):
    return x


def _select_keys(e):
  out = {k: e[k] for k in (schema.FBANK, schema.FRAMES, schema.LABELS)}
  out[schema.CLIP_ID] = e.get(schema.CLIP_ID, tf.constant(''))
  if schema.FRAME_TIMES in e:
    out[schema.FRAME_TIMES] = tf.cast(e[schema.FRAME_TIMES], tf.float32)
  return out


def _make_source(c, dataset, process_index, process_count):
  if dataset is not None:
    return _DatasetSource(dataset, process_index, process_count)
  if c.builder_dir:
    builder = tfds.builder_from_directory(c.builder_dir)
  elif c.name:
    # Read the prepared directory itself where there is one: a builder that prepares from
    # user files (avmae_videos) cannot be constructed without them.
    builder_dir = prepared.find_builder_dir(c.data_dir, c.name)
    if builder_dir:
      builder = tfds.builder_from_directory(builder_dir)
    elif c.name.partition('/')[0] == 'avmae_videos':  # raises, saying what to prepare
      builder = tfds.builder_from_directory(prepared.find(
          c.data_dir or '~/tensorflow_datasets', frames=c.name.partition('/')[2] or 'cavmae',
          field='config.data.data_dir').builder_dir)
    else:
      builder = tfds.builder(c.name, data_dir=c.data_dir or None)
  else:
    raise ValueError('config.data.name (or builder_dir) must name a prepared '
                     'dataset when no tf.data.Dataset is given')
  return _TfdsSource(builder, c.split, process_index, process_count)


# ----------------------------------------------------------------------------- balanced sampling


def balanced_weights(labels: np.ndarray) -> np.ndarray:
  """Spec 3: per-class weight 1000 / (count + 0.01); clip weight = sum over its labels.

  Args:
    labels: multi-hot [N, C].
  Returns:
    float64 [N] per-clip sampling weights.
  """
  labels = np.asarray(labels) > 0
  counts = labels.sum(axis=0)
  class_w = 1000.0 / (counts + 0.01)
  return labels.astype(np.float64) @ class_w


def _read_labels(source) -> np.ndarray:
  ds = source.records(None).map(
      lambda r: tf.cast(source.parse(r)[schema.LABELS] > 0, tf.uint8),
      num_parallel_calls=tf.data.AUTOTUNE)
  chunks = [np.asarray(b) for b in ds.batch(4096).as_numpy_iterator()]
  return np.concatenate(chunks, axis=0)


def _load_weights_file(path: str, n: int) -> np.ndarray:
  if path.endswith('.npy'):
    w = np.load(path)
  else:  # The reference's weight csv: one float per line.
    w = np.loadtxt(path, delimiter=',', ndmin=1)
  w = np.asarray(w, np.float64).reshape(-1)
  if w.shape[0] != n:
    raise ValueError(f'config.data.balanced_weights_file: {w.shape[0]} weights for '
                     f'a shard of {n} clips')
  return w


# ----------------------------------------------------------------------------- iterator


@dataclasses.dataclass
class _Plan:
  host_batch: int
  steps_per_epoch: int
  examples_per_epoch: int  # real examples read per epoch by this host.


class InputIterator:
  """Endless (training) or one-pass (evaluation) iterator of numpy batches.

  Use `get_state()` / `set_state()` to checkpoint and restore mid-epoch exactly (see
  the module docstring). The state is a JSON-able dict; with orbax, save it with
  `ocp.args.JsonSave(it.get_state())` next to the train state.
  """

  def __init__(self, config, dataset: Optional[tf.data.Dataset] = None, *,
               process_index: Optional[int] = None,
               process_count: Optional[int] = None):
    validate_config(config)
    # A private copy: later edits to the caller's config must not change the stream.
    config = copy.deepcopy(config)
    if process_index is None or process_count is None:
      import jax  # pylint: disable=import-outside-toplevel
      process_index = jax.process_index() if process_index is None else process_index
      process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index {process_index} not in [0, {process_count})')
    c = config
    if c.batch_size % process_count:
      raise ValueError(f'config.data.batch_size: global batch {c.batch_size} is not '
                       f'divisible by process_count {process_count}')
    self._c = c
    self._pi, self._pc = process_index, process_count
    self._source = _make_source(c, dataset, process_index, process_count)
    b = c.batch_size // process_count
    if c.training:
      steps = min(self._source.shard_sizes) // b
      if steps == 0:
        raise ValueError(
            f'config.data.batch_size: a host batch of {b} exceeds the smallest '
            f'shard ({min(self._source.shard_sizes)} examples)')
      self._plan = _Plan(b, steps, steps * b)
    else:
      steps = -(-max(self._source.shard_sizes) // b)
      self._plan = _Plan(b, steps, self._source.num_examples)
    self._weights = None
    if c.training and c.balanced_sampling:
      if c.balanced_weights_file:
        self._weights = _load_weights_file(
            c.balanced_weights_file, self._source.num_examples)
      else:
        self._weights = balanced_weights(_read_labels(self._source))
      if not np.all(np.isfinite(self._weights)) or self._weights.sum() <= 0:
        raise ValueError('balanced sampling weights must be finite with a positive sum')
    self._graph = _Graph(c, process_index, self._plan, self._source, self._weights)
    self._epoch = 0
    self._step = 0
    self._it = None

  # -- public API

  @property
  def steps_per_epoch(self) -> int:
    """Batches per epoch (the same on every host)."""
    return self._plan.steps_per_epoch

  @property
  def host_batch_size(self) -> int:
    return self._plan.host_batch

  @property
  def num_examples(self) -> int:
    """Examples in this host's shard."""
    return self._source.num_examples

  def get_state(self) -> dict[str, Any]:
    """A small JSON-able dict: where the next batch comes from, plus consistency keys."""
    c = self._c
    return {
        'version': STATE_VERSION,
        'epoch': self._epoch,
        'step': self._step,
        'seed': c.seed,
        'global_batch_size': c.batch_size,
        'process_count': self._pc,
        'steps_per_epoch': self._plan.steps_per_epoch,
    }

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continues exactly after the batch at which `state` was taken."""
    if isinstance(state, (bytes, str)):
      state = json.loads(state)
    if state.get('version') != STATE_VERSION:
      raise ValueError(f'unknown input state version {state.get("version")!r}')
    mine = self.get_state()
    for key in ('seed', 'global_batch_size', 'process_count', 'steps_per_epoch'):
      if state[key] != mine[key]:
        raise ValueError(
            f'input state {key}={state[key]!r} differs from this pipeline\'s '
            f'{mine[key]!r}: the stream could not continue exactly')
    epoch, step = int(state['epoch']), int(state['step'])
    if not 0 <= step <= self._plan.steps_per_epoch or epoch < 0:
      raise ValueError(f'input state epoch/step out of range: {epoch}/{step}')
    self._epoch, self._step = epoch, step
    self._it = None

  def save(self, path: str) -> None:
    """Writes the state as JSON to `path` (a file)."""
    with tf.io.gfile.GFile(path, 'w') as f:
      f.write(json.dumps(self.get_state()))

  def restore(self, path: str) -> None:
    with tf.io.gfile.GFile(path, 'r') as f:
      self.set_state(json.loads(f.read()))

  def close(self) -> None:
    """Stops the background tf.data work now (it also stops when garbage-collected)."""
    self._it = None

  def __enter__(self) -> 'InputIterator':
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if not self._c.training and self._step >= self._plan.steps_per_epoch:
      raise StopIteration
    if self._it is None:
      self._it = self.dataset(self._epoch, self._step).as_numpy_iterator()
    try:
      batch = next(self._it)
    except StopIteration:
      # Only reachable if the source yielded fewer examples than it declared.
      raise RuntimeError(
          f'{self._source.description}: epoch {self._epoch} ended after '
          f'{self._step} of {self._plan.steps_per_epoch} batches') from None
    self._step += 1
    if self._c.training and self._step == self._plan.steps_per_epoch:
      self._epoch += 1
      self._step = 0
    return batch

  def dataset(self, epoch: int = 0, start_step: int = 0) -> tf.data.Dataset:
    """The batches from (epoch, start_step) on, as a tf.data.Dataset."""
    return self._graph.dataset(epoch, start_step)


class _Graph:
  """Builds the tf.data graph of an InputIterator.

  Kept apart from InputIterator, without a reference back to it, so that the traced
  tf.data functions (which close over this object) do not put the iterator in a
  reference cycle: dropping the iterator then stops its background work at once.
  """

  def __init__(self, c, process_index, plan, source, weights):
    self._c = c
    self._pi = process_index
    self._plan = plan
    self._source = source
    self._weights = weights

  def _seed(self, *data):
    """A stateless seed [2] for (config seed, host, *data)."""
    return T.fold_in(tf.constant([self._c.seed, 0], tf.int64), self._pi, *data)

  def _int_seed(self, *data):
    """A scalar int64 op seed (for Dataset.shuffle) from (config seed, host, *data)."""
    return tf.random.stateless_uniform(
        [], self._seed(*data), minval=0, maxval=2**62, dtype=tf.int64)

  def _draw_counts(self, epoch):
    """Balanced sampling: how often each clip of the shard is drawn this epoch.

    N draws with replacement with probability w_i / sum(w) (inverse-CDF sampling of
    N uniforms), counted per clip: an exact multinomial, as a graph function of the
    epoch.
    """
    w = self._weights
    cdf = tf.constant(np.cumsum(w / w.sum()), tf.float64)
    n = len(w)
    u = tf.random.stateless_uniform([n], self._seed(epoch, 3), dtype=tf.float64)
    idx = tf.searchsorted(cdf, u, side='right')
    idx = tf.minimum(idx, n - 1)  # cdf[-1] may round below 1.
    return tf.math.bincount(tf.cast(idx, tf.int32), minlength=n, maxlength=n,
                            dtype=tf.int64)

  def _epoch_examples(self, epoch):
    """Records (unparsed) of one training epoch, with their epoch and position."""
    c, plan = self._c, self._plan
    epoch = tf.cast(epoch, tf.int64)
    read_shuffled = c.shuffle_files and self._weights is None
    ds = self._source.records(self._int_seed(epoch, 1) if read_shuffled else None)
    if self._weights is not None:
      counts = tf.data.Dataset.from_tensor_slices(self._draw_counts(epoch))
      ds = tf.data.Dataset.zip((ds, counts)).flat_map(
          lambda e, k: tf.data.Dataset.from_tensors(e).repeat(k))
    if c.shuffle_buffer > 1:
      ds = ds.shuffle(c.shuffle_buffer, seed=self._int_seed(epoch, 2),
                      reshuffle_each_iteration=False)
    ds = ds.take(plan.examples_per_epoch)
    return ds.enumerate().map(lambda pos, e: (epoch, pos, e))

  def dataset(self, epoch: int = 0, start_step: int = 0) -> tf.data.Dataset:
    """The batches from (epoch, start_step) on, as a tf.data.Dataset.

    Training chains all later epochs in the same pipeline (no restart between
    epochs); evaluation is the one ordered pass, padded to whole batches.
    """
    c, plan = self._c, self._plan
    b = plan.host_batch
    auto = tf.data.AUTOTUNE if c.num_parallel_calls == -1 else c.num_parallel_calls
    start = start_step * b
    # Skipping happens before decoding: a restore reads but does not decode.
    if c.training:
      ds = self._epoch_examples(epoch).skip(start)
      later = tf.data.Dataset.range(epoch + 1, 2**62).flat_map(self._epoch_examples)
      ds = ds.concatenate(later)
    else:
      ds = self._source.records(None).enumerate().skip(start)
      ds = ds.map(lambda pos, e: (tf.constant(0, tf.int64), pos, e))
    ds = ds.map(self._decode_fn(), num_parallel_calls=auto, deterministic=True)
    if not c.training:
      total = plan.steps_per_epoch * b
      remaining_real = max(plan.examples_per_epoch - start, 0)
      pad = total - start - remaining_real
      if pad > 0:
        ds = ds.concatenate(
            tf.data.Dataset.from_tensors(_zeros_like_spec(ds.element_spec)).repeat(pad))
    ds = ds.batch(b, drop_remainder=True)
    ds = ds.map(self._batch_fn(), num_parallel_calls=auto, deterministic=True)
    if c.prefetch:
      ds = ds.prefetch(c.prefetch)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)

  def _decode_fn(self):
    c = self._c
    source = self._source
    size = c.frame_size
    resize = c.get('frame_resize', 0)

    def decode(epoch, pos, record):
      e = source.parse(record)
      seed = self._seed(epoch, 0, pos)
      fbank = source.decode_fbank(e[schema.FBANK])
      fbank = _crop_or_pad(fbank, c.target_length)
      frames = e[schema.FRAMES]
      n = tf.shape(frames)[0]
      if c.mode == 'mavil':
        if schema.FRAME_TIMES in e:
          times = e[schema.FRAME_TIMES]
        else:
          times = tf.cast(tf.range(n), tf.float32) / c.mavil_fps
        u = (tf.random.stateless_uniform([], seed) if c.training
             else tf.constant(0.5))
        idx = T.mavil_frame_indices(times, c.num_frames, c.mavil_fps, u)
        out_frames = tf.ensure_shape(T.decode_frames(frames, idx, size),
                                     [c.num_frames, size, size, 3])
      elif not c.training and c.eval_all_frames:
        out_frames = T.decode_frames(frames, tf.range(n), size)
        out_frames = tf.ensure_shape(
            out_frames, [schema.CAV_MAE_NUM_FRAMES, size, size, 3])
      else:
        if c.training:
          idx = tf.random.stateless_uniform([], seed, minval=0, maxval=n,
                                            dtype=tf.int32)
        else:
          idx = 5 if c.frame_use == -1 else c.frame_use
          if frames.shape[0] is not None and idx >= frames.shape[0]:
            raise ValueError(f'config.data.frame_use: frame {idx} is beyond the '
                             f'{frames.shape[0]} stored frames')
          check = tf.debugging.assert_less(
              idx, n, message='config.data.frame_use is beyond the stored frames')
          with tf.control_dependencies([check]):
            frames = tf.identity(frames)
        out_frames = T.decode_one_frame(frames, idx, size)
      if resize:
        out_frames = tf.cast(tf.round(tf.image.resize(
            out_frames, [resize, resize], method='area')), tf.uint8)
      out = {
          'fbank': fbank,
          'frames': out_frames,
          'labels': e[schema.LABELS],
          'mask': tf.constant(1.0, tf.float32),
          'epoch': epoch,
          'pos': pos,
      }
      if c.return_clip_id:
        out['clip_id'] = e[schema.CLIP_ID]
      return out

    return decode

  def _batch_fn(self):
    """Batch transforms: random draws in plain TF, then one XLA-compiled function.

    Stateless random generation is slow under XLA on CPU, while the elementwise math
    (casts, ImageNet and log-mel normalisation, mixup, masks, roll) is several times
    faster fused by XLA; hence the split.
    """
    c = self._c
    dtype = DTYPES[c.dtype]
    training = c.training
    bsz = self._plan.host_batch
    use_mixup = training and c.mixup > 0
    use_specaug = training and bool(c.freqm or c.timem)
    use_noise = training and c.noise
    smooth = float(c.label_smooth) if training else 0.0
    freqm, timem = c.freqm, c.timem
    t_size, f_size = c.target_length, c.num_mel_bins
    philox_noise = c.noise_rng == 'philox'

    def math(fbank, frames_u8, labels, d):
      audio = tf.cast(fbank, tf.float32)
      frames = T.normalize_frames(frames_u8)
      if use_mixup:
        audio, frames, targets = T.apply_mixup(
            audio, frames, labels, d['do_mix'], d['lam'], d['partner'], smooth)
      else:
        targets = T.smooth_labels(labels, smooth)
      if use_specaug:
        audio = T.spec_augment(audio, d['fs'], d['fe'], d['ts'], d['te'])
      audio = T.normalize_audio(audio, float(c.norm_mean), float(c.norm_std),
                                float(c.norm_std_factor))
      if use_noise:
        noise_u = d.get('noise_u')
        if noise_u is None:
          noise_u = T.hash_uniform([bsz, t_size, f_size], d['noise_keys'])
        audio = T.add_noise_and_roll(audio, noise_u, d['noise_scale'], d['shifts'])
      return tf.cast(audio, dtype), tf.cast(frames, dtype), targets

    math = tf.function(math, jit_compile=bool(c.jit_transforms))

    def batch_fn(b):
      # Every batch lies within one epoch; its step there names its randomness.
      step = b['pos'][0] // bsz
      seeds = T.split_seed(self._seed(b['epoch'][0], 1, step), 3)
      d = {}
      if use_mixup:
        d['do_mix'], d['lam'], d['partner'] = T.mixup_draws(
            bsz, float(c.mixup), seeds[0], float(c.mixup_alpha))
      if use_specaug:
        d['fs'], d['fe'], d['ts'], d['te'] = T.spec_augment_draws(
            bsz, freqm, timem, t_size, f_size, seeds[1])
      if use_noise:
        noise_u, d['noise_scale'], d['shifts'] = T.noise_draws(
            bsz, t_size, f_size, seeds[2], with_noise=philox_noise)
        if philox_noise:
          d['noise_u'] = noise_u
        else:
          d['noise_keys'] = T.hash_keys(T.fold_in(seeds[2], 1))
      audio, frames, targets = math(b['fbank'], b['frames'], b['labels'], d)
      out = {'audio': audio, 'frames': frames, 'labels': targets, 'mask': b['mask']}
      if 'clip_id' in b:
        out['clip_id'] = b['clip_id']
      return out

    return batch_fn


def _crop_or_pad(fbank, target_length):
  t = tf.shape(fbank)[0]
  fbank = fbank[:target_length]
  fbank = tf.pad(fbank, [[0, tf.maximum(target_length - t, 0)], [0, 0]])
  return tf.ensure_shape(fbank, [target_length, schema.NUM_MEL_BINS])


def _zeros_like_spec(spec):
  def zero(s):
    if s.dtype == tf.string:
      return tf.constant('', shape=s.shape)
    return tf.zeros(s.shape, s.dtype)
  return tf.nest.map_structure(zero, spec)


def create_iterator(config, dataset: Optional[tf.data.Dataset] = None, *,
                    process_index: Optional[int] = None,
                    process_count: Optional[int] = None) -> InputIterator:
  """Builds the input iterator of a `config.data` section.

  Args:
    config: a `config.data` ConfigDict (see `default_data_config`).
    dataset: optional `tf.data.Dataset` of schema examples (finite); if None the
      prepared TFDS dataset named by config.name/data_dir or config.builder_dir is read.
    process_index, process_count: this host and the number of hosts; default
      jax.process_index() / jax.process_count(). Injectable to simulate hosts.
  """
  return InputIterator(config, dataset, process_index=process_index,
                       process_count=process_count)


def lookup_clips(config, clip_ids) -> dict[str, dict[str, Any]]:
  """The stored log-mel and middle frame of some clips of a prepared split, for pictures.

  One pass over the split named by the `config.data`-style section (name + data_dir or
  builder_dir, split), decoding only the clips asked for. Returns {clip_id: {"fbank":
  float32 [T, F] (un-normalised, as stored), "frame": JPEG bytes of the middle stored
  frame, "path": the source path}}; ids the split does not hold are left out.
  """
  wanted = sorted({str(i) for i in clip_ids})
  if not wanted:
    return {}
  source = _make_source(config, None, 0, 1)
  if not isinstance(source, _TfdsSource):
    raise ValueError('lookup_clips reads prepared TFDS datasets')
  features = source._features  # pylint: disable=protected-access
  decoders = {schema.FRAMES: tfds.decode.SkipDecoding(),
              schema.FBANK: tfds.decode.SkipDecoding()}
  ids = tf.constant(wanted)

  def parse(record):
    e = features.deserialize_example(record, decoders=decoders)
    return {k: e[k] for k in (schema.CLIP_ID, schema.FBANK, schema.FRAMES)
            if k in e} | {schema.PATH: e.get(schema.PATH, tf.constant(''))}

  found = {}
  records = source.records().map(parse).filter(
      lambda e: tf.reduce_any(tf.equal(e[schema.CLIP_ID], ids)))
  for e in records.as_numpy_iterator():
    clip = e[schema.CLIP_ID].decode('utf-8', 'replace')
    frames = e[schema.FRAMES]
    found[clip] = {
        'fbank': np.asarray(source.decode_fbank(e[schema.FBANK]), np.float32),
        'frame': bytes(frames[len(frames) // 2]) if len(frames) else None,
        'path': e[schema.PATH].decode('utf-8', 'replace')}
    if len(found) == len(wanted):
      break
  return found


__all__ = [
    'InputIterator', 'balanced_weights', 'create_iterator', 'default_data_config',
    'lookup_clips',
    'validate_config',
]
