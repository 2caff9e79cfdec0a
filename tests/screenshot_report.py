"""A screenshot of the top of a run's report.html (what ran, the metrics, the curves, the latest eval) as headless
Chromium renders it, for the README, in 64 colours (small in git):
    .venv/bin/python tests/screenshot_report.py outputs/smoke docs/report.png"""
import os
import sys

from PIL import Image
from playwright.sync_api import sync_playwright

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import chromium_executable  # noqa: E402


def screenshot(out_dir, png, width=1400, height=1250):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_executable(), timeout=120_000,
                                    args=["--no-sandbox", "--no-zygote", "--single-process", "--disable-gpu"])
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(f"file://{os.path.abspath(out_dir)}/report.html")
        page.wait_for_load_state("load")
        page.screenshot(path=png, clip={"x": 0, "y": 0, "width": width, "height": height})
        browser.close()
    Image.open(png).convert("RGB").quantize(colors=64).save(png, optimize=True)


if __name__ == "__main__":
    screenshot(sys.argv[1], sys.argv[2])
