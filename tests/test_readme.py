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
