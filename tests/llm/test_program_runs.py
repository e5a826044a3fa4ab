"""The fine-tuning program as a user meets it: option and file errors, records that
survive a kill, resume that continues the same run, Ctrl-C / SIGTERM.

The program runs on a tiny Llama GGUF with a byte-level tokenizer (written by the
test), so each run takes seconds; subprocess runs share a JAX compilation cache.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from absign_jax.llm import finetune, runs

from tests.llm._tiny_program import tiny_files_fixture

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

# Outputs that measure time or the machine, not the training.
TIMING = {"wall_s", "tokens_per_s", "first_step_s", "peak_rss_bytes", "peak_device_bytes"}

# The tiny model and text, and a compilation cache shared with the subprocesses
# (in-process runs read the programs the subprocess runs compiled).
files = tiny_files_fixture("program")


def base_args(files, out, *extra):
  return ["--model", files["gguf"], "--data", files["data"], "--batch", "2", "--seq", "16",
          "--eval-seqs", "2", "--no-progress", "--out", str(out), *extra]


def run_program(files, argv, **kwargs):
  """``python -m absign_jax.llm argv`` in a subprocess (shared compilation cache)."""
  env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=ROOT,
             JAX_COMPILATION_CACHE_DIR=files["cache"],
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return subprocess.Popen([sys.executable, "-m", "absign_jax.llm", *argv], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          cwd=ROOT, **kwargs)


def finish(proc, timeout=300):
  out, _ = proc.communicate(timeout=timeout)
  return proc.returncode, out


def wait_for(cond, proc, timeout=240):
  deadline = time.monotonic() + timeout
  while not cond():
    assert proc.poll() is None, "the program ended before it could be interrupted:\n" \
        + proc.stdout.read()
    assert time.monotonic() < deadline, "timed out"
    time.sleep(0.01)


def records(out):
  with open(os.path.join(out, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f]


def without_timing(rec):
  return {k: v for k, v in rec.items() if k not in TIMING}


def saved_state(out, step):
  """Every array of checkpoint ``step`` (the whole training state), by name."""
  import orbax.checkpoint as ocp
  with ocp.CheckpointManager(os.path.join(out, "checkpoints")) as mngr:
    got = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return {k: np.asarray(v) for k, v in got["state"].items()}


# -- options and files -----------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["--warmup", "-1"], "--warmup must be an integer >= 0 (0: no warm-up), got -1"),
    (["--lr=-1e-3"], "--lr must be a finite number > 0, got -0.001"),
    (["--lr", "0"], "--lr must be a finite number > 0, got 0.0"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--time-budget", "-5"], "--time-budget must be a finite number of seconds > 0, "
     "got -5.0"),
    (["--eval-every", "-1"], "--eval-every must be an integer >= 0"),
    (["--ckpt-every", "-2"], "--ckpt-every must be an integer >= 0 (0: a checkpoint only "
     "at the end), got -2"),
    (["--eval-seqs", "0"], "--eval-seqs must be an integer >= 1, got 0"),
    (["--batch", "0"], "--batch must be an integer >= 1, got 0"),
    (["--seq", "1"], "--seq must be an integer >= 2, got 1"),
    (["--steps", "0"], "--steps must be an integer >= 1, got 0"),
    (["--depth-bias", "-3"], "--depth-bias must be a finite number >= 0, got -3.0"),
    (["--weight-decay", "inf"], "--weight-decay must be a finite number >= 0, got inf"),
    (["--seed", "-1"], "--seed must be an integer in [0, 2**32), got -1"),
    (["--resume", "--allow-changed", "seq,colour"],
     "--allow-changed: unknown settings ['colour']"),
    (["--allow-changed", "seq"], "--allow-changed only applies with --resume"),
    (["--optimizer", "alias_sign_sgd", "--lr", "1e-3"],
     "alias_sign_sgd is parameter-free (it sets its own step size): drop --lr"),
    (["--compare", "absignsgd,adamw", "--precision", "fp16"],
     "--precision fp16 needs a block optimizer"),
])
def test_bad_option_is_named_with_its_range(capsys, argv, message):
  with pytest.raises(SystemExit) as e:
    finetune.main(argv)
  assert e.value.code == 2
  assert message in capsys.readouterr().err


def _main_error(capsys, argv) -> str:
  with pytest.raises(SystemExit) as e:
    finetune.main(argv)
  assert e.value.code == 2
  return capsys.readouterr().err


def test_binary_data_file_is_named(files, tmp_path, capsys):
  blob = tmp_path / "weights.bin"
  blob.write_bytes(bytes(range(256)) * 4)
  err = _main_error(capsys, base_args({**files, "data": str(blob)}, tmp_path / "o"))
  assert f"--data: {blob} is not UTF-8 text (byte 0x80 at offset 128" in err
  assert "read as plain UTF-8 text" in err
  nul = tmp_path / "nul.txt"
  nul.write_bytes(b"text\x00\x00\x00more")
  err = _main_error(capsys, base_args({**files, "data": str(nul)}, tmp_path / "o"))
  assert f"{nul} holds NUL bytes" in err
  chats = tmp_path / "chats.jsonl"
  chats.write_bytes(b'{"messages": [{"role": "user", "content": "\xff"}]}\n')
  err = _main_error(capsys, base_args({**files, "data": str(chats)}, tmp_path / "o"))
  assert f"{chats} is not UTF-8 text" in err and "JSON object per line" in err
  err = _main_error(capsys, base_args({**files, "data": str(tmp_path)}, tmp_path / "o"))
  assert f"data file {tmp_path} is not a regular file" in err
  err = _main_error(capsys, base_args({**files, "data": str(tmp_path / "no.txt")},
                                      tmp_path / "o"))
  assert f"data file not found: {tmp_path / 'no.txt'}" in err


def test_output_directory_that_cannot_be_created(files, tmp_path, capsys):
  blocker = tmp_path / "file"
  blocker.write_text("")
  err = _main_error(capsys, base_args(files, blocker / "run"))
  assert f"--out: cannot create the output directory {blocker / 'run'}" in err


# -- records, resume and interruptions -------------------------------------------------

RUN = ["--steps", "12", "--ckpt-every", "3", "--eval-every", "4"]


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory):
  """An uninterrupted run (in this process: its programs fill the shared cache)."""
  out = str(tmp_path_factory.mktemp("reference") / "run")
  finetune.main(base_args(files, out, *RUN))
  return out


def test_sigkill_then_resume_equals_an_uninterrupted_run(files, reference, tmp_path,
                                                        capsys):
  out = str(tmp_path / "run")
  proc = run_program(files, base_args(files, out, *RUN))
  try:
    first = os.path.join(out, "checkpoints", "3")  # renamed into place when complete
    wait_for(lambda: os.path.isdir(first), proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
  finally:
    if proc.poll() is None:
      proc.kill()
  logged = records(out)
  assert [r["step"] for r in logged] == list(range(1, len(logged) + 1))  # none lost
  assert not os.path.exists(os.path.join(out, "summary.json"))

  capsys.readouterr()
  finetune.main(base_args(files, out, *RUN, "--resume"))
  log = capsys.readouterr().out
  resumed_from = int(log.split("resumed from step ")[1].split()[0])
  assert resumed_from >= 3 and resumed_from % 3 == 0, log

  ref, got = records(reference), records(out)
  assert [r["step"] for r in got] == list(range(1, 13))  # each step once
  assert [without_timing(r) for r in got] == [without_timing(r) for r in ref]
  assert any("heldout_ppl_subset" in r for r in got)
  with open(os.path.join(reference, "summary.json")) as f:
    ref_summary = json.load(f)
  with open(os.path.join(out, "summary.json")) as f:
    summary = json.load(f)
  assert without_timing(summary) == without_timing(ref_summary)
  assert summary["steps"] == summary["logged_steps"] == 12
  # The held-out curve stays on the evaluation subset from before to after.
  curve = runs.heldout_curve(summary, got)
  assert curve[0] == (0.0, summary["heldout_ppl_subset_before"])
  assert curve[-1] == (summary["wall_s"], summary["heldout_ppl_subset_after"])
  assert [p for _, p in curve[1:-1]] == [r["heldout_ppl_subset"] for r in got
                                         if "heldout_ppl_subset" in r]
  ref_state, state = saved_state(reference, 12), saved_state(out, 12)
  assert sorted(state) == sorted(ref_state) and len(state) > 10
  for name in state:
    assert state[name].tobytes() == ref_state[name].tobytes(), name


def test_resume_of_a_finished_run_changes_nothing(files, reference, tmp_path, capsys):
  import shutil
  out = tmp_path / "run"
  shutil.copytree(reference, out)
  names = ("summary.json", "metrics.jsonl", "loss.png")
  before = {n: ((out / n).read_bytes(), (out / n).stat().st_mtime_ns) for n in names}
  results = finetune.main(base_args(files, out, *RUN, "--resume"))
  assert "already finished at step 12: nothing to do" in capsys.readouterr().out
  assert {n: ((out / n).read_bytes(), (out / n).stat().st_mtime_ns) for n in names} \
      == before
  assert results[0].summary == json.loads(before["summary.json"][0])
  assert len(results[0].curve) == 12


@pytest.mark.parametrize("change, message", [
    (["--seq", "24"], "--seq: 16 in the checkpoint, 24 now"),
    (["--batch", "3"], "--batch: 2 in the checkpoint, 3 now"),
    (["--seed", "1"], "--seed: 0 in the checkpoint, 1 now"),
    (["--lr", "0.01"], "--lr: 0.001 in the checkpoint, 0.01 now"),
    (["--steps", "20"], "--steps: 12 in the checkpoint, 20 now"),
])
def test_resume_refuses_changed_settings(files, reference, tmp_path, capsys, change,
                                         message):
  import shutil
  out = tmp_path / "run"
  shutil.copytree(reference, out)
  summary = (out / "summary.json").read_bytes()
  err = _main_error(capsys, base_args(files, out, *RUN, *change, "--resume"))
  assert message in err
  allow = err.split("--allow-changed ")[1].split(".")[0].split(",")
  assert change[0][2:] in allow  # (--seq also changes the training sequences: data)
  assert (out / "summary.json").read_bytes() == summary


def test_resume_with_changed_data_needs_allow_changed(files, reference, tmp_path, capsys):
  import shutil
  out = tmp_path / "run"
  shutil.copytree(reference, out)
  other = tmp_path / "other.txt"
  text = open(files["data"], encoding="utf-8").read()
  assert "x" in text
  # Other sequences of the same shapes (no merge involves x or z): no new programs.
  other.write_text(text.replace("x", "z"), encoding="utf-8")
  argv = base_args({**files, "data": str(other)}, out, *RUN, "--steps", "13", "--resume")
  err = _main_error(capsys, argv)
  assert "--data (the training sequences):" in err and "--steps: 12 in the checkpoint" in err
  finetune.main(argv + ["--allow-changed", "data,steps"])  # accepted explicitly
  assert "--allow-changed data:" in capsys.readouterr().out
  assert [r["step"] for r in records(out)] == list(range(1, 14))


def test_damaged_latest_checkpoint_falls_back(files, reference, tmp_path, capsys):
  import shutil
  out = tmp_path / "run"
  shutil.copytree(reference, out)
  (out / "checkpoints" / "12" / "meta" / "metadata").write_text("{truncated")
  os.remove(out / "summary.json")
  finetune.main(base_args(files, out, *RUN, "--resume"))
  printed = capsys.readouterr().out
  assert "skipped checkpoint 12: it cannot be read" in printed
  assert "resumed from step 9" in printed
  assert [r["step"] for r in records(out)] == list(range(1, 13))
  assert json.loads((out / "summary.json").read_text())["steps"] == 12


def _resume_argv(printed: str) -> list[str]:
  command = printed.split("continue with:\n")[1].splitlines()[0].strip()
  words = shlex.split(command)
  assert words[:3] == ["python", "-m", "absign_jax.llm"] and words[-1] == "--resume"
  return words[3:]


def _check_stopped(out, printed, sig) -> int:
  assert "Traceback" not in printed, printed
  stopped = int(printed.split(f"stopped by {sig.name} after step ")[1].split()[0])
  assert stopped < 40
  summary = json.loads(open(os.path.join(out, "summary.json")).read())
  assert summary["interrupted"] == sig.name and summary["steps"] == stopped
  assert summary["ppl_after"] is None  # no final evaluation: stopped on request
  assert [r["step"] for r in records(out)] == list(range(1, stopped + 1))
  assert str(stopped) in os.listdir(os.path.join(out, "checkpoints"))
  return stopped


def test_sigint_and_sigterm_stop_cleanly_and_say_how_to_resume(files, tmp_path, capsys):
  import threading

  out = str(tmp_path / "run")
  argv = base_args(files, out, "--steps", "40", "--ckpt-every", "1", "--eval-every", "0")
  log_path = os.path.join(out, "metrics.jsonl")
  logged = lambda: len(records(out)) if os.path.exists(log_path) else 0
  # Ctrl-C in a terminal: the program in its own process.
  proc = run_program(files, argv)
  wait_for(lambda: logged() > 0, proc)
  proc.send_signal(signal.SIGINT)
  rc, printed = finish(proc)
  assert rc == 128 + signal.SIGINT, printed
  first = _check_stopped(out, printed, signal.SIGINT)

  # SIGTERM during the resumed run (in this process; a handler here catches a signal
  # that would land after the program restored its own).
  stray = []
  old = {s: signal.signal(s, lambda n, f: stray.append(n))
         for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    def send_when_training():
      deadline = time.monotonic() + 240
      while logged() <= first and time.monotonic() < deadline:
        time.sleep(0.01)
      os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=send_when_training, daemon=True).start()
    with pytest.raises(SystemExit) as e:
      finetune.main(_resume_argv(printed))
    assert e.value.code == 128 + signal.SIGTERM and not stray
    printed = capsys.readouterr().out
    assert f"resumed from step {first}" in printed
    second = _check_stopped(out, printed, signal.SIGTERM)
    assert second > first
    finetune.main(_resume_argv(printed))
  finally:
    for s, h in old.items():
      signal.signal(s, h)
  assert f"resumed from step {second}" in capsys.readouterr().out
  assert [r["step"] for r in records(out)] == list(range(1, 41))
  summary = json.loads(open(os.path.join(out, "summary.json")).read())
  assert summary["steps"] == 40 and "interrupted" not in summary
  assert summary["ppl_after"] > 0


def test_resume_drops_a_half_written_record_and_rewrites_the_summary(files, reference,
                                                                     tmp_path, capsys):
  """Killed after the last checkpoint, while writing a line and before the summary."""
  import shutil
  out = tmp_path / "run"
  shutil.copytree(reference, out)
  os.remove(out / "summary.json")
  with open(out / "metrics.jsonl", "a") as f:
    f.write('{"step": 13, "loss": 1.2')  # no newline: cut off mid-write
  finetune.main(base_args(files, out, *RUN, "--resume"))
  assert "dropped an incomplete last line" in capsys.readouterr().out
  assert records(out) == records(reference)
  summary = json.loads((out / "summary.json").read_text())
  ref_summary = json.loads((Path(reference) / "summary.json").read_text())
  assert summary["steps"] == 12 and summary["train_loss"] == ref_summary["train_loss"]
  assert summary["ppl_after"] == ref_summary["ppl_after"]
