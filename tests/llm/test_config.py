"""The program's options: a RunConfig from the command line or a TOML file, and the
config.toml each run writes, which reruns it."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from absign_jax.llm import config, finetune  # noqa: E402

from tests.llm._tiny_program import tiny_files_fixture  # noqa: E402

PROG = "python -m absign_jax.llm"
TIMING = {"wall_s", "tokens_per_s", "first_step_s", "peak_rss_bytes", "peak_device_bytes"}


files = tiny_files_fixture("config")


def test_config_toml_reruns_the_run_in_a_new_folder(files, tmp_path, monkeypatch):
  """A run from a file writes config.toml; --config of it (no --out) trains the same
  parameters in the next runs/version_N."""
  monkeypatch.chdir(tmp_path)
  own = tmp_path / "mine.toml"
  own.write_text(f"model = {json.dumps(files['gguf'])}\n"
                 f"data = {json.dumps(files['data'])}\n"
                 "batch = 2\nseq = 16\neval_seqs = 2\neval_every = 2\nsteps = 3\n"
                 "ckpt_every = 0\nno_progress = true\nseed = 7\n", encoding="utf-8")
  [first] = finetune.main(["--config", str(own)])
  run0, run1 = tmp_path / "runs" / "version_0", tmp_path / "runs" / "version_1"
  saved = run0 / "config.toml"
  assert config.read_config(saved)["seed"] == 7
  [again] = finetune.main(["--config", str(saved)])
  assert json.loads((run1 / "summary.json").read_text()) == again.summary
  assert again.summary["params_sha256"] == first.summary["params_sha256"]
  assert {k: v for k, v in again.summary.items() if k not in TIMING} == {
      k: v for k, v in first.summary.items() if k not in TIMING}
  assert (run1 / "config.toml").read_text() == saved.read_text()


def test_every_option_survives_the_file(tmp_path):
  options = ["--optimizer", "block_adam", "--compare", "adamw,block_adam", "--lr", "3e-5",
             "--schedule", "constant", "--warmup", "0", "--steps", "7", "--time-budget",
             "12.5", "--batch", "6", "--micro-batches", "3", "--seq", "48",
             "--precision", "bf16", "--weight-decay", "0.1", "--switch-every", "4",
             "--block-order", "descending", "--lora-targets", "q_proj, v_proj",
             "--eval-every", "0", "--seed", "11", "--ckpt-every", "0", "--remat",
             "--forgetting", "--no-progress", "--data", "notes.txt", "--export", "gguf",
             "--export-dtype", "bfloat16", "--aggregation", "mean", "--mesh", "data=2"]
  given = finetune.parse_args(options)
  path = config.write_config(given, str(tmp_path))
  assert open(path).read().startswith(f"# The options of a run of {PROG}")
  reread = finetune.parse_args(["--config", path])
  assert reread == dataclasses.replace(given, data=os.path.abspath("notes.txt"))
  assert reread.compare == ("adamw", "block_adam")
  assert reread.lora_targets == "q_proj,v_proj"


def test_command_line_overrides_the_file(tmp_path):
  path = tmp_path / "c.toml"
  path.write_text('optimizer = "adamw"\nsteps = 7\nlr = 2e-3\nforgetting = true\n'
                  'compare = "adamw, sign_sgd"\nwarmup = 1\n')
  c = finetune.parse_args(["--config", str(path), "--steps", "10"])
  assert (c.steps, c.lr, c.optimizer, c.forgetting) == (10, 2e-3, "adamw", True)
  assert c.compare == ("adamw", "sign_sgd") and c.warmup == 1
  # An option given with its default value still overrides the file's.
  assert finetune.parse_args(["--config", str(path), "--steps", "60"]).steps == 60
  # Options the file leaves out keep their defaults.
  assert c.batch == config.RunConfig().batch
  # lr = 1 is a number like 1.0
  path.write_text("lr = 1\n")
  assert finetune.parse_args(["--config", str(path)]).lr == 1.0


@pytest.mark.parametrize("text, message", [
    ("stepz = 3\n", "unknown option 'stepz'; the closest is 'steps'"),
    ("time-budget = 5.0\n", "unknown option 'time-budget'; the closest is 'time_budget'"),
    ("out = 'runs/x'\n", "out is given on the command line only (--out); remove it "
     "from the file"),
    ("resume = true\n", "resume is given on the command line only (--resume)"),
    ("steps = '10'\n", "steps must be an integer, got '10'"),
    ("relative = 1\n", "relative must be true or false, got 1"),
    ("compare = [1, 2]\n", "compare must be a list of strings, got [1, 2]"),
    ("optimizer = 'nope'\n", "optimizer must be one of absignsgd, absignsgd_uniform"),
    ("lr = -1.0\n", "--lr must be a finite number > 0, got -1.0"),
    ("steps = [\n", "not a TOML file"),
])
def test_bad_config_file_is_one_line(tmp_path, capsys, text, message):
  path = tmp_path / "bad.toml"
  path.write_text(text)
  with pytest.raises(SystemExit) as e:
    finetune.main(["--config", str(path)])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith(f"{PROG}: error: ") and err.count("\n") == 1, err
  assert message in err, err


def test_missing_config_file(tmp_path, capsys):
  with pytest.raises(SystemExit):
    finetune.main(["--config", str(tmp_path / "none.toml")])
  assert f"--config {tmp_path / 'none.toml'}: cannot be read" in capsys.readouterr().err


def test_resume_needs_out(capsys):
  with pytest.raises(SystemExit):
    finetune.parse_args(["--resume"])
  assert "--resume continues the run in --out: give --out RUN_DIR" in \
      capsys.readouterr().err


def test_help_names_the_config_option_once(capsys):
  with pytest.raises(SystemExit):
    finetune.parse_args(["--help"])
  text = " ".join(capsys.readouterr().out.split())
  assert text.count("--config TOML") == 2  # usage and the option
  assert "(default: a new runs/version_N for each run)" in text
  assert "--tensorboard" in text


def test_token_budget_sets_the_steps_and_refuses_less_than_one_step(capsys):
  c = finetune.parse_args(["--token-budget", "1000", "--batch", "2", "--seq", "64"])
  assert c.total_steps == 8  # ceil(1000 / (2 x 64)); --steps (60) is not used
  assert finetune.parse_args(["--steps", "7"]).total_steps == 7
  with pytest.raises(SystemExit):
    finetune.parse_args(["--token-budget", "100", "--batch", "2", "--seq", "64"])
  assert "--token-budget must be at least one step's tokens" in capsys.readouterr().err
