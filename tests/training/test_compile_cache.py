"""The train command's persistent compilation cache: where config.compilation_cache_dir
points it."""

import os

import jax
import pytest

from avmae_jax.training import compile_cache


def test_auto_follows_the_environment_then_the_user_cache(monkeypatch, tmp_path):
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "explicit"))
  assert compile_cache.resolve("auto") == str(tmp_path / "explicit")
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert compile_cache.resolve("auto") == os.path.join(str(tmp_path / "xdg"), "avmae_jax", "jax")
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert compile_cache.resolve(None) == os.path.join(str(tmp_path / "home"), ".cache",
                                                     "avmae_jax", "jax")
  assert compile_cache.resolve("") == ""
  assert compile_cache.resolve("gs://bucket/cache") == "gs://bucket/cache"
  with pytest.raises(ValueError, match="compilation_cache_dir must be a path"):
    compile_cache.resolve(3)


def test_enable_points_jax_at_the_directory(tmp_path):
  before = jax.config.jax_compilation_cache_dir
  try:
    path = compile_cache.enable(str(tmp_path / "cache"))
    assert path == str(tmp_path / "cache") and os.path.isdir(path)
    assert jax.config.jax_compilation_cache_dir == path
    assert compile_cache.enable("") == ""  # off: JAX's setting is left alone
    assert jax.config.jax_compilation_cache_dir == path
  finally:
    jax.config.update("jax_compilation_cache_dir", before)
