r"""Command line for preparing datasets: `python -m avmae_jax.prepare <dataset> [options]`.

A thin argparse layer over the TFDS builders in avmae_jax/data/builders. Examples:

  python -m avmae_jax.prepare synthetic --data_dir out --num_train 512 --num_test 128
  python -m avmae_jax.prepare videos --folder clips/ --data_dir out --workers 2
  python -m avmae_jax.prepare videos --manifest clips.csv --label_csv labels.csv --data_dir out
  python -m avmae_jax.prepare datafile --json train=train.json --json test=eval.json \
      --label_csv class_labels_indices.csv --data_dir out
  python -m avmae_jax.prepare audioset --manual_dir as/ --data_dir out --beam \
      --beam_options=--direct_running_mode=multi_processing,--direct_num_workers=8

(DirectRunner, the default runner, uses one worker in its default in_memory mode whatever
--direct_num_workers says: decoding is CPU-bound, hence multi_processing.)

Bad clips are skipped and listed in `<dataset>/<config>/<version>/failures.jsonl`; the exit
status is 1 if any clip failed (0 with --allow_failures). Re-running resumes: per-clip features
are cached under `<dataset>/<config>/_prepare/`, so only what is missing is decoded again
(use --regenerate to rebuild an already complete dataset from that cache).
"""

import argparse
import json
import os
import sys


def _parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m avmae_jax.prepare", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("dataset", choices=["synthetic", "videos", "datafile", "audioset", "vggsound"])
  p.add_argument("--data_dir", required=True, help="TFDS data dir (output).")
  p.add_argument("--frames", default="cavmae", choices=["cavmae", "fps2"],
                 help="cavmae: 10 frames at the reference positions; fps2: 20 frames at 2/s.")
  p.add_argument("--downmix", action="store_true",
                 help="Average the audio channels instead of keeping the first (reference).")
  p.add_argument("--workers", type=int, default=1, help="Local worker processes.")
  p.add_argument("--beam", action="store_true", help="Generate with an Apache Beam pipeline.")
  p.add_argument("--beam_options", default="",
                 help="Comma-separated Beam pipeline flags, e.g. --runner=DataflowRunner,...")
  p.add_argument("--regenerate", action="store_true",
                 help="Rebuild the dataset even if it is complete (cached clips are reused).")
  p.add_argument("--allow_failures", action="store_true",
                 help="Exit 0 even if some clips failed (they are still listed).")
  p.add_argument("--no_progress", action="store_true")
  # videos
  p.add_argument("--manifest", help="videos: CSV with path[,labels,clip_id,split].")
  p.add_argument("--folder", help="videos: folder of videos (class = sub-folder).")
  p.add_argument("--label_csv", help="index,mid,display_name label file.")
  # datafile
  p.add_argument("--json", action="append", default=[],
                 help="datafile: SPLIT=PATH of a CAV-MAE JSON datafile (repeatable).")
  # audioset / vggsound
  p.add_argument("--manual_dir", help="audioset/vggsound: folder with lists and videos.")
  # synthetic
  p.add_argument("--num_train", type=int, default=512)
  p.add_argument("--num_test", type=int, default=128)
  p.add_argument("--num_classes", type=int, default=8)
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def make_builder(args):
  """The TFDS builder the parsed arguments describe."""
  from avmae_jax.data import builders  # pylint: disable=import-outside-toplevel
  from avmae_jax.data.builders import common  # pylint: disable=import-outside-toplevel

  num_frames = 10 if args.frames == "cavmae" else 20
  progress = not args.no_progress
  if args.dataset == "synthetic":
    config = builders.synthetic_config(args.num_train, args.num_test, args.seed,
                                       args.num_classes, num_frames)
    return builders.AvmaeSynthetic(data_dir=args.data_dir, config=config, beam=args.beam,
                                   num_workers=args.workers, progress=progress)
  config = next(c for c in common.CLIP_CONFIGS if c.name == args.frames)
  if args.downmix:
    config = common.ClipConfig(name=config.name + "_downmix", description="Down-mixed audio.",
                               num_frames=num_frames, downmix=True)
  kwargs = dict(data_dir=args.data_dir, config=config, beam=args.beam,
                num_workers=args.workers, progress=progress)
  if args.dataset == "videos":
    if bool(args.manifest) == bool(args.folder):
      raise SystemExit("videos: give exactly one of --manifest or --folder")
    return builders.AvmaeVideos(manifest=args.manifest, folder=args.folder,
                                label_csv=args.label_csv, **kwargs)
  if args.dataset == "datafile":
    if not args.json or not args.label_csv:
      raise SystemExit("datafile: give --json SPLIT=PATH (repeatable) and --label_csv")
    datafiles = {}
    for spec in args.json:
      split, sep, path = spec.partition("=")
      if not sep:
        split, path = "train", spec
      datafiles[split] = path
    return builders.AvmaeDatafile(datafiles=datafiles, label_csv=args.label_csv, **kwargs)
  if not args.manual_dir:
    raise SystemExit(f"{args.dataset}: give --manual_dir")
  cls = builders.AvmaeAudioset if args.dataset == "audioset" else builders.AvmaeVggsound
  return cls(manual_dir=args.manual_dir, **kwargs)


def main(argv=None) -> int:
  args = _parse_args(sys.argv[1:] if argv is None else argv)
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  builder = make_builder(args)
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if args.regenerate
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  config_kwargs = dict(download_mode=mode, manual_dir=args.manual_dir)
  if args.beam:
    beam = tfds.core.lazy_imports.apache_beam
    flags = [f for f in args.beam_options.split(",") if f]
    config_kwargs["beam_options"] = beam.options.pipeline_options.PipelineOptions(flags=flags)
  builder.download_and_prepare(
      download_dir=os.path.join(args.data_dir, "downloads"),
      download_config=tfds.download.DownloadConfig(**config_kwargs))
  failures = builder.failures() if hasattr(builder, "failures") else []
  counts = {name: split.num_examples for name, split in builder.info.splits.items()}
  print(json.dumps({"dataset_dir": os.fspath(builder.data_dir), "examples": counts,
                    "failed": len(failures)}))
  for f in failures:
    print(f"FAILED [{f.get('split')}] {f['reason']}", file=sys.stderr)
  if failures:
    print(f"{len(failures)} clip(s) skipped; see "
          f"{os.path.join(os.fspath(builder.data_dir), 'failures.jsonl')}", file=sys.stderr)
    if not args.allow_failures:
      return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
