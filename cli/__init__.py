"""The `equiseg` command line (installed as the `equiseg_cli` package): messages, options and exit codes only."""

import os

# Before torch is imported: PyTorch's CPU allocator then backs large tensors with 2 MB transparent huge pages.
# Every SRE layer writes a fresh activation map (64 MB at 512 x 512 x 64); with 4 kB pages the first touch of
# each costs ~15 ms of page faults, about a tenth of a CPU forward pass (benchmarks/bench_sre.py).  Users who
# set the variable themselves keep their value.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
