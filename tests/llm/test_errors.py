"""How the program fails: one line on stderr and an exit code, never a traceback (but
with --debug), checks before any work, bounded options, atomic exports.

Each probe runs the program as a user would (``main([...])`` in this process, a few
through ``python -m``) on a tiny Llama: a GGUF written by ``gguf`` and Hugging Face
folders written by ``safetensors``, damaged the way real files get damaged.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from absign_jax.llm import checks, data, finetune  # noqa: E402
from absign_jax.llm import export as E  # noqa: E402
from absign_jax.llm import gguf as G  # noqa: E402
from absign_jax.llm import hf as H  # noqa: E402
from absign_jax.llm.tokenizer import Tokenizer  # noqa: E402

from tests.llm._tiny_program import CHATML, write_tiny_gguf  # noqa: E402
from tests.llm.test_hf import CONFIGS, random_weights  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROG = "python -m absign_jax.llm"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """The tiny GGUF (with and without a chat template), a text, and a writer of Hugging
  Face folders of the same tiny Llama (264-token byte-level tokenizer)."""
  d = tmp_path_factory.mktemp("errors")
  write_tiny_gguf(d / "tiny.gguf")
  write_tiny_gguf(d / "other.gguf", seed=1)  # other weights of the same shapes
  write_tiny_gguf(d / "chat.gguf", chat_template=CHATML)
  (d / "notes.txt").write_text(data.second_text()[:3000], encoding="utf-8")
  tokenizer = Tokenizer.from_gguf_metadata(G.read_metadata(str(d / "tiny.gguf")))

  def hf_dir(name, mutate=None, vocab_size=264):
    c = json.loads(json.dumps(dict(CONFIGS["llama"], vocab_size=vocab_size,
                                   num_hidden_layers=2)))
    w = random_weights(c)
    if mutate:
      mutate(c, w)
    path = d / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    (path / "config.json").write_text(json.dumps(c))
    safetensors_numpy.save_file(w, str(path / "model.safetensors"))
    tokenizer.save_hf(path)
    return str(path)

  return {"dir": d, "gguf": str(d / "tiny.gguf"), "other_gguf": str(d / "other.gguf"),
          "chat_gguf": str(d / "chat.gguf"),
          "data": str(d / "notes.txt"), "hf_dir": hf_dir}


def base_args(files, out, *extra, model=None):
  return ["--model", model or files["gguf"], "--data", files["data"], "--batch", "2",
          "--seq", "16", "--eval-seqs", "2", "--no-progress", "--ckpt-every", "0",
          "--out", str(out), *extra]


def one_line(err: str) -> str:
  """The error line, checked to be the only line on stderr and no traceback."""
  assert "Traceback" not in err, err
  lines = err.strip().splitlines()
  assert len(lines) == 1, err
  return lines[0]


def fails(capsys, main, argv, code=2) -> str:
  """Runs ``main(argv)``: it must exit with ``code`` and one line on stderr."""
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    main(argv)
  assert e.value.code == code
  return one_line(capsys.readouterr().err)


def run_module(files, *argv):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-m", "absign_jax.llm", *argv], env=env,
                        cwd=files["dir"], capture_output=True, text=True, timeout=300)


def ctrl_c(*args, **kwargs):
  """A writer interrupted as by Ctrl-C."""
  raise KeyboardInterrupt


def listing(path) -> list[str]:
  return sorted(os.listdir(path))


def contents(path) -> dict[str, bytes]:
  return {n: open(os.path.join(path, n), "rb").read() for n in listing(path)}


# -- exports ----------------------------------------------------------------------------


def write_sharded_export(files, out_dir) -> None:
  """An earlier export of other weights, in shards with an index."""
  _, other, tok = E.load_model(files["other_gguf"])
  H.save_hf(other, os.path.join(out_dir, "hf"), tokenizer=tok, max_shard_bytes=20_000)
  assert "model.safetensors.index.json" in listing(os.path.join(out_dir, "hf"))


def assert_same_weights(a, b):
  import jax
  from flax import nnx

  for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b)),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_export_replaces_an_earlier_sharded_export_whole(files, tmp_path):
  write_sharded_export(files, tmp_path)
  path = E.main(["--model", files["gguf"], "--to", "hf", "--out", str(tmp_path)])
  assert listing(path) == ["config.json", "model.safetensors", "tokenizer.json",
                           "tokenizer_config.json"]
  assert listing(tmp_path) == ["hf"]  # no temporary or set-aside folder left
  assert oct(os.stat(path).st_mode & 0o777) == oct(0o777 & ~_umask())
  # Our own loader reads the new weights (no stale index pointing at old shards).
  assert_same_weights(E.load_model(path)[1], E.load_model(files["gguf"])[1])


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def test_program_export_replaces_an_earlier_sharded_export(files, tmp_path, capsys,
                                                           monkeypatch):
  done, cut = tmp_path / "done", tmp_path / "cut"
  for out in (done, cut):
    write_sharded_export(files, out)
  finetune.main(base_args(files, done, "--steps", "1", "--export", "hf"))
  assert listing(done / "hf") == ["config.json", "model.safetensors", "tokenizer.json",
                                  "tokenizer_config.json"]
  assert not [n for n in listing(done) if n.startswith(".")]
  with pytest.raises(AssertionError):  # the tuned weights, not the earlier export's
    assert_same_weights(E.load_model(str(done / "hf"))[1],
                        E.load_model(files["other_gguf"])[1])

  # Ctrl-C while the program exports: the earlier export stays, and the message says
  # how to export the finished run.
  before = contents(cut / "hf")
  real = H.save_safetensors
  monkeypatch.setattr(H, "save_safetensors", ctrl_c)
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    finetune.main(base_args(files, cut, "--steps", "1", "--export", "hf"))
  err = capsys.readouterr().err
  assert e.value.code == 130 and "Traceback" not in err
  assert f"export interrupted: {cut / 'hf'} is as it was" in err
  assert contents(cut / "hf") == before
  monkeypatch.setattr(H, "save_safetensors", real)
  command = err.split("export it with:\n")[1].split()
  assert command[:4] == ["python", "-m", "absign_jax.llm", "export"]
  E.main(command[4:])
  assert_same_weights(E.load_model(str(cut / "hf"))[1],
                      E.load_model(str(done / "hf"))[1])  # the same run, the same seed

  # A run that diverged: its checkpoint is not exported.
  import absign_jax
  import jax

  restore = absign_jax.Checkpointer.restore_params

  def diverged(self, step, target):
    params = restore(self, step, target)
    return jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(np.nan), params)

  monkeypatch.setattr(absign_jax.Checkpointer, "restore_params", diverged)
  line = fails(capsys, E.main, ["--model", str(done), "--to", "hf", "--out",
                                str(tmp_path / "e")])
  assert line.startswith(f"{PROG} export: error: checkpoint 1 in "
                         f"{done / 'checkpoints'}: "), line
  assert line.endswith("holds NaN or Inf; the training diverged; export an earlier one "
                       "with --step (complete checkpoints: [1])")


def test_interrupted_export_leaves_the_earlier_one(files, tmp_path, capsys, monkeypatch):
  E.main(["--model", files["gguf"], "--to", "hf", "--out", str(tmp_path)])
  E.main(["--model", files["gguf"], "--to", "gguf", "--out", str(tmp_path)])
  hf_before = contents(tmp_path / "hf")
  gguf_before = (tmp_path / "model.gguf").read_bytes()
  real = H.save_safetensors
  calls = []

  def ctrl_c_on_the_second_shard(path, tensors, metadata=None):
    calls.append(path)
    if len(calls) == 2:
      raise KeyboardInterrupt
    real(path, tensors, metadata)

  monkeypatch.setattr(H, "save_safetensors", ctrl_c_on_the_second_shard)
  _, model, tok = E.load_model(files["gguf"])
  with pytest.raises(KeyboardInterrupt):  # a sharded export, cut after one shard
    H.save_hf(model, tmp_path / "hf", tokenizer=tok, max_shard_bytes=20_000)
  assert len(calls) == 2 and contents(tmp_path / "hf") == hf_before
  monkeypatch.setattr(H, "save_safetensors", ctrl_c)
  line = fails(capsys, E.main, ["--model", files["gguf"], "--to", "hf", "--out",
                                str(tmp_path)], code=130)
  assert line == f"{PROG} export: interrupted; {tmp_path / 'hf'} is as it was"
  assert contents(tmp_path / "hf") == hf_before

  real_gguf = G.save_gguf

  def half_a_gguf(model, path, **kwargs):
    real_gguf(model, path, **kwargs)
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
    raise KeyboardInterrupt

  monkeypatch.setattr(G, "save_gguf", half_a_gguf)
  fails(capsys, E.main, ["--model", files["gguf"], "--to", "gguf", "--out",
                         str(tmp_path)], code=130)
  assert (tmp_path / "model.gguf").read_bytes() == gguf_before
  assert listing(tmp_path) == ["hf", "model.gguf"]  # no partial file beside them


def test_leftovers_of_a_killed_export_are_tidied(files, tmp_path):
  """A process killed mid-write leaves its temporary folder; one killed between
  moving the old export aside and the new into place, the old one aside."""
  E.main(["--model", files["gguf"], "--to", "hf", "--out", str(tmp_path)])
  before = contents(tmp_path / "hf")
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True).stdout.strip()
  os.rename(tmp_path / "hf", tmp_path / f".hf.old-{dead}-00ff")
  (tmp_path / f".hf.tmp-{dead}-abcd").mkdir()
  (tmp_path / f".hf.tmp-{dead}-abcd" / "model.safetensors").write_bytes(b"partial")
  with H.atomic_output(tmp_path / "hf") as tmp:
    # The folder set aside is back in place, the partial one gone.
    assert listing(tmp_path) == ["hf"] and contents(tmp_path / "hf") == before
    os.mkdir(tmp)
    (tmp_path / tmp / "config.json").write_text("{}")
  assert listing(tmp_path) == ["hf"] and listing(tmp_path / "hf") == ["config.json"]


def test_export_refuses_a_folder_with_other_files(files, tmp_path, capsys):
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "notes.txt").write_text("mine")
  (tmp_path / "hf" / "config.json").write_text("{}")
  line = fails(capsys, E.main, ["--model", files["gguf"], "--to", "hf",
                                "--out", str(tmp_path)])
  assert line == (f"{PROG} export: error: --out: {tmp_path / 'hf'} holds files that are "
                  "no part of a model folder (notes.txt); an export replaces the folder "
                  "whole, so move them away or export elsewhere")
  assert (tmp_path / "hf" / "notes.txt").read_text() == "mine"
  (tmp_path / "model.gguf").write_text("not a gguf")
  line = fails(capsys, E.main, ["--model", files["gguf"], "--to", "gguf",
                                "--out", str(tmp_path)])
  assert f"{tmp_path / 'model.gguf'} exists and is not a GGUF file" in line


def test_export_into_a_file_fails_before_training(files, tmp_path, capsys):
  blocker = tmp_path / "file"
  blocker.write_text("")
  for main, argv in [(E.main, ["--model", files["gguf"], "--to", "hf", "--out",
                               str(blocker)]),
                     (finetune.main, base_args(files, blocker, "--export", "hf"))]:
    line = fails(capsys, main, argv)
    assert line.endswith(f"error: --out: {blocker} is a file, not a folder; choose "
                         "another --out (a folder, created if missing)")
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "hf").write_text("")
  line = fails(capsys, finetune.main,
               base_args(files, tmp_path / "run", "--export", "hf"))
  assert line == (f"{PROG}: error: --export hf: {tmp_path / 'run' / 'hf'} is a file, not "
                  "a model folder; move it away or export elsewhere")
  assert listing(tmp_path / "run") == ["hf"]  # nothing trained, nothing written


def test_export_of_a_run_without_checkpoint(files, tmp_path, capsys):
  (tmp_path / "run" / "checkpoints").mkdir(parents=True)
  line = fails(capsys, E.main, ["--model", str(tmp_path / "run"), "--to", "hf",
                                "--out", str(tmp_path / "e")])
  assert line == (f"{PROG} export: error: {tmp_path / 'run' / 'checkpoints'}: no "
                  "complete checkpoint, so there is nothing to export (the run ended "
                  "before its first save); train it until it saves one (--ckpt-every)")
  line = fails(capsys, E.main, ["--model", files["gguf"], "--step", "3", "--to", "hf",
                                "--out", str(tmp_path / "e")])
  assert "--step applies to a fine-tuning run's directory" in line
  assert not os.path.exists(tmp_path / "e")


# -- load-time checks -------------------------------------------------------------------


def _nan(c, w):
  w["model.layers.1.mlp.up_proj.weight"][3, 4] = np.nan


def _int32(c, w):
  w["model.layers.0.mlp.up_proj.weight"] = np.zeros((48, 32), np.int32)


PROBES = {  # name: (mutate, vocab_size, message after "--model: <dir>")
    "vocab": (None, 64, "/tokenizer.json (the embedding: vocab_size in {d}/config.json): "
              "the tokenizer has token ids up to 263 but the model's embedding has 64 "
              "rows; use the tokenizer that belongs to these weights"),
    "nan": (_nan, 264, ": layers.1.mlp.up_proj.kernel holds NaN or Inf; the file is "
            "damaged; use an intact copy (download or export it again)"),
    "arch": (lambda c, w: c.update(architectures=["GPT2LMHeadModel"]), 264,
             "/config.json: architectures ['GPT2LMHeadModel'] is not supported; "
             "supported: LlamaForCausalLM"),
    "dtype": (_int32, 264, "/model.safetensors: tensor model.layers.0.mlp.up_proj.weight "
              "has dtype I32, expected a float type (F32, F16, BF16)"),
    "missing": (lambda c, w: w.pop("model.layers.1.mlp.up_proj.weight"), 264,
                ": tensor model.layers.1.mlp.up_proj.weight is missing; the weights do "
                "not match config.json"),
    "shape": (lambda c, w: c.update(intermediate_size=40), 264,
              "/model.safetensors: tensor model.layers.0.mlp.down_proj.weight has shape "
              "(32, 48), config.json implies (32, 40)"),
}


@pytest.mark.parametrize("probe", sorted(PROBES))
def test_bad_model_is_one_line_before_training(files, tmp_path, capsys, probe):
  mutate, vocab, message = PROBES[probe]
  d = files["hf_dir"](f"hf_{probe}", mutate, vocab)
  line = fails(capsys, finetune.main, base_args(files, tmp_path / "run", model=d))
  assert line.startswith(f"{PROG}: error: --model: {d}{message.format(d=d)}"), line
  assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")
  line = fails(capsys, E.main,
               ["--model", d, "--to", "gguf", "--out", str(tmp_path / "e")])
  assert line.startswith(f"{PROG} export: error: --model: {d}"), line
  assert not os.path.exists(tmp_path / "e" / "model.gguf")


def test_truncated_safetensors_and_missing_tokenizer(files, tmp_path, capsys):
  d = files["hf_dir"]("hf_truncated")
  f = os.path.join(d, "model.safetensors")
  os.truncate(f, os.path.getsize(f) - 100)
  with pytest.raises(SystemExit) as e:
    finetune.main(base_args(files, tmp_path / "run", model=d))
  printed = capsys.readouterr()
  line = one_line(printed.err)
  assert e.value.code == 2 and line.endswith("download it again")
  assert line.startswith(f"{PROG}: error: --model: {f}: truncated safetensors file "
                         "(its tensors need"), line
  assert "model:" not in printed.out  # found before the data is read
  d = files["hf_dir"]("hf_no_tokenizer")
  os.remove(os.path.join(d, "tokenizer.json"))
  line = fails(capsys, finetune.main, base_args(files, tmp_path / "run", model=d))
  assert line == (f"{PROG}: error: --model: {d}: no tokenizer.json; the checkpoint "
                  "directory needs the fast tokenizer file (save it with transformers' "
                  "tokenizer.save_pretrained)")


def test_run_folder_as_model(files, tmp_path, capsys):
  run = tmp_path / "run"
  (run / "checkpoints" / "5").mkdir(parents=True)
  line = fails(capsys, finetune.main, base_args(files, tmp_path / "o", model=str(run)))
  assert line == (f"{PROG}: error: --model: {run} is a fine-tuning run's output folder, "
                  f"not a model: export its checkpoint with `{PROG} export --model {run} "
                  "--to hf --out DIR` and pass DIR/hf")


def test_subprocess_errors_are_one_line_and_debug_shows_the_traceback(files, tmp_path):
  d = files["hf_dir"]("hf_vocab_cli", vocab_size=64)
  r = run_module(files, *base_args(files, tmp_path / "run", model=d))
  assert r.returncode == 2
  assert one_line(r.stderr).startswith(f"{PROG}: error: --model: {d}/tokenizer.json")
  r = run_module(files, "export", "--model", d, "--to", "hf", "--out", str(tmp_path),
                 "--debug")
  assert r.returncode == 1 and "Traceback" in r.stderr
  assert "UsageError: --model:" in r.stderr.strip().splitlines()[-1]


def test_expected_and_unexpected_errors(files, tmp_path, capsys, monkeypatch):
  argv = base_args(files, tmp_path / "run")

  def disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device", str(tmp_path / "run" / "x"))

  monkeypatch.setattr(finetune, "load", disk_full)
  line = fails(capsys, finetune.main, argv, code=1)
  assert line == (f"{PROG}: error: {tmp_path / 'run' / 'x'}: No space left on device "
                  "(--debug shows the traceback)")
  with pytest.raises(OSError):
    finetune.main(argv + ["--debug"])

  def bug(*args, **kwargs):
    raise KeyError("a bug")

  monkeypatch.setattr(finetune, "load", bug)
  with pytest.raises(KeyError):  # not an expected error: its traceback stays
    finetune.main(argv)
  monkeypatch.undo()
  d = files["hf_dir"]("hf_debug", vocab_size=64)
  with pytest.raises(checks.UsageError, match="--model: "):
    finetune.main(base_args(files, tmp_path / "run", "--debug", model=d))


# -- bounds ------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["--task", "math", "--eval-problems", "1000000000"],
     "--eval-problems must be at most 10000, got 1000000000"),
    (["--steps", "10000000000"], "--steps must be at most 1000000, got 10000000000"),
    (["--batch", "100000000"], "--batch must be at most 65536, got 100000000"),
    (["--switch-every", "10000000000"],
     "--switch-every must be at most 1000000, got 10000000000"),
    (["--optimizer", "galore", "--galore-gap", "10000000000"],
     "--galore-gap must be at most 1000000, got 10000000000"),
    (["--optimizer", "lora", "--lora-rank", "1000000000"],
     "--lora-rank must be at most 65536, got 1000000000"),
    (["--num-processes", "1000000000"],
     "--num-processes must be an integer in [1, 65536], got 1000000000"),
])
def test_option_bounds(capsys, argv, message):
  line = fails(capsys, finetune.main, argv)
  assert line == f"{PROG}: error: {message} (--help lists the options)"


def test_bounds_against_the_model_and_data(files, tmp_path, capsys):
  out = tmp_path / "run"
  cases = [
      (["--batch", "1000"], "--batch 1000 is more than the 156 training sequences of 16 "
       "tokens: use at most 156, or more data", files["gguf"]),
      (["--seq", "100000"], "--seq 100000 is above the model's context length 64: use at "
       "most 64", files["gguf"]),
      (["--optimizer", "lora", "--lora-rank", "1000"], "--lora-rank 1000 is above 16, "
       "the smaller side of the smallest adapted matrix", files["gguf"]),
      (["--generate", "hi"], f"--generate: the model {files['gguf']} has no chat "
       "template, so it cannot answer prompts; drop --generate", files["gguf"]),
      (["--generate", "word " * 40], "--generate: the prompt takes", files["chat_gguf"]),
  ]
  for extra, message, model in cases:  # (the last --batch or --seq counts)
    line = fails(capsys, finetune.main, base_args(files, out, *extra, model=model))
    assert line.startswith(f"{PROG}: error: {message}"), line
  assert not os.path.exists(out / "metrics.jsonl")


def test_help_states_each_default_once(capsys):
  with pytest.raises(SystemExit) as e:
    finetune.parse_args(["--help"])
  assert e.value.code == 0
  text = " ".join(capsys.readouterr().out.split())
  assert "(default: None)" not in text
  assert not re.search(r"\(default: [^()]*\) \(default:", text)  # stated twice
  assert "(default: 128)" in text  # --seq
  assert "--debug" in text
