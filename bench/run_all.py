"""`make bench`: every benchmark in turn, each in its own process (peak memory and engine ports
are per process). About an hour on 2 cores; paste the outputs into bench/RESULTS.md."""

import subprocess
import sys

BENCHMARKS = [
    ["bench.generation"],
    ["bench.engine_dtype"],
    ["bench.training"],
    ["bench.training", "--memory"],
    ["bench.load"],
    ["bench.swap"],
    ["bench.learning"],
    ["bench.alignment", "--votes", "200"],
]

if __name__ == "__main__":
    failed = []
    for args in BENCHMARKS:
        print(f"\n=== python -m {' '.join(args)}", flush=True)
        if subprocess.call([sys.executable, "-m", *args]) != 0:
            failed.append(" ".join(args))
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")
