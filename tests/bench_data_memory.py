"""Peak memory of each training process's data side for a ~1 GB parquet of images: both ranks of a 2-process run
load the dataset (main.load_data), build their PromptSampler and draw 16 prompts, as main.main does.
    python tests/bench_data_memory.py [folder]    # makes folder/images.parquet (1000 x ~1 MB PNGs) once
Prints each rank's peak RSS (VmHWM), and the same for a process that only imports the libraries (the floor)."""
import io
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANK = """
import sys
sys.path.insert(0, {root!r})
import main, utils
cfg = main.Config(dataset={data!r}, eval_steps=0, model="tiny")
if {load}:
    rows, _, _ = main.load_data(cfg)
    proc = __import__("transformers").AutoProcessor.from_pretrained(utils.build_tiny_model({tiny!r}))
    sampler = utils.PromptSampler(rows, proc, cfg, rank={rank}, world=2)
    sampler.next(16)
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 2 ** 10)
"""


def make_parquet(path, n=1000, side=578):
    import datasets
    from PIL import Image
    rng = np.random.default_rng(0)
    images = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG")
        images.append({"bytes": buf.getvalue(), "path": None})
    ds = datasets.Dataset.from_dict({"problem": [f"What is {i}?" for i in range(n)],
                                     "solution": [str(i) for i in range(n)], "image": images},
                                    features=datasets.Features(problem=datasets.Value("string"),
                                                               solution=datasets.Value("string"),
                                                               image=datasets.Image()))
    ds.to_parquet(path)


if __name__ == "__main__":
    folder = sys.argv[1] if len(sys.argv) > 1 else "/tmp/bench_data"
    os.makedirs(folder, exist_ok=True)
    data = os.path.join(folder, "images.parquet")
    if not os.path.exists(data):
        make_parquet(data)
    tiny = os.path.join(folder, "tiny")
    results = {"parquet_mb": round(os.path.getsize(data) / 2 ** 20)}
    for name, load in (("imports_only", False), ("rank", True)):
        procs = [subprocess.Popen([sys.executable, "-c", RANK.format(root=ROOT, data=data, load=load, tiny=tiny,
                                                                     rank=r)], stdout=subprocess.PIPE, text=True)
                 for r in ((0, 1) if load else (0,))]
        peaks = [float(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
        results[name + "_peak_rss_mb"] = [round(x) for x in peaks]
    print(json.dumps(results))
