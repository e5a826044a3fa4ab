"""Offline data pipeline (absign_jax.llm.data): splits, packing, resumable batches,
JSONL chat masking and input errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from absign_jax.llm import data as D


class CharTokenizer:
  """A byte tokenizer with ChatML-ish chat encoding: no model file needed."""

  doc_sep_id = 0

  def encode(self, text):
    return [b + 1 for b in text.encode("utf-8")]

  def encode_chat(self, messages, add_generation_prompt=False):
    ids, mask = [], []
    for m in messages:
      head = self.encode(f"<{m['role']}>")
      body = self.encode(m["content"]) + [300]  # 300 = end of turn
      ids += head + body
      mask += [0] * len(head) + [int(m["role"] == "assistant")] * len(body)
    return ids, mask


# -- splits and packing -------------------------------------------------------------


def test_pydoc_split_is_deterministic_and_disjoint():
  docs = D.pydoc_documents()
  assert len(docs) > 50 and all(isinstance(v, str) for v in docs.values())
  held = [k for k in docs if D.is_heldout(k)]
  assert held == [k for k in D.pydoc_documents() if D.is_heldout(k)]
  assert 0.03 < len(held) / len(docs) < 0.2
  train, heldout = D.load_dataset(CharTokenizer(), seq_len=128)
  assert len(heldout) > 0 and len(train) > 5 * len(heldout)
  assert train.tokens.shape[1] == 129 and train.mask.shape[1] == 128
  assert not set(map(bytes, heldout.tokens[:, :64])) & set(map(bytes, train.tokens[:, :64]))


def test_pack_sequences_windows_and_mask_alignment():
  docs = [(list(range(1, 11)), [1.0] * 10), ([21, 22, 23, 24, 25], [0, 0, 1, 1, 1])]
  s = D.pack_sequences(docs, seq_len=4, sep_id=99)
  # stream: 1..10 99 21..25 99 (17 tokens) -> (17 - 1) // 4 = 4 windows of 5, stride 4.
  assert s.tokens.tolist() == [[1, 2, 3, 4, 5], [5, 6, 7, 8, 9], [9, 10, 99, 21, 22],
                               [22, 23, 24, 25, 99]]
  assert s.mask.tolist()[2] == [1, 1, 0, 0]  # targets 10, 99, 21, 22
  assert s.mask.tolist()[3] == [1, 1, 1, 1]
  b = s.batch([3, 0])
  assert b["inputs"].tolist() == [[22, 23, 24, 25], [1, 2, 3, 4]]
  assert b["targets"].tolist() == [[23, 24, 25, 99], [2, 3, 4, 5]]
  assert b["inputs"].dtype == np.int32 and b["mask"].dtype == np.float32
  kept = D.pack_sequences([([1, 2, 3, 4, 5, 6, 7], [0, 0, 0, 0, 0, 1, 0])], 2, drop_unmasked=True)
  assert kept.tokens.tolist() == [[5, 6, 7]] and kept.mask.tolist() == [[1, 0]]


def test_eval_batches_cover_the_set_once():
  s = D.pack_sequences([(list(range(1, 200)), [1.0] * 199)], seq_len=10)
  batches = list(s.eval_batches(4))
  assert sum(len(b["inputs"]) for b in batches) == len(s)
  assert len(list(s.eval_batches(4, max_batches=2))) == 2


# -- batches ----------------------------------------------------------------------


def make_set(n=10, seq_len=3):
  return D.SequenceSet(np.arange(n * (seq_len + 1), dtype=np.int32).reshape(n, seq_len + 1),
                       np.ones((n, seq_len), np.float32))


def test_batches_are_deterministic_and_cover_each_epoch():
  data = make_set(10)
  a = D.Batches(data, batch_size=4, seed=3)
  first = [next(a)["inputs"][:, 0] // 4 for _ in range(5)]  # 20 draws = 2 epochs
  b = D.Batches(data, batch_size=4, seed=3)
  assert all((x == b.batch_at(i)["inputs"][:, 0] // 4).all() for i, x in enumerate(first))
  flat = np.concatenate(first)
  assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
  assert not (flat[:10] == flat[10:]).all()  # a fresh permutation per epoch
  c = D.Batches(data, batch_size=4, seed=4)
  assert not all((x == c.batch_at(i)["inputs"][:, 0] // 4).all() for i, x in enumerate(first))


def test_batches_resume_gives_the_same_batches():
  data = make_set(7)
  it = D.Batches(data, batch_size=3, seed=0)
  for _ in range(4):
    next(it)
  saved = json.loads(json.dumps(it.state()))  # survives a JSON checkpoint
  expected = [next(it) for _ in range(5)]
  resumed = D.Batches(data, batch_size=3, seed=0).restore(saved)
  for e in expected:
    got = next(resumed)
    assert all((got[k] == e[k]).all() for k in ("inputs", "targets", "mask"))
  with pytest.raises(ValueError, match="does not match"):
    D.Batches(data, batch_size=3, seed=1).restore(saved)
  with pytest.raises(ValueError, match="empty"):
    D.Batches(make_set(0), batch_size=3)


# -- files -------------------------------------------------------------------------


def write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def conversation(i):
  return {"messages": [{"role": "user", "content": f"Question number {i}?"},
                       {"role": "assistant", "content": f"Answer {i}."}]}


def test_jsonl_loss_only_on_assistant_tokens(tmp_path):
  path = tmp_path / "chat.jsonl"
  write_jsonl(path, [conversation(i) for i in range(40)])
  train, heldout = D.load_dataset(CharTokenizer(), path, seq_len=32)
  assert len(train) > 0
  for s in (train, heldout):
    targets, mask = s.tokens[:, 1:], s.mask
    trained = bytes(int(t) - 1 for t in targets[mask > 0] if t != 300).decode()
    assert "Question" not in trained and "user" not in trained
    assert set(targets[mask > 0].tolist()) <= set(CharTokenizer().encode("Answer 0123456789.")) | {300}
  assert train.mask.sum() > 0


def test_jsonl_with_real_tokenizer(tmp_path, llm_tokenizer):
  tok = llm_tokenizer
  path = tmp_path / "chat.jsonl"
  write_jsonl(path, [conversation(i) for i in range(30)])
  train, _ = D.load_dataset(tok, path, seq_len=64)
  text = tok.decode(train.tokens[:, 1:][train.mask > 0].tolist())
  assert "Answer" in text and "<|im_end|>" in text
  assert "Question" not in text and "assistant" not in text and "SmolLM" not in text


@pytest.mark.parametrize("line, problem", [
    ('{"messages": [{"role": "user", "content": "hi"}', "invalid JSON"),
    ('["not", "an", "object"]', 'object with a "messages" key'),
    ('{"text": "hello"}', 'object with a "messages" key'),
    ('{"messages": []}', "non-empty list"),
    ('{"messages": [{"role": "user"}]}', 'message 0 has no string "content"'),
    ('{"messages": [{"role": "user", "content": "a"}, "hello"]}', "message 1 is not an object"),
])
def test_malformed_jsonl_names_line_and_problem(tmp_path, line, problem):
  path = tmp_path / "bad.jsonl"
  good = json.dumps(conversation(0))
  path.write_text(f"{good}\n\n{good}\n{line}\n{good}\n", encoding="utf-8")
  with pytest.raises(ValueError) as e:
    D.load_dataset(CharTokenizer(), path, seq_len=16)
  assert "line 4" in str(e.value) and problem in str(e.value)


def test_missing_files(tmp_path):
  for name in ("missing.jsonl", "missing.txt"):
    with pytest.raises(FileNotFoundError, match=name):
      D.load_dataset(CharTokenizer(), tmp_path / name, seq_len=16)


def test_seq_len_above_context():
  with pytest.raises(ValueError, match=r"4096.*2048"):
    D.load_dataset(CharTokenizer(), seq_len=4096, max_seq_len=2048)


def test_plain_text_file(tmp_path):
  path = tmp_path / "book.txt"
  path.write_text("All work and no play makes Jack a dull boy. " * 100, encoding="utf-8")
  train, heldout = D.load_dataset(CharTokenizer(), path, seq_len=64)
  assert len(train) > len(heldout) > 0 and train.mask.min() == 1.0
  with pytest.raises(ValueError, match="not enough"):
    D.load_dataset(CharTokenizer(), path, seq_len=100_000)


def test_second_text_is_long_english_not_pydoc(llm_tokenizer):
  text = D.second_text()
  assert "pydoc_data" not in D.second_text_source()
  n = len(llm_tokenizer.encode(text))
  assert n > 2000, n
  assert text.count(" the ") > 50
  topics = " ".join(D.pydoc_documents().values())
  assert text[1000:1200] not in topics
