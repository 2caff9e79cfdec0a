"""The README stays true: every flag in its table with the right default, and CI runs its test command."""
import dataclasses
import os

from conftest import ROOT


def test_readme_lists_every_flag_with_its_default():
    import main
    text = open(os.path.join(ROOT, "README.md")).read()
    for f in dataclasses.fields(main.Config):
        assert f"| `--{f.name}` | `{f.default}` | {f.metadata['help']} |" in text, f.name


def test_ci_runs_the_readme_test_command():
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    command = ".venv/bin/python -m pytest -q -n 2 --dist loadgroup tests"
    assert f"bash setup.sh && {command}" in readme
    assert "bash setup.sh" in ci and command in ci


def test_the_test_commands_xdist_groups_keep_their_tests_on_one_worker(tmp_path):
    """--dist loadgroup sends the tests of one xdist_group to one worker (test_resume's shared uninterrupted runs,
    test_vllm's engines, the report pages); pytest 9.2 with pytest-xdist 3.8 drops the group silently and each
    worker repeats the shared work (xdist issue 1386): .ci/requirements-cpu.txt pins pytest below it."""
    import sys
    from conftest import run
    (tmp_path / "test_grouped.py").write_text(
        "import os, pytest\n"
        "pytestmark = pytest.mark.xdist_group('one')\n"
        "@pytest.mark.parametrize('i', range(6))\n"
        "def test_worker(i):\n"
        "    open(os.path.join(os.path.dirname(__file__), f'ran_{i}'), 'w').write(os.environ['PYTEST_XDIST_WORKER'])\n")
    run([sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup", "-p", "no:cacheprovider",
         "test_grouped.py"], cwd=tmp_path, timeout=120)
    workers = {(tmp_path / f"ran_{i}").read_text() for i in range(6)}
    assert len(workers) == 1, f"one group's tests ran on workers {sorted(workers)}"
