"""What Dreamline's safety work costs per generated image, side by side with the PNG encoding every served image
already paid, in one process on the same images.

    .venv/bin/python bench/safety.py [--sizes 512 1024] [--repeat 10]

Per size (the sample photos resized: natural images, as generated ones are), the median over `--repeat` rounds of:
    png      encoding the image as PNG (what the server did before: the baseline)
    screen   NudeNet's detector on it (sd_tasks.safety.screening)
    mark     the invisible watermark (sd_tasks.safety.marking)
    sign     C2PA Content Credentials on the PNG (sd_tasks.safety.credentials; a test CA made here)
    read     reading the mark back (is_marked: what an audit pays, not a request)
and the whole path a served image takes now (screen, mark, png, sign) as a multiple of png alone. The machine's
load average is printed with the figures; docs/benchmarks.md has them.
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "safety")]


def png(image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def timed(work, repeat: int) -> float:
    """Median seconds of `work()` over `repeat` runs, after one untimed run."""
    work()
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        work()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()

    from PIL import Image

    from sd_tasks.safety.credentials import Credentials
    from sd_tasks.safety.marking import is_marked, mark
    from sd_tasks.safety.screening import NudeNetScreen
    from test_ca import make_chain

    chain = make_chain(Path(tempfile.mkdtemp(prefix="bench-c2pa-")))
    credentials = Credentials.from_files(str(chain["chain"]), str(chain["key"]))
    screen = NudeNetScreen()
    photo = Image.open(sorted((REPO / "sample_data" / "dog").glob("*.jpg"))[0]).convert("RGB")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; median of {args.repeat}")
    print(f"{'size':>6} {'png':>8} {'screen':>8} {'mark':>8} {'sign':>8} {'read':>8} {'served/png':>11}")
    for size in args.sizes:
        image = photo.resize((size, size), Image.LANCZOS)
        marked = mark(image)
        data = png(marked)
        figures = {"png": timed(lambda: png(image), args.repeat),
                   "screen": timed(lambda: screen.reason(image), args.repeat),
                   "mark": timed(lambda: mark(image), args.repeat),
                   "sign": timed(lambda: credentials.sign(data, "bench-sdxl-lora", 1), args.repeat),
                   "read": timed(lambda: is_marked(marked), args.repeat)}
        served = timed(lambda: screen.reason(image) or credentials.sign(png(mark(image)), "bench-sdxl-lora", 1),
                       args.repeat)
        print(f"{size:>6} " + " ".join(f"{figures[k] * 1000:>6.0f}ms" for k in figures)
              + f" {served / figures['png']:>10.1f}x  (served {served * 1000:.0f} ms)")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
