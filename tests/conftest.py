import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(os.path.dirname(ROOT), "shared", "assets")  # real configs/processors, no weights
sys.path.insert(0, ROOT)
import torch  # noqa: E402
# DeepSpeed's CPU accelerator only where there is no GPU: on the GPU machine it would pair a CPU accelerator with
# NCCL ("No backend type associated with device type cpu", seen in the colocate test)
ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def tiny_qwen2_vl(tmp_path_factory):
    from utils import build_tiny_model
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny") / "qwen2_vl"), "qwen2_vl")


def run(args, timeout=600, env=None, check=True, cwd=ROOT):
    """Runs a command (from the repo root unless cwd) with this interpreter's environment; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    if not ON_GPU:
        full_env["DS_ACCELERATOR"] = "cpu"
    p = subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} exited {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-6000:]}")
    return p


def pytest_collection_modifyitems(config, items):
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def chromium_executable():
    """A real headless Chromium: @sparticuz/chromium, a self-contained Linux build from the npm registry, installed
    once into .venv/browser and unpacked by its own code (to /tmp/chromium), driven by Playwright (pip).
    Playwright's own browser download needs a CDN this machine cannot reach. Its path, or None without npm."""
    import shutil
    if shutil.which("npm") is None or shutil.which("node") is None:
        return None
    prefix = os.path.join(ROOT, ".venv", "browser")
    package = os.path.join(prefix, "node_modules", "@sparticuz", "chromium")
    if not os.path.isdir(package):
        subprocess.run(["npm", "install", "--silent", "--prefix", prefix, "@sparticuz/chromium@153"], check=True,
                       timeout=600)
    script = "import c from '@sparticuz/chromium'; console.log(await c.executablePath());"
    out = subprocess.run(["node", "--input-type=module", "-e", script], cwd=prefix, check=True, capture_output=True,
                         text=True, timeout=300)
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def headless_chromium():
    """chromium_executable() for the report test (skipped without node and npm, or Playwright)."""
    pytest.importorskip("playwright")
    path = chromium_executable()
    if path is None:
        pytest.skip("needs node and npm (the npm registry) to fetch a headless Chromium")
    return path
