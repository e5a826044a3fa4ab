"""What ``step_time.py`` times: the models, the batch, the optimizers and the runners.

* :class:`Model` (the project's Llama) and :class:`FlaxGPTModel` (the GPT of
  ``examples/any_flax_model.py``, cut by ``absign_jax.cut_nnx``): weights built once,
  kept on the host, copied to the device for every method.
* :func:`make_batch`, :func:`make_tx` (the registry's optimizers at the benchmark's
  options) and :func:`config_for` (a preset or a checkpoint's shape, with overrides).
* Runners, each a callable that runs one step and returns its seconds:
  :class:`Runner` (a JAX training step), :class:`ForwardRunner` (the forward and loss
  only), the PyTorch runners of ``benchmarks/torch_ref.py`` (:func:`torch_runner`), and
  :func:`make_runner` / :func:`abstract_runner` that build them for a method.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, NamedTuple

import absign_jax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), "examples"))
import any_flax_model  # noqa: E402  (examples/any_flax_model.py)
import cost_model  # noqa: E402  (benchmarks/cost_model.py)
import lora as lora_lib  # noqa: E402  (benchmarks/lora.py)
import torch_ref  # noqa: E402  (benchmarks/torch_ref.py)

from absign_jax.llm import registry  # noqa: E402
from absign_jax.llm.config import RunConfig  # noqa: E402
from absign_jax.llm.model import Llama, LlamaConfig  # noqa: E402

TORCH_METHODS = ("torch_forward", "torch_adamw", "torch_block_sign")
# The optimizers are the registry's (absign_jax/llm/registry.py); adamw first, the
# reference of every other row.
_OPTIMIZERS = tuple(n for n, o in registry.OPTIMIZERS.items() if o.benchmarked)
METHODS = (("forward", "adamw") + tuple(m for m in _OPTIMIZERS if m != "adamw")
           + TORCH_METHODS)
# The rows a run times unless --methods says otherwise (--methods all: every row):
# those the ratios of the report read, and BAdam beside them; absignsgd_uniform and
# sign_sgd are context, opt-in, so that the default run fits in 10 minutes on a 2-core
# CPU.
DEFAULT_METHODS = ("forward", "adamw", "absignsgd", "block_adam", "lora") + TORCH_METHODS
BLOCK_METHODS = tuple(m for m in _OPTIMIZERS if registry.get(m).block)
# Timed block by block (forced active), weighted by visit frequencies.
PER_BLOCK_TIMED = BLOCK_METHODS + ("torch_block_sign",)
# Run order: ascending expected memory, so that a device's (never reset) peak-memory
# counter read after each method is that method's own peak; PyTorch last.
# (Other optimizers: before adamw, whose state is the largest.)
_BY_MEMORY = ("forward", "absignsgd", "absignsgd_uniform", "block_adam", "lora",
              "sign_sgd")
RUN_ORDER = (_BY_MEMORY
             + tuple(m for m in _OPTIMIZERS if m not in _BY_MEMORY + ("adamw",))
             + ("adamw",) + TORCH_METHODS)
LORA_RANK = 8
LR, WEIGHT_DECAY = 1e-5, 0.01
LOSS_RTOL = 1e-4  # PyTorch's loss against the JAX model's, before timing
# Every row but those that build a Llama (LoRA's adapters, PyTorch's model).
FLAX_GPT_METHODS = tuple(m for m in METHODS if m != "lora" and m not in TORCH_METHODS)


# ---------------------------------------------------------------------------------
# models and batch
# ---------------------------------------------------------------------------------


class Model:
  """A Llama's pure pieces and its weights: fresh copies on demand, loss, layered loss.

  The weights are built (or read) once, kept on the host, and copied to the device
  for every method (each donates its own parameters).
  """

  def __init__(self, cfg: LlamaConfig, seed: int = 0, module: Llama | None = None):
    self.cfg = cfg if module is None else module.config
    abstract = nnx.eval_shape(lambda: Llama(self.cfg, rngs=nnx.Rngs(seed)))
    self.parts = absign_jax.split_nnx(abstract)
    self._module, self._host, self._seed = module, None, seed

    def lora_graphdef():
      m = Llama(self.cfg, rngs=nnx.Rngs(seed))
      lora_lib.add_lora(m, rank=LORA_RANK, rngs=nnx.Rngs(seed + 1))
      return m

    graphdef = nnx.split(nnx.eval_shape(lora_graphdef), lora_lib.LoRAParam, ...)[0]
    self.lora_loss = lora_lib.lora_loss(graphdef)

  def module(self) -> Llama:
    """A fresh model with the weights (its own device arrays).

    The weights are built on the first call (eagerly, op by op: a jitted init of
    the list layout compiles for minutes on GPU) and kept on the host.
    """
    if self._host is None:
      module = self._module or Llama(self.cfg, rngs=nnx.Rngs(self._seed))
      self._graphdef, state = nnx.split(module)
      self._host = jax.tree.map(np.asarray, state)
      self._module = None
    return nnx.merge(self._graphdef, jax.tree.map(jnp.array, self._host))

  def params(self):
    """Fresh parameters (a device copy), as the steps train them (``split_nnx``
    presents list layers stacked)."""
    return absign_jax.split_nnx(self.module()).params

  def lora(self, model: Llama | None = None):
    """Fresh ``(adapters, frozen base)`` (on ``model``, default a fresh copy)."""
    model = self.module() if model is None else model
    lora_lib.add_lora(model, rank=LORA_RANK, rngs=nnx.Rngs(self._seed + 1))
    _, adapters, base = nnx.split(model, lora_lib.LoRAParam, ...)
    return adapters, base

  def lora_shapes(self):
    """The shapes of :meth:`lora`'s result; builds nothing."""
    return jax.eval_shape(lambda: self.lora(Llama(self.cfg, rngs=nnx.Rngs(self._seed))))


class FlaxGPTShape(NamedTuple):
  """The benchmark's view of ``examples/any_flax_model.py``'s GPT (what the
  measurement reads of a :class:`LlamaConfig`)."""
  gpt: any_flax_model.GPTConfig
  remat: bool = False
  loss_chunk: int | None = None
  arch: str = "flax-gpt"

  @classmethod
  def like(cls, cfg: LlamaConfig, seq: int) -> "FlaxGPTShape":
    """A GPT with the Llama's width, heads, MLP width, layers and vocabulary."""
    return cls(any_flax_model.GPTConfig(
        vocab=cfg.vocab_size, max_len=max(seq, 8), dim=cfg.dim, heads=cfg.n_heads,
        ff=cfg.hidden_dim, layers=cfg.n_layers, dtype=cfg.dtype))

  n_layers = property(lambda self: self.gpt.layers)
  vocab_size = property(lambda self: self.gpt.vocab)
  dtype = property(lambda self: self.gpt.dtype)

  def num_params(self) -> int:
    return self.gpt.num_params()

  def layer_matmuls(self) -> cost_model.LayerMatmuls:
    """Pre-norm attention (q, k, v and out projections of width ``dim``) and a GELU
    MLP of two matrices."""
    d, ff = self.gpt.dim, self.gpt.ff
    return cost_model.LayerMatmuls(params=4 * d * d + 2 * d * ff, output_params=ff * d,
                                   attention_width=d, head_params=d * self.gpt.vocab)


class FlaxGPTModel:
  """The GPT of ``examples/any_flax_model.py`` cut by ``absign_jax.cut_nnx``: the
  same ``parts`` / ``params()`` as :class:`Model` (no LoRA)."""

  def __init__(self, shape: FlaxGPTShape, seed: int = 0):
    self.cfg = shape
    self.parts = any_flax_model.cut(any_flax_model.MiniGPT(shape.gpt,
                                                           rngs=nnx.Rngs(seed)))
    self._host = jax.tree.map(np.asarray, self.parts.params)
    self.parts = self.parts._replace(params=None)  # the host copy is the one kept

  def params(self):
    return jax.tree.map(jnp.array, self._host)


def config_for(preset: str, seq: int, *, family: str = "llama", layout: str = "stacked",
               dtype: str | None = None, remat: bool | None = None,
               loss_chunk: int | None = None,
               model: str | None = None) -> tuple[LlamaConfig | FlaxGPTShape, str, str]:
  """The preset (or ``model``'s config) with the overrides, the layout, a name.

  ``model``: a .gguf file or a Hugging Face directory whose shape replaces the
  preset's; ``family="flax-gpt"``: the GPT at the preset's size (list layout).
  """
  overrides: dict[str, Any] = {"max_seq_len": max(seq, 8)}
  if dtype:
    overrides["dtype"] = dtype
  if remat is not None:
    overrides["remat"] = remat
  if loss_chunk is not None:
    overrides["loss_chunk"] = loss_chunk
  if model is None:
    cfg = LlamaConfig.preset(preset, **overrides)
    if family == "flax-gpt":
      return FlaxGPTShape.like(cfg, seq), "list", f"{preset}-flax-gpt"
    return cfg, layout, preset
  from absign_jax.llm import export  # pylint: disable=g-import-not-at-top
  cfg, _ = export.read_config_and_tokenizer(model)
  name = os.path.splitext(os.path.basename(os.path.normpath(model)))[0]
  return cfg.replace(**overrides), layout, name


def load_model(cfg: LlamaConfig | FlaxGPTShape, path: str | None = None
               ) -> Model | FlaxGPTModel:
  """The benchmark's model: random weights, or those of the checkpoint at ``path``."""
  if isinstance(cfg, FlaxGPTShape):
    return FlaxGPTModel(cfg)
  if path is None:
    return Model(cfg)
  from absign_jax.llm import export  # pylint: disable=g-import-not-at-top
  _, module, _ = export.load_model(
      path, dtype=cfg.dtype, scan_layers=cfg.scan_layers, remat=cfg.remat,
      loss_chunk=cfg.loss_chunk, max_seq_len=cfg.max_seq_len)
  return Model(cfg, module=module)


def layer_matmuls(cfg: LlamaConfig | FlaxGPTShape) -> cost_model.LayerMatmuls:
  """The matmul shape of one layer and of the head (see :mod:`cost_model`)."""
  if isinstance(cfg, FlaxGPTShape):
    return cfg.layer_matmuls()
  hd = cfg.head_size
  qkv = cfg.dim * hd * (cfg.n_heads + 2 * cfg.n_kv_heads)
  mlp = cfg.hidden_dim * cfg.dim  # each of gate, up and down
  return cost_model.LayerMatmuls(
      params=qkv + cfg.n_heads * hd * cfg.dim + 3 * mlp,
      # Sandwich norms normalise the down projection's output: the backward reads it.
      output_params=0 if cfg.sandwich_norm else mlp,
      attention_width=cfg.n_heads * hd, head_params=cfg.dim * cfg.vocab_size)


def make_batch(cfg: LlamaConfig, batch: int, seq: int, seed: int = 0) -> dict:
  r = np.random.default_rng(seed)
  x = r.integers(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
  return {"inputs": jnp.asarray(x[:, :-1]), "targets": jnp.asarray(x[:, 1:]),
          "mask": jnp.ones((batch, seq), jnp.float32)}


# ---------------------------------------------------------------------------------
# optimizers
# ---------------------------------------------------------------------------------


# The benchmark's options of the registry's optimizers (they set a step's cost, not its
# quality): LR, weight decay for adamw only, BAdam one step per block in ascending
# order, LoRA at 1e-4.
TX_OPTIONS = {"adamw": dict(weight_decay=WEIGHT_DECAY),
              "block_adam": dict(switch_every=1, block_order="ascending"),
              "lora": dict(lr=1e-4)}


def make_tx(method: str):
  """The optax transformation of optimizer ``method`` (the registry's factory)."""
  entry = registry.get(method)  # (ValueError: no optimizer, e.g. "forward")
  config = RunConfig(**{"lr": None if entry.parameter_free else LR,
                        "depth_bias": cost_model.DEPTH_BIAS,
                        **TX_OPTIONS.get(method, {})})
  return entry.make(config.lr, config)


# ---------------------------------------------------------------------------------
# runners
# ---------------------------------------------------------------------------------


def with_active(opt_state, block: int):
  """``opt_state`` with ``block`` made the active block (to time one block)."""
  is_bc = lambda s: isinstance(s, absign_jax.BlockCoordinateState)
  return jax.tree.map(
      lambda s: s._replace(active=jnp.asarray(block, jnp.int32)) if is_bc(s) else s,
      opt_state, is_leaf=is_bc)


class Runner:
  """Runs one training step and records the time of every call.

  ``state`` is the step's :class:`absign_jax.TrainState` (``step.init(params)``, or
  ``jax.eval_shape(step.init, params)`` to size programs from shapes alone).
  """

  def __init__(self, step, state, batch):
    self.step, self.state, self.batch = step, state, batch

  @property
  def params(self):
    return self.state.params

  @property
  def opt_state(self):
    return self.state.opt_state

  def __call__(self, block: int | None = None) -> tuple[float, int | None]:
    """One step (with ``block`` forced active, if given); returns (seconds, block)."""
    if block is not None:
      self.state = self.state._replace(opt_state=with_active(self.opt_state, block))
    active = None
    try:
      active = int(absign_jax.active_block(self.opt_state))
    except ValueError:
      pass
    jax.block_until_ready(self.state)
    t = time.perf_counter()
    self.state, metrics = self.step(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))
    return time.perf_counter() - t, active

  def lower(self, block=None):
    return self.step.lower(self.state, self.batch, block=block)

  def kept_layers(self) -> int | None:
    """How many layers above the active one keep their activations (block steps on
    a layered model; None otherwise)."""
    step = self.step
    if not isinstance(step, absign_jax.BlockTrainStep) or step.layered is None:
      return None
    lay = step.layered
    stack = absign_jax.train.model.subtree(self.params, lay.stack_path)
    h = jax.eval_shape(lay.embed, self.params, self.batch)
    ctx = jax.eval_shape(lay.batch_context, self.params, self.batch)
    return step.kept_layers(stack, h, ctx)


class ForwardRunner:
  """The model's forward and loss only, jitted (no gradient, no update): the floor."""

  def __init__(self, loss_fn, params, batch):
    self.fn = jax.jit(loss_fn)
    self.params, self.batch, self.opt_state = params, batch, ()
    self.step = None

  def __call__(self, block: int | None = None) -> tuple[float, None]:
    del block
    t = time.perf_counter()
    jax.block_until_ready(self.fn(self.params, self.batch))
    return time.perf_counter() - t, None

  def lower(self, block=None):
    del block
    return self.fn.lower(self.params, self.batch)


def make_runner(method: str, model: Model, batch: dict, layout_model: Model,
                dispatch: str, donate: bool = True,
                residuals: int | None = None,
                save_inputs_every: int = 1) -> tuple[Any, Any]:
  """A fresh step, parameters and optimizer state for ``method`` (JAX methods);
  ``residuals``: the block step's residual policy (None: the library's default);
  ``save_inputs_every``: see :class:`absign_jax.BlockTrainStep`."""
  if method == "forward":
    return ForwardRunner(layout_model.parts.loss_fn, layout_model.params(), batch), None
  tx = make_tx(method)
  if method == "lora":
    adapters, base = model.lora()
    step = absign_jax.FullTrainStep(model.lora_loss, tx, donate=donate)
    return Runner(step, step.init(adapters), {"data": batch, "base": base}), tx
  m = layout_model
  params = m.params()
  if method in BLOCK_METHODS:
    step = absign_jax.BlockTrainStep(m.parts.loss_fn, tx, layered=m.parts.layered,
                                     dispatch=dispatch, donate=donate,
                                     residuals=residuals,
                                     save_inputs_every=save_inputs_every)
  else:
    step = absign_jax.FullTrainStep(m.parts.loss_fn, tx, donate=donate)
  return Runner(step, step.init(params), batch), tx


def abstract_runner(method: str, model: Model, batch: dict, dispatch: str,
                    save_inputs_every: int = 1):
  """``method``'s runner on shapes alone (``jax.ShapeDtypeStruct`` parameters, state
  and batch): it lowers and compiles, and never runs."""
  shape = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                    tree)
  params, batch = shape(model.parts.params), shape(batch)
  if method == "forward":
    return ForwardRunner(model.parts.loss_fn, params, batch)
  if method == "lora":
    adapters, base = model.lora_shapes()
    step = absign_jax.FullTrainStep(model.lora_loss, make_tx(method))
    return Runner(step, jax.eval_shape(step.init, adapters),
                  {"data": batch, "base": base})
  if method in BLOCK_METHODS:
    step = absign_jax.BlockTrainStep(model.parts.loss_fn, make_tx(method),
                                     layered=model.parts.layered, dispatch=dispatch,
                                     save_inputs_every=save_inputs_every)
  else:
    step = absign_jax.FullTrainStep(model.parts.loss_fn, make_tx(method))
  return Runner(step, jax.eval_shape(step.init, params), batch)


def programs_of(runner, n: int) -> list[int | None]:
  """The distinct programs a step runs: one per block (per-block dispatch) or one."""
  step = getattr(runner, "step", None)
  if not isinstance(step, absign_jax.BlockTrainStep):
    return [None]
  spec = absign_jax.find_state(runner.opt_state).partition.spec(runner.params)
  rng = spec.stacked_range()
  if step.dispatch == "switch" or (step.layered is not None and rng == (0, n)):
    return [None]
  return list(range(n))


def torch_runner(method: str, model: Model, batch: dict, jax_loss: float,
                 log: Callable[[str], None],
                 threads: int | None = None) -> tuple[Any, dict[str, Any]]:
  """A PyTorch row's runner, after checking that PyTorch's loss equals ours, and what
  the row records of it (the loss check, its first call, parameter and state bytes,
  the versions).

  ``threads``: ``torch.set_num_threads`` (default: the core count). The block step
  draws its blocks from absignsgd's visit frequencies when called without a block.

  Raises:
    SystemExit: the losses differ by more than ``LOSS_RTOL`` (relative): then the
      two would not time the same model.
  """
  n = model.cfg.n_layers
  host_batch = {k: np.asarray(v) for k, v in batch.items()}
  t0 = time.perf_counter()
  tmodel = torch_ref.build(model.module(), threads=threads)
  loss_t = torch_ref.eval_loss(tmodel, torch_ref.torch_batch(host_batch))
  rel = abs(loss_t - jax_loss) / max(abs(jax_loss), 1e-12)
  log(f"  PyTorch loss {loss_t:.6f} vs JAX {jax_loss:.6f} (relative difference "
      f"{rel:.2e}); built in {time.perf_counter() - t0:.1f} s")
  if not rel <= LOSS_RTOL:
    raise SystemExit(f"{method}: PyTorch's loss {loss_t} differs from the JAX "
                     f"model's {jax_loss} by {rel:.2e} (relative), more than "
                     f"{LOSS_RTOL}: the two do not compute the same function.")
  if method == "torch_forward":
    r = torch_ref.ForwardRunner(tmodel, host_batch)
    first = r()[0]
  elif method == "torch_adamw":
    r = torch_ref.AdamWRunner(tmodel, host_batch, LR, WEIGHT_DECAY)
    first = r()[0]
  else:
    # Without absignsgd in the run to follow: draws from its visit frequencies.
    rng = np.random.default_rng(0)
    freq = cost_model.visit_frequencies("absignsgd", n)
    r = torch_ref.BlockSignRunner(tmodel, host_batch, LR,
                                  next_block=lambda: int(rng.choice(n, p=freq)))
    first = r(block=0)[0]
  fields = {
      "loss_check": {"jax": jax_loss, "torch": loss_t, "relative_difference": rel},
      "first_call_s": first,
      "param_bytes": sum(p.numel() * p.element_size() for p in tmodel.parameters()),
      "opt_state_bytes": r.state_bytes() if hasattr(r, "state_bytes") else 0,
      **torch_ref.versions()}
  return r, fields
