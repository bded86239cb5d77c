"""Training throughput of our `unet3d` against MONAI's `UNet` and `BasicUNet` of similar parameter count.

Same patch, batch, loss (our DiceCELoss), optimiser (Adam) and thread count for every model. Each model is timed in
a fresh spawned process so peak memory (RSS growth on CPU, torch.cuda.max_memory_allocated on GPU) is its own.
On CUDA all models run under bf16 autocast with channels_last_3d tensors. On CPU inputs and MONAI's weights stay in
the default layout unless --channels-last is given (our network converts to channels_last_3d internally; in quick
tests MONAI's UNet gained from the flag and BasicUNet lost, so try both when re-measuring).

Timings are the median iteration after warmup. On a shared machine multi-threaded wall times are very noisy; the
relative order was stable with --threads 1.

    python benchmarks/train_throughput.py                      # 2 threads, batch 2, 48x64x48, default widths
    python benchmarks/train_throughput.py --widths small --patch 32 48 32 --iters 5 --warmup 2   # quick

Needs the `bench` extra (MONAI); MONAI is imported only in this script.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

# Allow `python benchmarks/train_throughput.py` from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IN_CHANNELS = 1
NUM_CLASSES = 3
MODELS = ("ours unet3d", "MONAI UNet", "MONAI BasicUNet")

# Widths chosen so that the three models have similar parameter counts (printed in the table).
OUR_FEATURES = {"small": (8, 16, 32, 64, 128), "default": (16, 32, 64, 128, 256)}
MONAI_UNET_CHANNELS = {"small": (8, 16, 32, 64, 128), "default": (16, 32, 64, 128, 256)}
MONAI_BASICUNET_FEATURES = {"small": (16, 16, 32, 64, 128, 16), "default": (32, 32, 64, 128, 256, 32)}


def build_model(name: str, widths: str) -> torch.nn.Module:
    """The model called `name` at the given width setting, on CPU."""
    if name == "ours unet3d":
        from unet3d.models import build_network

        return build_network("unet3d", IN_CHANNELS, NUM_CLASSES, features=OUR_FEATURES[widths])
    from monai.networks.nets import BasicUNet, UNet

    if name == "MONAI UNet":
        channels = MONAI_UNET_CHANNELS[widths]
        return UNet(3, IN_CHANNELS, NUM_CLASSES, channels=channels, strides=(2,) * (len(channels) - 1), num_res_units=2)
    if name == "MONAI BasicUNet":
        return BasicUNet(3, IN_CHANNELS, NUM_CLASSES, features=MONAI_BASICUNET_FEATURES[widths])
    raise ValueError(name)


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def measure(name: str, args: argparse.Namespace) -> dict:
    """Train `name` for warmup + iters steps on random data; return params, s/iter, voxels/s and peak memory (MB)."""
    from unet3d.losses import DiceCELoss
    from unet3d.models import count_parameters

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    channels_last = cuda or args.channels_last
    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    model = build_model(name, args.widths).to(device)
    if channels_last:
        model = model.to(memory_format=memory_format)
    # Otherwise each model keeps its own weight layout (ours is channels_last_3d by construction).
    model.train()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = DiceCELoss().to(device)
    image = torch.randn(args.batch, IN_CHANNELS, *args.patch, device=device).contiguous(memory_format=memory_format)
    target = torch.randint(0, NUM_CLASSES, (args.batch, *args.patch), device=device)

    def step() -> None:
        optimiser.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = loss_fn(model(image), target)
        loss.backward()
        optimiser.step()

    # Baseline before the first step: model, batch and imports are resident; Adam state and activations are not.
    rss_before = _rss_bytes()
    for _ in range(args.warmup):
        step()
    iteration_seconds = []
    for _ in range(args.iters):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        iteration_seconds.append(time.perf_counter() - start)
    # Median: robust to the odd preempted iteration on a shared machine.
    seconds_per_iter = statistics.median(iteration_seconds)
    if cuda:
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        # ru_maxrss: the process's lifetime peak RSS, in KiB on Linux.
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before) / 2**20
    voxels = args.batch * args.patch[0] * args.patch[1] * args.patch[2]
    return {
        "model": name,
        "params": count_parameters(model),
        "s_per_iter": seconds_per_iter,
        "voxels_per_s": voxels / seconds_per_iter,
        "peak_mb": peak_mb,
    }


def check_odd_patch(args: argparse.Namespace) -> list[str]:
    """Forward nnU-Net's 40x56x40 patch (not divisible by 16) through ours and MONAI UNet; report shapes/errors."""
    torch.set_num_threads(args.threads)
    lines = []
    x = torch.randn(1, IN_CHANNELS, 40, 56, 40)
    for name in ("ours unet3d", "MONAI UNet"):
        model = build_model(name, args.widths).eval()
        try:
            with torch.no_grad():
                out = model(x)
            lines.append(f"{name}: input {tuple(x.shape)} -> logits {tuple(out.shape)}")
        except Exception as error:  # noqa: BLE001 - we report MONAI's failure mode, whatever it is
            lines.append(f"{name}: input {tuple(x.shape)} -> {type(error).__name__}: {str(error).splitlines()[0]}")
    return lines


def _in_fresh_process(function, *args):
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patch", type=int, nargs=3, default=[48, 64, 48], metavar=("X", "Y", "Z"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--widths", choices=("small", "default"), default="default")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--channels-last", action="store_true", help="channels_last_3d on CPU too (always on CUDA)")
    args = parser.parse_args()
    if args.iters < 1:
        parser.error("--iters must be >= 1")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"

    print(
        f"device={args.device} threads={args.threads} batch={args.batch} patch={'x'.join(map(str, args.patch))} "
        f"widths={args.widths} iters={args.iters} warmup={args.warmup} loss=DiceCE optimiser=Adam "
        f"channels_last={args.device == 'cuda' or args.channels_last} "
        f"peak={'torch.cuda.max_memory_allocated' if args.device == 'cuda' else 'RSS growth over the idle model'}"
    )
    results = {name: _in_fresh_process(measure, name, args) for name in MODELS}
    header = f"{'model':<18}{'params':>12}{'s/iter':>10}{'voxels/s':>14}{'peak MB':>10}"
    print(header)
    print("-" * len(header))
    for r in results.values():
        print(
            f"{r['model']:<18}{r['params']:>12,}{r['s_per_iter']:>10.3f}{r['voxels_per_s']:>14,.0f}"
            f"{r['peak_mb']:>10.0f}"
        )
    for line in _in_fresh_process(check_odd_patch, args):
        print(line)
    ours = results["ours unet3d"]["voxels_per_s"]
    baseline = results["MONAI BasicUNet"]["voxels_per_s"]
    print(
        json.dumps(
            {
                "benchmark": "train_throughput",
                "ours": round(ours, 1),
                "baseline": round(baseline, 1),
                "unit": "voxels/s",
                "ratio": round(ours / baseline, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
