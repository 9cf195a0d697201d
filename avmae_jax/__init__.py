"""avmae_jax: CAV-MAE and MAViL audio-visual masked autoencoders in JAX/Flax.

The top level stays light: importing it pulls in neither TensorFlow nor PyTorch.
`avmae_jax.load(path)` opens a checkpoint written by this project or a reference
PyTorch `.pth` and returns a model with `.features`, `.classify` and `.save_torch`.
"""

__version__ = "0.1.0"


def load(path, **overrides):
  """Loads a model from an avmae_jax checkpoint directory or a PyTorch `.pth`.

  See `avmae_jax.api.load` for the arguments.
  """
  from avmae_jax import api  # pylint: disable=import-outside-toplevel
  return api.load(path, **overrides)
