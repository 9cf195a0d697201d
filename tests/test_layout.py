"""The layout holds: packages import one way, and only the models look at a model's kind.

Static checks on the source (no imports): each package of avmae_jax/ may import only the
packages below it, and outside avmae_jax/models/ no code compares a model's kind or class
(it asks the model's interface, models/common.py, instead).
"""

import ast
import pathlib
import re

import pytest

from tests import _helpers

PACKAGE = pathlib.Path(_helpers.ROOT) / "avmae_jax"
# Package -> the avmae_jax packages (and top-level modules) its modules may import.
ALLOWED = {
    "data": {"data"},
    "models": {"models"},
    "parallel": {"parallel"},
    "torch_port": {"torch_port"},
    "checkpoints": {"checkpoints", "models"},
    "evaluators": {"evaluators", "models", "parallel"},
    "tasks": {"tasks", "models", "checkpoints", "evaluators", "parallel"},
    "training": {"training", "tasks", "models", "checkpoints", "parallel"},
}
# Comparisons of a model's kind or class, and capability sniffing, that the interface replaces.
KIND_CHECKS = [
    r"\bisinstance\([^)]*\b(CAVMAE|CAVMAEFT|MAViL|MAViLFT)\b",
    r"\btype\([^)]*\)\s+is\s+(cav_mae|mavil)\.",
    # a model, module, model config or trainer's kind compared or looked up in a literal set
    r"""\b(model|module|config\.model|model_config|fields|trainer|self|teacher|student)"""
    r"""(\.\w+)*(\.kind\b|\.get\(["']kind["']\)|\[["']kind["']\])\s*(==|!=|(not\s+)?in\b)""",
    r"\bkind_of\(",
    r"\bFINETUNE(D)?_KINDS\b",
    r"\bhasattr\((self\.)?(model\.)?module\b",
]


def _imported_packages(path: pathlib.Path) -> set[str]:
  """avmae_jax.<name> of every import in a module (relative imports resolved)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      modules = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        modules = [f"avmae_jax.{path.parent.name}"]
      else:
        modules = [node.module or ""]
        if node.module == "avmae_jax":  # from avmae_jax import x
          modules = [f"avmae_jax.{alias.name}" for alias in node.names]
    else:
      continue
    names.update(m.split(".")[1] for m in modules if m.startswith("avmae_jax."))
  return names


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_one_way(package):
  for path in sorted((PACKAGE / package).rglob("*.py")):
    extra = _imported_packages(path) - ALLOWED[package]
    assert not extra, f"{path.relative_to(PACKAGE)} imports avmae_jax.{sorted(extra)}"


def test_only_the_models_look_at_a_models_kind():
  found = []
  for path in sorted(PACKAGE.rglob("*.py")):
    if path.is_relative_to(PACKAGE / "models"):
      continue
    for number, line in enumerate(path.read_text().splitlines(), 1):
      code = line.split("#", 1)[0]
      found += [f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}"
                for pattern in KIND_CHECKS if re.search(pattern, code)]
  assert not found, "\n".join(found)


def test_the_checks_find_what_they_look_for():
  """The patterns above are not vacuous: each matches the kind of line it forbids."""
  lines = ['if isinstance(module, mavil.MAViLFT):', 'if type(m) is cav_mae.CAVMAE:',
           'if config.model.kind == "cav_mae_ft":', 'if config.model.get("kind") == "mavil":',
           'if self.kind not in FINETUNE_KINDS:', 'if trainer.kind == "mavil":',
           'if model_config.get("kind") != "cav_mae":', 'models.kind_of(module)',
           'FINETUNE_KINDS = ()', 'if hasattr(module, "modes"):']
  for line in lines:
    assert any(re.search(p, line) for p in KIND_CHECKS), line
  for line in ('if module.is_classifier:', 'if item.kind == "reference":',
               'return [r for r in records if r.get("kind") == kind]'):
    assert not any(re.search(p, line) for p in KIND_CHECKS), line
