"""What a fine-tuning run measures of its model, before and after training.

Held-out perplexity (the whole held-out set; its first ``--eval-seqs`` sequences
during training), ``--task math``'s accuracy of the greedy answer (with its 95%
interval, per module, and McNemar's paired test of after against before), and with
``--forgetting`` the perplexity of a second text the tuning never sees and chat
answers to fixed prompts.
"""

from __future__ import annotations

import json
import math
import os
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from absign_jax.llm import data as data_lib
from absign_jax.llm import generate as generate_lib
from absign_jax.llm import model as model_lib
from absign_jax.llm import significance
from absign_jax.llm import tasks as tasks_lib
from absign_jax.llm.tokenizer import Tokenizer

if TYPE_CHECKING:  # (annotations only)
  from absign_jax.llm.config import RunConfig

CHAT_PROMPTS = ("What is the capital of France?",
                "Explain in one sentence what a Python list is.")
CHAT_ANSWER_TOKENS = 48  # tokens generated for --generate and --forgetting's prompts


def host_params(params):
  """``params`` as arrays this process can read whole (gathered across processes)."""
  if jax.process_count() == 1:
    return params
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return jax.tree.map(jnp.asarray, multihost_utils.process_allgather(params, tiled=True))


def evaluate(parts, params, sequences: data_lib.SequenceSet, batch: int,
             limit: int | None = None) -> float:
  """Held-out mean loss (token-weighted) of ``params``."""
  model = parts.merge(params)
  n = len(sequences) if limit is None else min(limit, len(sequences))
  batches = (sequences.batch(np.arange(i, min(i + batch, n))) for i in range(0, n, batch))
  return model_lib.eval_loss(model, batches)


def second_text_set(tokenizer: Tokenizer, seq: int) -> data_lib.SequenceSet:
  """Sequences of a text the tuning never sees (see data_lib.second_text)."""
  ids = tokenizer.encode(data_lib.second_text())
  return data_lib.pack_sequences([(ids, np.ones(len(ids)))], seq)


def chat(parts, params, tokenizer: Tokenizer, prompt: str,
         max_new_tokens: int = CHAT_ANSWER_TOKENS) -> str:
  """The model's greedy answer to ``prompt`` under its chat template."""
  return generate_lib.chat(parts.merge(params), tokenizer, prompt, max_new_tokens)


_CORRECT_BEFORE = "_correct_before"  # per problem; kept for the paired test, not reported


def _accuracy_figures(correct: list[bool], when: str) -> dict[str, Any]:
  """``accuracy_<when>`` and its 95% interval ``accuracy_<when>_interval``."""
  interval = significance.wilson_interval(sum(correct), len(correct))
  return {f"accuracy_{when}": interval.estimate,
          f"accuracy_{when}_interval": [interval.low, interval.high]}


def _by_module(problems, correct_before, correct) -> dict[str, dict[str, float]]:
  out: dict[str, dict[str, float]] = {}
  for p, ok_before, ok in zip(problems, correct_before, correct):
    m = out.setdefault(p.module, {"problems": 0, "before": 0, "after": 0})
    m["problems"] += 1
    m["before"] += ok_before
    m["after"] += ok
  return {name: {"problems": m["problems"], "accuracy_before": m["before"] / m["problems"],
                 "accuracy_after": m["after"] / m["problems"]} for name, m in out.items()}


def eval_subset(config: RunConfig) -> int | None:
  """Held-out sequences scored during training (None: no evaluation then)."""
  return config.eval_seqs if config.eval_every else None


def before_training(config: RunConfig, parts, params, loaded) -> dict[str, Any]:
  """The pretrained model's figures, keyed as in ``summary.json``.

  The same for every run of one invocation (``--compare``): computed once, kept in
  ``loaded.cache``.
  """
  subset = eval_subset(config)
  before = loaded.cache.setdefault((config.precision, config.forgetting, subset), {})
  if before:
    return before
  heldout, tokenizer = loaded.heldout, loaded.tokenizer
  before["ppl_before"] = math.exp(evaluate(parts, params, heldout, config.batch))
  if subset:  # the curve's first point, on the set evaluated during training
    before["heldout_ppl_subset_before"] = math.exp(
        evaluate(parts, params, heldout, config.batch, subset))
  if loaded.problems:
    _, answers = tasks_lib.math_accuracy(parts.merge(params), tokenizer, loaded.problems,
                                         progress=not config.no_progress)
    correct = tasks_lib.correct_answers(loaded.problems, answers)
    before.update(_accuracy_figures(correct, "before"))
    before[_CORRECT_BEFORE] = correct
  if config.forgetting:
    second = second_text_set(tokenizer, config.seq)
    before["second_text_ppl_before"] = math.exp(
        evaluate(parts, params, second, config.batch))
    before["chat_before"] = {q: chat(parts, params, tokenizer, q) for q in CHAT_PROMPTS}
  return before


def after_training(config: RunConfig, parts, params, loaded, before: dict[str, Any],
                   out_dir: str, interrupted: bool) -> dict[str, Any]:
  """The tuned model's figures and those they are compared with, keyed as in
  ``summary.json``: ``ppl_after`` (None when ``interrupted``: no final evaluation),
  then the evaluation subset's, the task's and ``--forgetting``'s figures.

  ``--task math`` also writes each held-out problem's answer to
  ``out_dir/answers.jsonl``.
  """
  subset = eval_subset(config)
  heldout, tokenizer, problems = loaded.heldout, loaded.tokenizer, loaded.problems
  subset_figures, task_figures = {}, {}
  forgetting = {k: v for k, v in before.items()
                if k not in ("ppl_before", "heldout_ppl_subset_before", _CORRECT_BEFORE)
                and not k.startswith("accuracy_before")}
  if subset:
    subset_figures["heldout_ppl_subset_before"] = before["heldout_ppl_subset_before"]
  if interrupted:
    return {"ppl_after": None, **subset_figures, **forgetting}
  ppl_after = math.exp(evaluate(parts, params, heldout, config.batch))
  if subset:
    subset_figures["heldout_ppl_subset_after"] = math.exp(
        evaluate(parts, params, heldout, config.batch, subset))
  if loaded.task is not None:
    task_figures = {"task": loaded.task.name,
                    "heldout_loss_before": math.log(before["ppl_before"]),
                    "heldout_loss_after": math.log(ppl_after)}
  if problems:
    _, answers = tasks_lib.math_accuracy(
        parts.merge(params), tokenizer, problems, progress=not config.no_progress)
    correct, correct_before = tasks_lib.correct_answers(problems, answers), before[_CORRECT_BEFORE]
    task_figures.update({k: v for k, v in before.items() if k.startswith("accuracy_")})
    task_figures.update(_accuracy_figures(correct, "after"))
    test = significance.mcnemar(correct, correct_before)
    task_figures["accuracy_change"] = {"gained": test.only_first, "lost": test.only_second,
                                       "p_value": test.p_value}
    task_figures["accuracy_by_module"] = _by_module(problems, correct_before, correct)
    with open(os.path.join(out_dir, "answers.jsonl"), "w") as f:
      for p, a, ok, ok_before in zip(problems, answers, correct, correct_before):
        f.write(json.dumps({"module": p.module, "question": p.question,
                            "reference": p.answer, "answer": a, "correct": ok,
                            "correct_before": ok_before}) + "\n")
  if config.forgetting:
    forgetting["second_text_ppl_after"] = math.exp(
        evaluate(parts, params, second_text_set(tokenizer, config.seq), config.batch))
    forgetting["chat_after"] = {q: chat(parts, params, tokenizer, q)
                                for q in CHAT_PROMPTS}
  return {"ppl_after": ppl_after, **subset_figures, **task_figures, **forgetting}
