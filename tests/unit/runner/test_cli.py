"""The `runner` command: help without heavy imports, validate/plan/train exit codes and output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from runner.cli import COMMANDS, main
from runner.recipe import read_recipe

REPO = Path(__file__).resolve().parents[3]
LORA = str(REPO / "recipes" / "stage_c_lora.yaml")
SEVERAL = str(REPO / "tests" / "bad_recipes" / "several_errors.yaml")


def test_help_is_quick_and_imports_no_torch() -> None:
    code = (
        "import sys\nfrom runner.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "heavy = [m for m in ('torch', 'transformers', 'safetensors', 'webdataset') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "main(['validate', sys.argv[1]])\n"
        "assert 'torch' not in sys.modules\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, LORA], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "runner RECIPE [key=value ...]" in out.stdout
    for name in COMMANDS:
        assert name in out.stdout


def test_python_dash_m_runner_validate() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "runner", "validate", LORA],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"{LORA}: OK")


def test_validate_reports_every_problem_with_lines(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", LORA, SEVERAL]) == 2
    out = capsys.readouterr().out
    assert f"{LORA}: OK" in out
    assert f"{SEVERAL}: 3 problems" in out
    assert f"{SEVERAL}:17:5: training.optimizer.nmae: unknown key 'nmae'; did you mean 'name'?" in out
    assert f"{SEVERAL}:18:32: training.gradient_accumulation_steps" in out
    assert f"{SEVERAL}:23:19: data.sources[0].crop_style" in out and "did you mean 'center'?" in out
    assert "Traceback" not in out


def test_validate_check_paths_makes_missing_data_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", LORA]) == 0
    assert "warning:" in capsys.readouterr().out
    assert main(["validate", "--check-paths", LORA]) == 2
    assert "no shard matches datasets/my_subject/shards/*.tar" in capsys.readouterr().out


def test_validate_applies_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", LORA, "training.precision.mixed_precision=fp16"]) == 2
    assert "Stage C overflows in fp16" in capsys.readouterr().out


def test_plan_prints_the_resolved_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", LORA, "training.max_steps=777"]) == 0
    printed = capsys.readouterr().out
    resolved = yaml.safe_load(printed)
    expected = read_recipe(LORA, ["training.max_steps=777"], paths="warn").resolved
    assert resolved == expected
    assert "  warmup_steps: 100" in printed and "mixed_precision: bf16" in printed


def test_train_refuses_a_missing_local_model_before_starting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "0.tar").write_bytes(b"")
    missing = tmp_path / "no_such_prior"
    assert main([LORA, f"data.sources.0.path={shards}/*.tar", f"model.prior.path={missing}",
                 f"output.dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert "model.prior.path" in err and "does not exist" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        ([LORA], "no shard matches"),
        (["plan", "missing.yaml"], "recipe file missing.yaml does not exist"),
        ([LORA, "training.nope=1"], "unknown key 'nope'"),
        ([LORA, "data.sources.9.path=x"], "use an index from 0 to 0"),
    ],
)
def test_user_errors_exit_2_without_traceback(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_unknown_option_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["validate", "--frobnicate", LORA])
    assert info.value.code == 2
