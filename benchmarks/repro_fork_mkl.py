"""The fork-after-network hang (see `equiseg_wsi/forked.py`): a worker forked by a process that has run the
network on Python threads itself could spin forever inside MKL's allocator; `forked.process_pool` now releases
MKL's buffers before each fork. `--no-release` turns that off to show the hang.

Each round is bench_cohort's CNN-only timing of the EBHI tiles in this one process: one tile at a time, two on
threads, then two on forked workers. A round whose forked timing exceeds `--timeout` seconds is reported as hung
(its workers are killed; a native stack printed when py-spy is installed). Measured 2026-12-04, 20 tiles, quiet
2-core machine: without the release 7 of 24 rounds hung (never round 0), with it 0 of 29 (and 0 of 8 with two
such processes at once). Needs ../shared/data; prints how many rounds hung.

    python benchmarks/repro_fork_mkl.py --rounds 10 --n 20 --timeout 15 --no-release
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_cohort  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=4, help="timings in this process (default 4)")
    p.add_argument("--n", type=int, default=200, help="EBHI tiles (default 200)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds after which a round counts as hung")
    p.add_argument("--data", type=Path, default=bench_cohort.DATA, help="the shared real data")
    p.add_argument("--no-release", action="store_true", help="fork without releasing MKL's buffers first")
    args = p.parse_args()
    if args.no_release:
        from equiseg_wsi import forked

        forked.release_mkl_buffers = lambda: False  # process_pool looks it up at each call
    if not (args.data / "ebhi_seg" / "manifest.csv").exists():
        print(f"repro_fork_mkl: the shared EBHI-Seg tiles are not here ({args.data}); nothing run.")
        return
    work = Path(tempfile.mkdtemp(prefix="equiseg-repro-fork-"))
    hung = 0
    try:
        cohort = bench_cohort.build_ebhi(work, args.n, args.data, seed=0)
        cnn = bench_cohort.CnnOnly()
        for r in range(args.rounds):
            done = threading.Event()

            def watch(round_no: int = r, finished: threading.Event = done) -> None:
                if finished.wait(args.timeout):
                    return
                kids = subprocess.run(["pgrep", "-P", str(os.getpid())], capture_output=True, text=True).stdout.split()
                print(f"round {round_no}: HUNG (workers {', '.join(kids)})", flush=True)
                for k in kids:
                    if shutil.which("py-spy"):
                        subprocess.run(["py-spy", "dump", "--native", "--pid", k], timeout=30)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(k), 9)

            threading.Thread(target=watch, daemon=True).start()
            try:
                res = cnn.measure(cohort.folder, {})
                print(f"round {r}: serial {res['serial']:.1f} s, threads {res['threaded']:.1f} s, "
                      f"forked {res['forked']:.1f} s", flush=True)
            except Exception as exc:  # the killed workers surface as WorkerDiedError
                hung += 1
                print(f"round {r}: {type(exc).__name__}: {exc}", flush=True)
            done.set()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{hung} of {args.rounds} rounds hung")


if __name__ == "__main__":
    main()
