"""`python -m avmae_jax.bench data ...`: prepare and input-pipeline throughput.

Writes (or reuses) a local prepared dataset of random schema examples (random log-mel,
smooth random JPEG frames) in TFDS form, then times the tf.data pipeline with the
pretraining and the fine-tuning transforms in samples/s. The prepare half calls the
TFDS builders' own prepare benchmark when one exists. Human-readable lines first, the
last line is one JSON object with every figure.
"""

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from avmae_jax.data import pipeline
from avmae_jax.data import schema

BENCH_NAME = 'avmae_pipeline_bench'


def random_examples(num_examples: int, num_classes: int, num_frames: int,
                    seed: int = 0, frame_spacing: float = 1.0):
  """Yields schema examples (decoded form, as a TFDS builder would encode them)."""
  rng = np.random.default_rng(seed)
  size = schema.FRAME_SIZE
  for i in range(num_examples):
    # Log-mel-like values: a smooth spectral envelope plus noise, in the usual range.
    env = np.linspace(-2.0, -10.0, schema.NUM_MEL_BINS)[None, :]
    fbank = (env + rng.normal(0.0, 2.0, (schema.TARGET_FRAMES, schema.NUM_MEL_BINS)))
    # Blocky images plus mild noise: natural-image-like JPEG sizes (~20 KB at 224),
    # unlike white noise, and cheap to make.
    low = rng.integers(0, 256, (num_frames, 8, 8, 3)).astype(np.int16)
    frames = np.repeat(np.repeat(low, size // 8, axis=1), size // 8, axis=2)
    frames = np.clip(frames + rng.integers(-4, 5, frames.shape), 0, 255).astype(np.uint8)
    labels = np.zeros(num_classes, np.uint8)
    labels[rng.choice(num_classes, size=rng.integers(1, 4), replace=False)] = 1
    yield {
        schema.CLIP_ID: f'clip{i:06d}',
        schema.LABELS: labels,
        schema.FBANK: fbank.astype(np.float16),
        schema.FRAMES: frames,
        schema.FRAME_TIMES: (np.arange(num_frames) * frame_spacing).astype(np.float32),
        schema.PATH: f'/synthetic/clip{i:06d}.mp4',
    }


def _features(num_classes, num_frames, fbank_encoding):
  """The schema's FeaturesDict, or (for comparison only) one with another fbank encoding."""
  features = schema.tfds_features(num_classes, num_frames)
  if fbank_encoding == 'zlib':
    return features
  feats = dict(features.items())
  feats[schema.FBANK] = tfds.features.Tensor(
      shape=(schema.TARGET_FRAMES, schema.NUM_MEL_BINS), dtype=np.float16,
      encoding=fbank_encoding)
  return tfds.features.FeaturesDict(feats)


def write_dataset(data_dir: str, num_examples: int = 512, num_classes: int = 527,
                  num_frames: int = schema.CAV_MAE_NUM_FRAMES, seed: int = 0,
                  split: str = 'train', num_shards: int = 4,
                  fbank_encoding: str = 'zlib') -> str:
  """Writes a prepared TFDS dataset of random examples; returns its builder_dir.

  Written with `tfds.folder_dataset.write_metadata` over TFRecord shards serialised by
  the schema's FeaturesDict, i.e. the layout a TFDS builder produces, without needing a
  builder class (and without `download_and_prepare`). `fbank_encoding` other than the
  schema's 'zlib' ('bytes') exists only to measure what the compression costs.
  """
  features = _features(num_classes, num_frames, fbank_encoding)
  builder_dir = os.path.join(data_dir, BENCH_NAME, '1.0.0')
  tf.io.gfile.makedirs(builder_dir)
  template = '{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}'
  examples = random_examples(num_examples, num_classes, num_frames, seed)
  bounds = np.linspace(0, num_examples, num_shards + 1).astype(int)
  lengths, num_bytes = [], 0
  for shard in range(num_shards):
    name = (f'{BENCH_NAME}-{split}.tfrecord-{shard:05d}-of-{num_shards:05d}')
    with tf.io.TFRecordWriter(os.path.join(builder_dir, name)) as w:
      for _ in range(bounds[shard + 1] - bounds[shard]):
        record = features.serialize_example(next(examples))
        num_bytes += len(record)
        w.write(record)
    lengths.append(int(bounds[shard + 1] - bounds[shard]))
  tfds.folder_dataset.write_metadata(
      data_dir=builder_dir, features=features,
      split_infos=[tfds.core.SplitInfo(name=split, shard_lengths=lengths,
                                       num_bytes=num_bytes)],
      filename_template=template, check_data=False,
      description='Random schema examples for the input pipeline benchmark.')
  return builder_dir


def _find_prepare_benchmark():
  """The prepare benchmark (`benchmark_prepare`, owned by the builders' side)."""
  import importlib  # pylint: disable=import-outside-toplevel
  for mod in ('avmae_jax.data.clip', 'avmae_jax.data.builders',
              'avmae_jax.prepare'):
    try:
      m = importlib.import_module(mod)
    except ImportError:
      continue
    fn = getattr(m, 'benchmark_prepare', None)
    if callable(fn):
      return fn
  return None


def _cpu_seconds() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def _existing(data_dir: str, args, num_frames: int) -> str:
  """The builder_dir of a matching random dataset already in data_dir, or ''."""
  builder_dir = os.path.join(data_dir, BENCH_NAME, '1.0.0')
  if not tf.io.gfile.exists(os.path.join(builder_dir, 'dataset_info.json')):
    return ''
  builder = tfds.builder_from_directory(builder_dir)
  # Compare the fbank feature with its encoding (zlib or bytes).
  expected = _features(args.num_classes, schema.CAV_MAE_NUM_FRAMES, args.fbank_encoding)
  same = (builder.info.splits[args.split].num_examples == args.num_examples and
          builder.info.features[schema.LABELS].shape == (args.num_classes,) and
          builder.info.features[schema.FRAMES].shape[0] == num_frames and
          str(builder.info.features[schema.FBANK].to_json_content()) ==
          str(expected[schema.FBANK].to_json_content()))
  return builder_dir if same else ''


def time_pipeline(config, warmup_batches: int, batches: int) -> dict:
  """Samples/s of this host's iterator over `batches` after `warmup_batches`.

  Also the process CPU time per sample: on a machine shared with other work, wall
  throughput understates what the pipeline does on its own cores, and
  cores / cpu-time-per-sample bounds it from above.
  """
  it = pipeline.create_iterator(config, process_index=0, process_count=1)
  for _ in range(warmup_batches):
    next(it)
  c0 = _cpu_seconds()
  t0 = time.perf_counter()
  n = 0
  for _ in range(batches):
    batch = next(it)
    n += batch['audio'].shape[0]
  dt = time.perf_counter() - t0
  cpu = _cpu_seconds() - c0
  return {'samples_per_s': n / dt, 'samples': n, 'seconds': dt,
          'cpu_ms_per_sample': 1e3 * cpu / n,
          'steps_per_epoch': it.steps_per_epoch}


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Entry point of `python -m avmae_jax.bench data`; returns the exit status."""
  run(argv)
  return 0


def run(argv: Optional[Sequence[str]] = None) -> dict:
  """Runs the benchmark, prints its lines (the last one JSON) and returns the figures."""
  parser = argparse.ArgumentParser(prog='python -m avmae_jax.bench data',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('--data_dir', default='',
                      help='where to write/reuse the random dataset (default: a '
                           'temporary directory)')
  parser.add_argument('--builder_dir', default='',
                      help='time an existing prepared dataset instead')
  parser.add_argument('--split', default='train')
  parser.add_argument('--num_examples', type=int, default=1024)
  parser.add_argument('--num_classes', type=int, default=527)
  parser.add_argument('--batch_size', type=int, default=48)
  parser.add_argument('--shuffle_buffer', type=int, default=2048)
  parser.add_argument('--warmup_batches', type=int, default=5)
  parser.add_argument('--batches', type=int, default=60)
  parser.add_argument('--dtype', default='float32', choices=sorted(pipeline.DTYPES))
  parser.add_argument('--mode', default='cav_mae', choices=pipeline.MODES)
  parser.add_argument('--skip_prepare', action='store_true')
  parser.add_argument('--prepare_clips', type=int, default=4,
                      help='generated clips timed by the prepare benchmark')
  parser.add_argument('--fbank_encoding', default='bytes', choices=('zlib', 'bytes'),
                      help="'zlib' departs from schema.py; only to measure its cost")
  args = parser.parse_args(argv)

  result = {'benchmark': 'data', 'cpu_count': os.cpu_count(),
            'load_average_1m_at_start': os.getloadavg()[0],
            'batch_size': args.batch_size, 'dtype': args.dtype, 'mode': args.mode,
            'fbank_encoding': args.fbank_encoding}

  prepare_fn = None if args.skip_prepare else _find_prepare_benchmark()
  if prepare_fn is not None:
    prep = prepare_fn(num_clips=args.prepare_clips)
    print('prepare (decode, 16 kHz audio, fbank, 10 frames + JPEG; one core): '
          f'{prep["clips_per_s_per_core"]:.2f} clips/s per core, '
          f'{prep["s_per_clip"]:.2f} s per clip, fbank {prep["fbank_ms_per_clip"]:.1f} ms')
    result['prepare'] = prep
  else:
    print('prepare: not measured' +
          (' (--skip_prepare)' if args.skip_prepare else
           ' (no benchmark_prepare found in avmae_jax.data)'))
    result['prepare'] = None

  tmp = None
  builder_dir = args.builder_dir
  if not builder_dir:
    num_frames = 20 if args.mode == 'mavil' else schema.CAV_MAE_NUM_FRAMES
    data_dir = args.data_dir
    if not data_dir:
      tmp = tempfile.TemporaryDirectory(prefix='avmae_bench_')
      data_dir = tmp.name
    builder_dir = _existing(data_dir, args, num_frames)
    if builder_dir:
      print(f'reusing the random dataset in {builder_dir}')
    else:
      t0 = time.perf_counter()
      builder_dir = write_dataset(data_dir, args.num_examples, args.num_classes,
                                  num_frames=num_frames,
                                  fbank_encoding=args.fbank_encoding)
      dt = time.perf_counter() - t0
      print(f'wrote {args.num_examples} random examples in {dt:.1f} s '
            f'({args.num_examples / dt:.0f}/s) to {builder_dir}')
      result['write_random_examples_per_s'] = args.num_examples / dt

  for stage in ('pretrain', 'finetune'):
    c = pipeline.default_data_config(stage, args.mode)
    c.builder_dir = builder_dir
    c.split = args.split
    c.batch_size = args.batch_size
    c.shuffle_buffer = args.shuffle_buffer
    c.dtype = args.dtype
    r = time_pipeline(c, args.warmup_batches, args.batches)
    print(f'pipeline {stage}: {r["samples_per_s"]:.0f} samples/s '
          f'({r["samples"]} samples in {r["seconds"]:.2f} s, batch {args.batch_size}, '
          f'{r["steps_per_epoch"]} steps/epoch; {r["cpu_ms_per_sample"]:.2f} ms CPU '
          f'per sample, load average {os.getloadavg()[0]:.1f})')
    result[f'pipeline_{stage}_samples_per_s'] = r['samples_per_s']
    result[f'pipeline_{stage}_cpu_ms_per_sample'] = r['cpu_ms_per_sample']

  if tmp is not None:
    tmp.cleanup()
  print(json.dumps(result, sort_keys=True))
  return result


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
