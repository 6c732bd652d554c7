"""GPU throughput of the SRE-ResNet-18 extractor (layer4) at 512 x 512: fp32 and mixed precision, batch 8..64.

Then training throughput (``equiseg pretrain``'s SimCLR step: two views, forward, NT-Xent, backward, AdamW)
in tiles/s per training step for the SRE model and its standard twin, fp32 and AMP (``--train-tile``,
``--train-batches``; ``--no-train`` skips it).

Prints tiles/s, achieved dense-formulation TFLOP/s and the fraction of the device's peak (looked up by name
for H100/H200/A100; "unknown" otherwise), plus the agreement of mixed-precision features with fp32.
One command, well under 5 minutes on a large GPU:  python benchmarks/gpu_bench.py
Smoke test on CPU (tiny sizes, proves the script works before a GPU is lent):  python benchmarks/gpu_bench.py --smoke
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_sre import dense_flops  # noqa: E402

from equiseg_wsi.models.resnet import ArchSpec, build_model  # noqa: E402
from equiseg_wsi.models.sre_conv import set_forward_path  # noqa: E402
from equiseg_wsi.models.weights import random_model  # noqa: E402
from equiseg_wsi.pretrain import TrainingNet, nt_xent  # noqa: E402

# dense (non-sparse) tensor-core peaks in TFLOP/s: (fp32 via TF32 off = plain FP32, bf16/fp16)
PEAKS = {
    "H200": (67.0, 989.0),
    "H100 SXM": (67.0, 989.0),
    "H100 NVL": (60.0, 835.0),
    "H100 PCIE": (51.0, 756.0),
    "H100": (67.0, 989.0),
    "A100": (19.5, 312.0),
}


def peak_for(name: str) -> tuple[float, float] | None:
    up = name.upper()
    for key, val in PEAKS.items():
        if all(part in up for part in key.split()):
            return val
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(model, x, amp: bool, dtype, device, reps: int) -> tuple[float, torch.Tensor]:
    with torch.inference_mode(), torch.autocast(device_type=device.type, dtype=dtype, enabled=amp):
        y = model.features(x, ("layer4",))["layer4"]
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            y = model.features(x, ("layer4",))["layer4"]
        sync(device)
    return (time.perf_counter() - t0) / reps, y.float()


def train_step_rate(spec: ArchSpec, tile: int, batch: int, amp: bool, dtype, device: torch.device,
                    reps: int) -> tuple[float, float]:
    """(tiles/s, last loss) of full SimCLR training steps; ``batch`` spots = 2 * batch tiles per step."""
    net = TrainingNet(build_model(spec, seed=0), 128, ssl=True)
    if spec.kind == "sre":
        set_forward_path(net, "dense")
    net = net.to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=amp and dtype == torch.float16 and device.type == "cuda")
    x = torch.rand(2 * batch, 3, tile, tile, device=device) * 2 - 1

    def step() -> float:
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=amp):
            z = net(x)
        loss = nt_xent(z[:batch], z[batch:], 0.2)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return float(loss.detach())

    step()  # warm-up (cuDNN autotuning, allocations)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        loss = step()
    sync(device)
    return 2 * batch * reps / (time.perf_counter() - t0), loss


def train_section(args: argparse.Namespace, device: torch.device, amp_dtype) -> None:
    tile, batches, reps = args.train_tile, [int(b) for b in args.train_batches.split(",")], args.reps
    specs = [ArchSpec(kind="sre"), ArchSpec(kind="standard")]
    if args.smoke:
        specs = [ArchSpec(kind=k, widths=(8, 16, 16, 16)) for k in ("sre", "standard")]
        tile, batches, reps = 32, [2], 1
    print(f"training (SimCLR step: 2 views x batch spots, {tile}x{tile} px):")
    start = time.perf_counter()
    for spec in specs:
        for b in batches:
            if time.perf_counter() - start > args.train_budget_s:
                print("training time budget reached, stopping")
                return
            for label, amp in (("fp32", False), (f"amp-{str(amp_dtype)[6:]}", True)):
                try:
                    rate, loss = train_step_rate(spec, tile, b, amp, amp_dtype, device, reps)
                except torch.OutOfMemoryError:
                    print(f"  {spec.kind:8s} batch {b:4d} {label}: out of memory")
                    torch.cuda.empty_cache()
                    continue
                print(f"  {spec.kind:8s} batch {b:4d} ({2 * b} tiles) {label:9s}: {rate:8.1f} tiles/s per training "
                      f"step  (loss {loss:.3f})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on any device (CPU check)")
    ap.add_argument("--batches", default="8,16,32,64")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=240.0, help="stop starting new configs after this")
    ap.add_argument("--no-train", action="store_true", help="skip the training-throughput section")
    ap.add_argument("--train-only", action="store_true", help="only the training-throughput section")
    ap.add_argument("--train-tile", type=int, default=128, help="training tile side, px")
    ap.add_argument("--train-batches", default="32,128", help="spots per step (each gives two views)")
    ap.add_argument("--train-budget-s", type=float, default=120.0, help="stop starting training configs after this")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = ArchSpec()
    batches = [int(b) for b in args.batches.split(",")]
    size, reps = args.size, args.reps
    if args.smoke:
        spec = ArchSpec(widths=(8, 16, 16, 16))
        batches, size, reps = [2, 4], 64, 1
    elif device.type != "cuda":
        print("no CUDA device: use --smoke for a CPU check")
        return 1
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peaks = peak_for(name) if device.type == "cuda" else None
    amp_dtype = torch.bfloat16 if (device.type == "cpu" or torch.cuda.is_bf16_supported()) else torch.float16
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    model = random_model(spec, seed=0).model.to(device).eval()
    flop_per_tile = dense_flops(spec, size)
    print(f"device: {name}; torch {torch.__version__}; input {size}x{size}; "
          f"{flop_per_tile / 1e9:.0f} GFLOP/tile (dense formulation)")
    print(f"peak: {'unknown' if peaks is None else f'fp32 {peaks[0]} / 16-bit {peaks[1]} TFLOP/s'}")
    if args.train_only:
        train_section(args, device, amp_dtype)
        return 0
    start = time.perf_counter()
    for cl in (False, True) if not args.smoke else (False,):
        m = model.to(memory_format=torch.channels_last) if cl else model
        for b in batches:
            if time.perf_counter() - start > args.budget_s:
                print("time budget reached, stopping")
                break
            x = torch.rand(b, 3, size, size, device=device) * 2 - 1
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            try:
                t32, y32 = run(m, x, False, amp_dtype, device, reps)
                tmp, ymp = run(m, x, True, amp_dtype, device, reps)
            except torch.OutOfMemoryError:
                print(f"batch {b}: out of memory")
                torch.cuda.empty_cache()
                continue
            err = ((ymp - y32).abs().max() / y32.abs().max()).item()
            for label, t, pk in (("fp32", t32, 0), (f"amp-{str(amp_dtype)[6:]}", tmp, 1)):
                tflops = flop_per_tile * b / t / 1e12
                frac = "unknown" if peaks is None else f"{100 * tflops / peaks[pk]:.1f}% of peak"
                print(f"{'NHWC' if cl else 'NCHW'} batch {b:3d} {label:9s}: {b / t:8.2f} tiles/s  "
                      f"{tflops:7.2f} TFLOP/s  {frac}")
            print(f"    max rel diff amp vs fp32: {err:.2e}")
    if not args.no_train:
        train_section(args, device, amp_dtype)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
