"""TFDS builders producing schema.py examples (importing this registers them with TFDS)."""

from avmae_jax.data.builders.common import ClipBuilder
from avmae_jax.data.builders.common import ClipConfig
from avmae_jax.data.builders.common import FAILURES_FILE
from avmae_jax.data.builders.common import Item
from avmae_jax.data.builders.synthetic_builder import AvmaeSynthetic
from avmae_jax.data.builders.synthetic_builder import prepare_for_config
from avmae_jax.data.builders.synthetic_builder import synthetic_config
from avmae_jax.data.builders.video_datasets import AvmaeAudioset
from avmae_jax.data.builders.video_datasets import AvmaeDatafile
from avmae_jax.data.builders.video_datasets import AvmaeVggsound
from avmae_jax.data.builders.video_datasets import AvmaeVideos
