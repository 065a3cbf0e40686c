"""tests/forked.py, which the multi-process tests run their scripts through: what a script sees (argv, working
directory, environment, torchrun's variables) and what comes back (exit code, each rank's output in rank order)."""

from pathlib import Path

from tests import forked

SCRIPT = """
import os, sys
print(__name__, sys.argv[1:], os.getcwd(), os.environ["GREETING"], os.environ.get("RANK"), os.environ.get("WORLD_SIZE"))
print("rank", os.environ.get("RANK"), "speaks", file=sys.stderr)
sys.exit(3 if os.environ.get("RANK") == "1" else 0)
"""


def test_ranks_run_the_script_as_torchrun_would(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    result = forked.run(str(script), ["--flag", "x"], tmp_path / "ranks", procs=2, env={"GREETING": "hello"})
    assert result.returncode == 3  # the first non-zero exit code
    root = str(Path(forked.__file__).resolve().parents[1])
    assert result.stdout.splitlines() == [f"__main__ ['--flag', 'x'] {root} hello {rank} 2" for rank in "01"]
    assert result.stderr.splitlines() == ["rank 0 speaks", "rank 1 speaks"]


def test_one_process_has_no_torchrun_variables(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    result = forked.run(str(script), [], tmp_path / "one", env={"GREETING": "hi"})
    assert result.returncode == 0 and result.stdout.split()[-2:] == ["None", "None"]
