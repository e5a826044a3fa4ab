"""Text generation with a :class:`~absign_jax.llm.model.Llama` and a key/value cache.

* :func:`generate` -- greedy or sampled continuations of prompts of one length, in
  one jitted ``while_loop`` (prompts are padded to a bucket length, so prompts of
  similar length share a compilation).
* :func:`generate_batch` -- greedy answers to prompts of different lengths,
  left-padded into batches with the padding masked out of attention.
* :func:`chat` -- the model's answer to one user message, through the tokenizer's
  chat template.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from absign_jax.llm.model import Llama

__all__ = ["generate", "generate_batch", "chat"]

_PROMPT_BUCKET = 64


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy"))
def _generate(graphdef, state, prompt, prompt_len, key, temperature, top_k,
              eos_id, *, max_new_tokens, greedy):
  model = nnx.merge(graphdef, state)
  b, padded_len = prompt.shape
  caches = model.init_cache(b, padded_len + max_new_tokens)

  def pick(h, key):
    logits = model.logits(h)
    if greedy:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    # top_k is traced (0 = off), so every sampling setting shares one compile.
    kth = jnp.take(jnp.sort(logits, axis=-1), -jnp.maximum(top_k, 1), axis=-1)
    logits = jnp.where((top_k > 0) & (logits < kth[:, None]), -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)

  # The prompt is right-padded to a bucket length so one compilation serves
  # many prompt lengths. Cache slots past the prompt hold padding garbage, but
  # decoding overwrites slot p before any query at position >= p reads it.
  h, caches = model.decode_hidden(prompt, jnp.int32(0), caches)
  key, sub = jax.random.split(key)
  tok = pick(jax.lax.dynamic_index_in_dim(h, prompt_len - 1, 1, False), sub)
  out = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(tok)
  done = tok == eos_id

  def cond(c):
    i, _, _, _, done, _ = c
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(c):
    i, tok, caches, out, done, key = c
    h, caches = model.decode_hidden(tok[:, None], prompt_len + i - 1, caches)
    key, sub = jax.random.split(key)
    nxt = pick(h[:, -1], sub)
    nxt = jnp.where(done, eos_id, nxt)  # finished rows keep emitting eos
    out = out.at[:, i].set(nxt)
    return i + 1, nxt, caches, out, done | (nxt == eos_id), key

  _, _, _, out, _, _ = jax.lax.while_loop(
      cond, body, (jnp.int32(1), tok, caches, out, done, key)
  )
  return out


def generate(
    model: Llama,
    tokens: Iterable[int] | np.ndarray | jax.Array,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    eos_id: int | None = None,
    seed: int = 0,
) -> np.ndarray:
  """Autoregressive generation with a key/value cache (jitted loop).

  Prompts are padded to a multiple of 64 tokens internally, so prompts of
  similar length share one compilation (per ``max_new_tokens``).

  Args:
    model: The language model.
    tokens: Prompt ids, ``[T]`` or ``[B, T]`` (rows of equal length).
    max_new_tokens: Number of tokens to generate.
    temperature: 0 for greedy decoding, otherwise the sampling temperature.
    top_k: With sampling, keep only the ``top_k`` most likely tokens (0 = all).
    eos_id: Stop once every row produced this id; the output is cut after the
      first ``eos_id`` of a 1-D prompt.
    seed: PRNG seed for sampling.

  Returns:
    The generated ids (without the prompt): ``[N]`` for a 1-D prompt,
    ``[B, max_new_tokens]`` (eos-padded) for a batch.
  """
  prompt = np.asarray(tokens, dtype=np.int32)
  squeeze = prompt.ndim == 1
  if squeeze:
    prompt = prompt[None]
  b, t0 = prompt.shape
  if t0 == 0:
    raise ValueError("generate needs a non-empty prompt")
  if max_new_tokens <= 0:
    return np.zeros((0,) if squeeze else (b, 0), np.int32)
  if t0 + max_new_tokens > model.config.max_seq_len:
    raise ValueError(
        f"prompt ({t0}) + max_new_tokens ({max_new_tokens}) ="
        f" {t0 + max_new_tokens} exceeds the model context"
        f" {model.config.max_seq_len}"
    )
  padded = -(-t0 // _PROMPT_BUCKET) * _PROMPT_BUCKET
  prompt = np.pad(prompt, ((0, 0), (0, padded - t0)))
  graphdef, state = nnx.split(model)
  out = _generate(
      graphdef, state, jnp.asarray(prompt), jnp.int32(t0), jax.random.key(seed),
      jnp.float32(max(temperature, 1e-6)), jnp.int32(top_k),
      jnp.int32(-1 if eos_id is None else eos_id),
      max_new_tokens=max_new_tokens, greedy=temperature <= 0,
  )
  out = np.asarray(out)
  if squeeze:
    out = out[0]
    if eos_id is not None and (hits := np.flatnonzero(out == eos_id)).size:
      out = out[: hits[0] + 1]
  return out


def _masked_layer_decode(layer, h, positions, start, k_cache, v_cache, mask):
  """One block's incremental forward with an explicit attention mask.

  Like :meth:`LlamaBlock.decode`, but ``mask`` (bool, broadcastable to
  ``[B, n_kv_heads, groups, T, S]``) also hides each row's left padding. Returns
  the new hidden states and this step's keys and values ``[B, T, kv, hd]``.
  """
  # pylint: disable=protected-access
  attn = layer.self_attn
  b, t, _ = h.shape
  q, k, v = attn._qkv(layer.input_layernorm(h), positions)
  k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k, start, axis=1)
  v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v, start, axis=1)
  # The layer's own mask adds its sliding window: cache slots are positions.
  mask = mask & attn._mask(positions, jnp.arange(k_cache.shape[1]))
  out = attn._attend(q, k_cache, v_cache, mask)
  h = h + layer._attn_out(attn.o_proj(out).reshape(b, t, -1))
  return layer._mlp_residual(h), k, v


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def _generate_left_padded(graphdef, state, prompt, pad, eos_id, *, max_new_tokens):
  model = nnx.merge(graphdef, state)
  cfg = model.config
  b, t = prompt.shape
  total = t + max_new_tokens
  # One [L, B, S, kv, hd] buffer per keys/values, carried and updated in place.
  shape = (cfg.n_layers, b, total, cfg.n_kv_heads, cfg.head_size)
  caches = (jnp.zeros(shape, cfg.param_dtype), jnp.zeros(shape, cfg.param_dtype))
  slots = jnp.arange(total)
  real = slots[None, :] >= pad[:, None]  # [B, S]: key slots that hold real tokens

  def hidden(tokens, start, caches):
    positions = start + jnp.arange(tokens.shape[1])
    causal = slots[None, :] <= positions[:, None]  # [T, S]
    mask = (real[:, None, :] & causal[None])[:, None, None]  # [B, 1, 1, T, S]

    def run(layer, carry, i):
      h, kc, vc = carry
      h, k, v = _masked_layer_decode(layer, h, positions, start, kc[i], vc[i], mask)
      at = (i, 0, start, 0, 0)
      return (h, jax.lax.dynamic_update_slice(kc, k[None], at),
              jax.lax.dynamic_update_slice(vc, v[None], at))

    carry = (model.embed(tokens), *caches)
    if model.stacked:
      graphdef_l, state_l = nnx.split(model.layers)

      def body(carry, xs):
        layer_state, i = xs
        return run(nnx.merge(graphdef_l, layer_state), carry, i), None

      carry, _ = jax.lax.scan(body, carry, (state_l, jnp.arange(cfg.n_layers)))
    else:
      for i, layer in enumerate(model.layers):
        carry = run(layer, carry, i)
    return carry[0][:, -1], carry[1:]

  def pick(h):
    return jnp.argmax(model.logits(h), axis=-1).astype(jnp.int32)

  h, caches = hidden(prompt, jnp.int32(0), caches)
  tok = pick(h)
  out = jnp.full((b, max_new_tokens), eos_id, jnp.int32).at[:, 0].set(tok)
  done = tok == eos_id

  def cond(c):
    i, _, _, _, done = c
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(c):
    i, tok, caches, out, done = c
    h, caches = hidden(tok[:, None], t + i - 1, caches)
    nxt = jnp.where(done, eos_id, pick(h))
    return i + 1, nxt, caches, out.at[:, i].set(nxt), done | (nxt == eos_id)

  _, _, _, out, _ = jax.lax.while_loop(
      cond, body, (jnp.int32(1), tok, caches, out, done))
  return out


def generate_batch(
    model: Llama,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    eos_id: int,
    batch_size: int | None = None,
    bucket: int = 16,
) -> list[list[int]]:
  """Greedy answers to prompts of different lengths, batched (left padding).

  Each batch is left-padded to a multiple of ``bucket`` tokens and the padding is
  masked out of attention. Rotary embeddings depend only on the distance between
  query and key, so a padded row computes what the unpadded prompt would (up to
  float rounding). The batch is filled up to ``batch_size`` rows, so every batch
  of a call shares one compilation per padded length.

  Args:
    model: The language model.
    prompts: Token ids per prompt (non-empty).
    max_new_tokens: Tokens to generate per prompt.
    eos_id: Generation stops at this id (included in the output when produced).
    batch_size: Prompts per batch (default: all at once).
    bucket: Padded prompt lengths are multiples of this.

  Returns:
    The generated ids per prompt, cut after the first ``eos_id``.
  """
  if not prompts:
    return []
  if any(len(p) == 0 for p in prompts):
    raise ValueError("generate_batch needs non-empty prompts")
  if max_new_tokens <= 0:
    return [[] for _ in prompts]
  longest = max(len(p) for p in prompts)
  if longest + max_new_tokens > model.config.max_seq_len:
    raise ValueError(
        f"the longest prompt ({longest}) + max_new_tokens ({max_new_tokens})"
        f" exceeds the model context {model.config.max_seq_len}")
  batch_size = len(prompts) if batch_size is None else int(batch_size)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  graphdef, state = nnx.split(model)
  results: list[list[int]] = []
  for lo in range(0, len(prompts), batch_size):
    chunk = [list(p) for p in prompts[lo:lo + batch_size]]
    rows = chunk + [chunk[0]] * (batch_size - len(chunk))  # one shape per call
    width = -(-max(len(p) for p in rows) // bucket) * bucket
    pad = np.asarray([width - len(p) for p in rows], np.int32)
    ids = np.zeros((batch_size, width), np.int32)
    for r, p in enumerate(rows):
      ids[r, pad[r]:] = p
    out = np.asarray(_generate_left_padded(
        graphdef, state, jnp.asarray(ids), jnp.asarray(pad), jnp.int32(eos_id),
        max_new_tokens=max_new_tokens))
    for row in out[:len(chunk)]:
      hits = np.flatnonzero(row == eos_id)
      results.append(row[: hits[0] + 1].tolist() if hits.size else row.tolist())
  return results


def chat(model: Llama, tokenizer: Any, prompt: str, max_new_tokens: int) -> str:
  """The model's greedy answer to one user message.

  Args:
    model: The language model.
    tokenizer: Its :class:`absign_jax.llm.tokenizer.Tokenizer` (with a chat
      template).
    prompt: The user's message.
    max_new_tokens: The answer's length limit in tokens.

  Returns:
    The answer's text, without special tokens and surrounding space; generation
    stops at the template's end-of-turn token.
  """
  text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
  ids = generate(model, tokenizer.encode(text, add_bos=False), max_new_tokens,
                 eos_id=tokenizer.chat_eos_id)
  return tokenizer.decode(ids, skip_special_tokens=True).strip()
