"""Start-up of the lazy conversation data at LLaVA-v1.5-mix665k scale: time from nothing to the first
micro-batch and peak memory of the process tree (trainer process + DataLoader workers).

The data is synthetic and shaped like llava_v1_5_mix665k.json: by default 665,000 records of 2 to 6
turns, about 1 GB of JSON, most records naming one of a few shared images, some text-only, a few
naming a missing image. It is written into a temporary directory. The processor is the tiny LLaVA
processor of :mod:`grace.demo.tiny` over the synthetic vocabulary (the data path, not the CLIP preprocessing,
is what is measured).

Memory is sampled every 50 ms over the process and its children: the sum of RSS (counts pages that
forked workers share with the parent once per process, so it over-states) and the sum of PSS (shared
pages divided among the processes sharing them: the tree's real footprint).

    PYTHONPATH=. python benchmarks/bench_data.py    # 665k records, 4 workers (from the repository root)
    PYTHONPATH=. python benchmarks/bench_data.py --records 50000 --workers 2
    python -m pytest benchmarks/bench_data.py       # a 20k-record run with the same targets
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time

import numpy as np
import psutil
from PIL import Image

STARTUP_LIMIT_S = 60.0
PEAK_LIMIT_BYTES = 4 << 30
WORDS = ("what is the color shape of this object in image how many are there where red green blue yellow circle square "
         "triangle top bottom left right middle one two three four yes no describe scene person table car street "
         "window sky tree dog cat building water people sign wall light food plate ? . ,").split()


def write_synthetic(folder: str, n_records: int, seed: int = 0, n_images: int = 16) -> tuple[str, str]:
    """(json path, image folder): ``n_records`` LLaVA-format records (~1.5 kB each), 90% naming one of
    ``n_images`` shared images, 1 in 1000 a missing image, the rest text-only."""
    rng = np.random.default_rng(seed)
    images = os.path.join(folder, "images")
    os.makedirs(images, exist_ok=True)
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(os.path.join(images, f"{i}.png"))
    # Records are assembled from a pool of serialised conversations: drawing 1 GB of words one by one
    # would take longer than what is measured.
    sentences = [" ".join(rng.choice(WORDS, size=int(k))) for k in rng.integers(5, 80, size=4096)]

    def conversation(with_image: bool) -> str:
        turns = []
        for t in range(int(rng.integers(1, 4))):   # 2 to 6 turns
            q = sentences[rng.integers(len(sentences))]
            a = " ".join(sentences[j] for j in rng.integers(len(sentences), size=2))
            turns += [{"from": "human", "value": f"<image>\n{q}" if with_image and t == 0 else q},
                      {"from": "gpt", "value": a}]
        return json.dumps(turns)

    pool = {True: [conversation(True) for _ in range(2048)], False: [conversation(False) for _ in range(2048)]}
    kind, pick, image_of = rng.random(n_records), rng.integers(2048, size=n_records), rng.integers(n_images,
                                                                                                    size=n_records)
    path = os.path.join(folder, "mix.json")
    with open(path, "w") as f:
        f.write("[\n")
        for r in range(n_records):
            sep = ",\n" if r else ""
            if kind[r] < 0.1:
                f.write(f'{sep}{{"id": "{r:09d}", "conversations": {pool[False][pick[r]]}}}')
                continue
            image = "missing.png" if kind[r] > 0.999 else f"{image_of[r]}.png"
            f.write(f'{sep}{{"id": "{r:09d}", "image": "{image}", "conversations": {pool[True][pick[r]]}}}')
        f.write("\n]\n")
    return path, images


class TreeMemory:
    """Peak sum of RSS and of PSS over this process and its children, sampled on a thread."""

    def __init__(self, interval_s: float = 0.05):
        self.interval_s, self.peak_rss, self.peak_pss = interval_s, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        me = psutil.Process()
        rss = pss = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                info = p.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rss, pss = rss + info.rss, pss + getattr(info, "pss", info.rss)
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self):
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()


def run(n_records: int, workers: int, batch_size: int = 16, more_batches: int = 20, folder: str | None = None) -> dict:
    """Write the data (not timed), then time index + stream + first micro-batch; also time ``more_batches``."""
    from grace.data import ConversationDataset, SampleStream
    from grace.demo.tiny import build_processor

    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        t = time.perf_counter()
        path, images = write_synthetic(tmp, n_records)
        write_s = time.perf_counter() - t
        processor = build_processor(vocab_words=WORDS)
        json_mb_s = _json_throughput(path)
        with TreeMemory() as mem:
            base_rss = mem.peak_rss
            t0 = time.perf_counter()
            dataset = ConversationDataset.from_json(path, processor, images, max_length=2048)
            index_s = time.perf_counter() - t0
            stream = SampleStream(dataset, batch_size=batch_size, seed=0, num_workers=workers)
            first = next(stream)
            startup_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            for _ in range(more_batches):
                next(stream)
            per_batch_s = (time.perf_counter() - t1) / max(1, more_batches)
            stream.close()
        return {"records": n_records, "json_bytes": os.path.getsize(path), "indexed": len(dataset),
                "bad_met": dict(stream.skipped),
                "workers": workers, "batch_size": batch_size, "first_batch_tokens": tuple(first["input_ids"].shape),
                "write_s": round(write_s, 1), "index_s": round(index_s, 2), "startup_s": round(startup_s, 2),
                "per_batch_s": round(per_batch_s, 4), "json_loads_mb_per_s": round(json_mb_s, 1),
                "load_average": os.getloadavg()[0], "index_bytes": dataset.index.nbytes,
                "rss_before_bytes": base_rss, "peak_rss_sum_bytes": mem.peak_rss, "peak_pss_sum_bytes": mem.peak_pss,
                "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine()}


def _json_throughput(path: str, nbytes: int = 16 << 20) -> float:
    """MB/s of ``json.loads`` on the first records of ``path``: how fast this machine parses JSON right now
    (index time is about the file size over this), to compare runs on a loaded or a quiet machine."""
    with open(path, "rb") as f:
        head = f.read(nbytes)
    head = head[:head.rfind(b"},\n") + 1] + b"]"   # records end "},\n" in write_synthetic's file
    t = time.perf_counter()
    json.loads(head)
    return len(head) / (time.perf_counter() - t) / 1e6


def test_startup_20k_records(tmp_path):
    r = run(20_000, workers=2, more_batches=5, folder=str(tmp_path))
    print(r)
    assert r["startup_s"] < STARTUP_LIMIT_S and r["peak_pss_sum_bytes"] < PEAK_LIMIT_BYTES
    assert r["indexed"] == 20_000 and r["first_batch_tokens"][0] == 16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=665_000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--tmp", default=None, help="folder for the synthetic data (default: the system's temp dir)")
    args = ap.parse_args()
    r = run(args.records, args.workers, args.batch_size, folder=args.tmp)
    gib = 1 << 30
    print(json.dumps(r, indent=1))
    print(f"machine: {r['cpus']} CPUs, load average {r['load_average']:.1f}, json.loads "
          f"{r['json_loads_mb_per_s']:.0f} MB/s")
    print(f"start-up to first batch {r['startup_s']:.1f} s (limit {STARTUP_LIMIT_S:.0f}); peak PSS of the tree "
          f"{r['peak_pss_sum_bytes'] / gib:.2f} GiB, sum of RSS {r['peak_rss_sum_bytes'] / gib:.2f} GiB "
          f"(limit {PEAK_LIMIT_BYTES / gib:.0f})")


if __name__ == "__main__":
    main()
