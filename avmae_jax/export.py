r"""Checkpoint conversion between avmae_jax and the reference PyTorch layout.

  # ours -> .pth that loads with strict=True into the reference classes
  python -m avmae_jax.export --checkpoint DIR --out FILE.pth [--module_prefix]
  # reference .pth (CAVMAE or CAVMAEFT, with or without `module.`) -> model checkpoint DIR
  python -m avmae_jax.export --torch FILE.pth --out DIR
  # ImageNet MAE ViT-B -> the CAV-MAE pretraining initialisation the paper's recipes use
  python -m avmae_jax.export --imagenet_mae mae_pretrain_vit_base_full.pth --out DIR \
      [--config configs/cav_mae_pretrain.py:size=base]

A model checkpoint DIR is what training starts or fine-tunes from (`config.init_from`).
"""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from avmae_jax import api
from avmae_jax import models
from avmae_jax.checkpoints import interop

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "avmae_jax model checkpoint directory.")
_TORCH = flags.DEFINE_string("torch", None, "Reference-layout PyTorch .pth to import.")
_IMAGENET_MAE = flags.DEFINE_string("imagenet_mae", None, "ImageNet MAE ViT .pth to map.")
_OUT = flags.DEFINE_string("out", None, "Output .pth file or checkpoint directory.")
_MODULE_PREFIX = flags.DEFINE_bool("module_prefix", False,
                                   "Prefix keys with `module.` as DataParallel saved them.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing output.")
_SEED = flags.DEFINE_integer("seed", 0, "Init seed for parameters MAE does not provide.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Pretraining config whose model the ImageNet MAE weights initialise.",
    lock_config=True)


def main(argv):
  del argv
  sources = [f for f in (_CHECKPOINT, _TORCH, _IMAGENET_MAE) if f.value]
  if len(sources) != 1 or not _OUT.value:
    raise app.UsageError("give exactly one of --checkpoint, --torch, --imagenet_mae, and --out")
  try:
    if _CHECKPOINT.value:
      model = api.load(_CHECKPOINT.value)
      model.save_torch(_OUT.value, _MODULE_PREFIX.value)
      print(f"wrote {_OUT.value}: {len(model.state_dict())} tensors ({model.kind})")
    elif _TORCH.value:
      model = api.load(_TORCH.value)
      model.save(_OUT.value, overwrite=_OVERWRITE.value)
      print(f"wrote {_OUT.value} ({model.kind})")
    else:
      _import_imagenet_mae()
  except (interop.CheckpointError, FileNotFoundError, FileExistsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


def _import_imagenet_mae():
  model_config = (dict(_CONFIG.value.model) if _CONFIG.value is not None
                  else {"kind": "cav_mae", **models.size_fields("base")})
  module = models.build(model_config)
  params = models.init_params(module, _SEED.value)
  state_dict, untouched = module.map_imagenet_mae(interop.read_pth(_IMAGENET_MAE.value),
                                                  interop.flax_to_torch(params))
  params, _ = interop.torch_to_flax(state_dict, params, strict=True, source="mapped MAE")
  api.LoadedModel(module, params).save(_OUT.value, overwrite=_OVERWRITE.value)
  print(f"wrote {_OUT.value}: {len(state_dict) - len(untouched)} tensors from MAE, "
        f"{len(untouched)} at init: {', '.join(untouched)}")


if __name__ == "__main__":
  app.run(main)
