"""Time and memory of ``runtime.preprocess.resize_longest_side`` on a large image, per backend.

    python benchmarks/bench_resize.py [--size 4000] [--repeats 3]

Each backend runs in a fresh process (peak RSS is per process); memory is the peak RSS above
the process's level after the input image was made, time the median of ``--repeats`` calls.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import importlib.util, json, resource, sys, time
import numpy as np
backend, size, repeats, module = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if module:
    spec = importlib.util.spec_from_file_location("resize_impl", module)
    impl = importlib.util.module_from_spec(spec); spec.loader.exec_module(impl)
    resize = lambda im: impl.resize_longest_side(im, 1024)
else:
    from peft_export.runtime.preprocess import resize_longest_side
    resize = lambda im: resize_longest_side(im, 1024, backend=backend)
image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
times = []
for _ in range(repeats):
    t = time.perf_counter()
    out = resize(image)
    times.append(time.perf_counter() - t)
extra = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
print(json.dumps({"median_s": sorted(times)[len(times) // 2], "peak_extra_mb": extra, "out": list(out.shape)}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=4000, help="side of the square RGB uint8 test image")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backends", default="pillow,numpy", help="comma list of pillow, numpy")
    p.add_argument("--module", default="", help="time resize_longest_side from this file instead (old versions)")
    args = p.parse_args()
    for backend in ([args.module and "module"] if args.module else args.backends.split(",")):
        res = subprocess.run([sys.executable, "-c", CHILD, backend, str(args.size), str(args.repeats), args.module],
                             capture_output=True, text=True, check=True)
        r = json.loads(res.stdout)
        print(f"{backend:<8} {args.size}x{args.size} RGB -> {r['out'][0]}x{r['out'][1]}: "
              f"{r['median_s']:.3f} s (median of {args.repeats}), peak RSS +{r['peak_extra_mb']:.0f} MB")


if __name__ == "__main__":
    main()
