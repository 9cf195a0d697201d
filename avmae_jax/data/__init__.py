"""Input side of avmae_jax: decoding, features, TFDS datasets and the tf.data pipeline.

This is the only package that may import TensorFlow; models, training and export
import without it.
"""
