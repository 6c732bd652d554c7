"""CPU throughput of the SRE-ResNet-18 feature extractor through layer4 at 512 x 512 (and 704 x 704).

Prints images/s and effective GFLOP/s for each forward path of ours and for the reference implementation
(PyPI ``sre-conv==1.0.2``, loaded from its module files) with the same weights, checks that the outputs agree,
and ends with ``ratio vs reference: N.Nx`` (best of our paths vs the reference, same run).

On CPU, ``auto`` and ``ring`` run the compiled ring kernel (``equiseg_wsi.models.ring_kernel``, numba) for every
SRE layer; ``fft`` and ``dense`` are the other exact paths.

Like the ``equiseg`` command, the script sets ``THP_MEM_ALLOC_ENABLE=1`` before importing torch (huge pages for
large CPU tensors: fewer page faults on fresh activation maps); set it to 0 to measure without.

Effective GFLOP/s counts the FLOPs of the dense-kernel formulation (2 * C_in * C_out * K^2 per output pixel
for every conv, 1x1 shortcuts included; BN/ReLU/pooling ignored), whatever path actually ran, so paths that
do fewer operations show a higher "effective" rate.

The extractor's real workload is a halo'd tile (512 + 2 x 96 = 704 px): ``--extra-sizes 704`` (the default)
also times the auto path and the reference there and prints that ratio; the last line stays the ratio at
``--size``.  On a shared machine other processes skew wall-clock times: compare the ratio, measured in the
same run, and use ``--threads 1`` for a figure less sensitive to contention.

Usage: python benchmarks/bench_sre.py [--size 512] [--extra-sizes 704] [--reps 2] [--batch 1] [--no-reference]
       [--per-stage]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import types
from pathlib import Path

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as the equiseg CLI does (see cli/__init__.py); both models

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from equiseg_wsi.models.resnet import ArchSpec, ResNetFeatures  # noqa: E402
from equiseg_wsi.models.sre_conv import set_forward_path  # noqa: E402
from equiseg_wsi.models.weights import random_model  # noqa: E402


def dense_flops(spec: ArchSpec, size: int) -> float:
    """FLOPs of the dense-kernel formulation through the last stage for one size x size image."""
    flops = 2.0 * spec.in_channels * spec.widths[0] * spec.stem_kernel**2 * size * size
    cin, s = spec.widths[0], size
    for planes, k, n, st in zip(spec.widths, spec.kernel_sizes, spec.blocks, spec.strides, strict=True):
        s //= st
        for b in range(n):
            c_in = cin if b == 0 else planes
            flops += 2.0 * (c_in * planes + planes * planes) * k * k * s * s
            if b == 0 and (st != 1 or cin != planes):
                flops += 2.0 * cin * planes * s * s
        cin = planes
    return flops


def load_reference():
    """Import the reference sre_conv/sre_resnet modules without its __init__ (needs torchio/torchvision)."""
    spec = importlib.util.find_spec("SRE_Conv")
    if spec is None or not spec.submodule_search_locations:
        return None
    base = Path(list(spec.submodule_search_locations)[0])
    pkg = types.ModuleType("SRE_Conv")
    pkg.__path__ = [str(base)]
    sys.modules.setdefault("SRE_Conv", pkg)
    mods = {}
    for name in ("sre_conv", "sre_resnet"):
        s = importlib.util.spec_from_file_location(f"SRE_Conv.{name}", base / f"{name}.py")
        m = importlib.util.module_from_spec(s)
        sys.modules[f"SRE_Conv.{name}"] = m
        s.loader.exec_module(m)
        mods[name] = m
    return mods


def ref_features(net, x):
    x = net.relu(net.bn1(net.conv1(x)))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


def timeit(fn, reps: int):
    out = fn()  # warm-up (also FFT plans, oneDNN primitives)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def per_stage(model: ResNetFeatures, x: torch.Tensor, paths: list[str]) -> None:
    for path in paths:
        set_forward_path(model, path)
        with torch.inference_mode():
            h = x
            t0 = time.perf_counter()
            h = model.relu(model.bn1(model.conv1(h)))
            row = [f"stem {time.perf_counter() - t0:.3f}"]
            for name in model.stage_names:
                t0 = time.perf_counter()
                h = getattr(model, name)(h)
                row.append(f"{name} {time.perf_counter() - t0:.3f}")
        print(f"  per stage [{path}] s: " + ", ".join(row))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--extra-sizes", default="704", help="comma-separated sizes timed for auto + reference")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")
    ap.add_argument("--paths", default="auto,fft,ring,dense")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--per-stage", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = ArchSpec()
    loaded = random_model(spec, seed=0)
    model = loaded.model.eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(args.batch, 3, args.size, args.size, generator=gen) * 2 - 1
    gflop = dense_flops(spec, args.size) * args.batch / 1e9
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, input {args.batch}x3x{args.size}x{args.size}")
    print(f"dense-formulation cost through layer4: {gflop / args.batch:.1f} GFLOP per image")

    results: dict[str, float] = {}
    outputs: dict[str, torch.Tensor] = {}
    for path in [p for p in args.paths.split(",") if p]:
        set_forward_path(model, path)
        with torch.inference_mode():
            t, y = timeit(lambda: model.features(x, ("layer4",))["layer4"], args.reps)
        results[path] = t
        outputs[path] = y
        print(f"ours [{path:5s}]: {args.batch / t:7.3f} images/s  {t / args.batch:7.3f} s/image  "
              f"{gflop / t:8.1f} effective GFLOP/s")
    if args.per_stage:
        per_stage(model, x, [p for p in args.paths.split(",") if p])
    base = next(iter(outputs.values()))
    for path, y in outputs.items():
        err = ((y - base).abs().max() / base.abs().max()).item()
        print(f"  max rel diff {path} vs {next(iter(outputs))}: {err:.2e}")

    if args.no_reference:
        return 0
    mods = load_reference()
    if mods is None:
        print("reference SRE_Conv not installed: no ratio")
        return 1
    ref = mods["sre_resnet"].sre_resnet18(sre_conv_size=list(spec.kernel_sizes), skip_first_maxpool=True)
    sd = {k: v for k, v in model.state_dict().items()}
    missing = ref.load_state_dict(sd, strict=False)
    assert not [k for k in missing.missing_keys if not k.endswith("weight_index_mat") and not k.startswith("fc.")]
    ref.eval()  # the reference caches its dense kernels here (after loading: its cache would go stale otherwise)
    with torch.inference_mode():
        t_ref, y_ref = timeit(lambda: ref_features(ref, x), max(1, args.reps - 1))
    print(f"reference   : {args.batch / t_ref:7.3f} images/s  {t_ref / args.batch:7.3f} s/image  "
          f"{gflop / t_ref:8.1f} GFLOP/s")
    for path, y in outputs.items():
        err = ((y - y_ref).abs().max() / y_ref.abs().max()).item()
        print(f"  max rel diff {path} vs reference: {err:.2e}")
    best = min(results, key=results.get)

    for size in [int(v) for v in args.extra_sizes.split(",") if v]:
        xs = torch.rand(args.batch, 3, size, size, generator=gen) * 2 - 1
        gs = dense_flops(spec, size) * args.batch / 1e9
        set_forward_path(model, "auto")
        with torch.inference_mode():
            t_s, y_s = timeit(lambda xs=xs: model.features(xs, ("layer4",))["layer4"], args.reps)
            t_r, y_r = timeit(lambda xs=xs: ref_features(ref, xs), max(1, args.reps - 1))
        err = ((y_s - y_r).abs().max() / y_r.abs().max()).item()
        print(f"[{size}x{size}] ours [auto ]: {args.batch / t_s:7.3f} images/s  {t_s / args.batch:7.3f} s/image  "
              f"{gs / t_s:8.1f} effective GFLOP/s")
        print(f"[{size}x{size}] reference   : {args.batch / t_r:7.3f} images/s  {t_r / args.batch:7.3f} s/image  "
              f"{gs / t_r:8.1f} GFLOP/s  (max rel diff {err:.2e})")
        print(f"[{size}x{size}] ratio vs reference: {t_r / t_s:.1f}x")

    print(f"best path at {args.size}x{args.size}: {best}")
    print(f"ratio vs reference: {t_ref / results[best]:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
