"""Sliding-window inference: unet3d.sliding_window_predict against MONAI's sliding_window_inference.

Both run the same network (unet3d's ``unet3d`` architecture, random weights, eval mode) on the same volumes with
the same window (default 40x56x40, the nnU-Net plan for MSD hippocampus), overlap 0.5 and gaussian blending with
sigma = window / 8, under torch.inference_mode. MONAI's logits are turned into probabilities with a softmax and
compared voxel by voxel with ours.

MONAI runs with its defaults apart from window, overlap and mode: ``sw_batch_size=1`` (the default of its
``SlidingWindowInferer``; the function itself requires the argument) and also, for fairness, with our batch size.
Our settings are the fastest that keep the probabilities within 1e-3 of MONAI's: float32 (bfloat16 autocast,
our CUDA default, is timed separately on CUDA and its difference printed, but it is not the headline number).

Window placement: both put the first window at 0 and the last flush with the far side, but MONAI steps by
int(window * (1 - overlap)) and shifts only the last window back, while we spread the windows evenly. The grids
coincide when (size - window) is a multiple of the step along every axis (e.g. 120x140x60 for a 40x56x40 window);
only then is the difference a test of the blending arithmetic. Volumes whose grids differ (default 128x128x64) are
timed all the same and their difference is printed apart; with instance normalisation every window's logits depend
on where the window sits, so those differences are large and expected.

Timings are the best of --repeats interleaved runs (load from other processes only ever adds time); the
summary averages the per-volume seconds over all volumes.

    python benchmarks/inference.py                 # default volumes, best of 3
    python benchmarks/inference.py --quick         # smaller volumes, 1 repeat
    python benchmarks/inference.py --sizes 36x50x36,120x140x60 --batch-size 8 --device cuda

Ends with one JSON line: {"benchmark": "sliding_window_inference", "ours": s/volume, "baseline": s/volume, ...}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from unet3d.sliding_window import sliding_window_predict, window_starts  # noqa: E402

NUM_CLASSES = 3
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "msd_hippocampus" / "imagesTr"


# ------------------------------------------------------------------------------------------------ the network
class _ConvBlock(nn.Sequential):
    """Two (conv 3x3x3, instance norm, leaky ReLU): (B, C_in, X, Y, Z) -> (B, C_out, X, Y, Z)."""

    def __init__(self, in_channels: int, out_channels: int):
        layers: list[nn.Module] = []
        for c_in in (in_channels, out_channels):
            layers += [nn.Conv3d(c_in, out_channels, 3, padding=1), nn.InstanceNorm3d(out_channels, affine=True),
                       nn.LeakyReLU(0.01, inplace=True)]
        super().__init__(*layers)


class FallbackUNet(nn.Module):
    """Plain 3D U-Net (max-pool down, transposed conv up, concatenated skips), used only when unet3d.models is
    missing. Spatial sides must be divisible by 2 ** (len(features) - 1)."""

    def __init__(self, in_channels: int, num_classes: int, features: tuple[int, ...] = (16, 32, 64, 128)):
        super().__init__()
        self.encoder = nn.ModuleList(
            _ConvBlock(c_in, c_out) for c_in, c_out in zip((in_channels, *features[:-1]), features))
        self.up = nn.ModuleList(nn.ConvTranspose3d(features[i + 1], features[i], 2, stride=2)
                                for i in range(len(features) - 1))
        self.decoder = nn.ModuleList(_ConvBlock(2 * features[i], features[i]) for i in range(len(features) - 1))
        self.head = nn.Conv3d(features[0], num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for level, block in enumerate(self.encoder):
            x = block(F.max_pool3d(x, 2) if level else x)
            skips.append(x)
        for level in reversed(range(len(self.decoder))):
            x = self.decoder[level](torch.cat([skips[level], self.up[level](x)], dim=1))
        return self.head(x)


def build_model(features: tuple[int, ...]) -> tuple[nn.Module, str]:
    torch.manual_seed(0)
    try:
        from unet3d.models import build_network
    except ImportError:
        return FallbackUNet(1, NUM_CLASSES, features).eval(), f"FallbackUNet{features}"
    return build_network("unet3d", in_channels=1, num_classes=NUM_CLASSES, features=features).eval(), \
        f"unet3d.models unet3d{features}"


# ------------------------------------------------------------------------------------------------ the volumes
def synthetic_volume(size: tuple[int, int, int], seed: int) -> Tensor:
    """(1, X, Y, Z) smooth noise with a few bright blobs, z-scored like a normalised MRI."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, 1, *size), generator=generator)
    volume = F.avg_pool3d(F.avg_pool3d(noise, 5, 1, 2, count_include_pad=False), 5, 1, 2, count_include_pad=False)
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in size], indexing="ij"))
    for _ in range(4):
        centre = torch.rand(3, generator=generator) * torch.tensor(size, dtype=torch.float32)
        radius = 3 + 5 * torch.rand(1, generator=generator).item()
        distance2 = ((grid - centre[:, None, None, None]) ** 2).sum(dim=0)
        volume[0, 0] += 3 * torch.exp(-distance2 / (2 * radius ** 2))
    volume = (volume - volume.mean()) / volume.std()
    return volume[0].contiguous()


def real_volume(folder: Path) -> tuple[str, Tensor] | None:
    """The first hippocampus image, (1, X, Y, Z), z-scored; None when the data or SimpleITK is missing."""
    files = sorted(folder.glob("*.nii.gz")) if folder.is_dir() else []
    if not files:
        return None
    try:
        import SimpleITK as sitk
    except ImportError:
        return None
    # GetArrayFromImage is (z, y, x); the project order is (x, y, z).
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(files[0]))).transpose(2, 1, 0).astype("float32")
    volume = torch.from_numpy(array.copy())
    volume = (volume - volume.mean()) / volume.std()
    return files[0].name.removesuffix(".nii.gz"), volume[None]


def monai_grid(size: int, window: int, overlap: float) -> list[int]:
    """Window starts along one axis as MONAI places them (fixed step, last window pushed back)."""
    size = max(size, window)
    step = max(int(window * (1 - overlap)), 1) if size != window else window
    starts = []
    for start in range(0, size, step):
        starts.append(min(start, size - window))
        if start + window >= size:
            break
    return starts


# ------------------------------------------------------------------------------------------------ timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Tensor], device: torch.device) -> tuple[float, Tensor]:
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def parse_size(text: str) -> tuple[int, int, int]:
    parts = tuple(int(v) for v in text.lower().split("x"))
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected XxYxZ, got {text!r}")
    return parts  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per method and volume, interleaved; the best is reported (default 3)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--quick", action="store_true", help="smaller volumes, 1 repeat")
    parser.add_argument("--sizes", type=str, default=None,
                        help="comma-separated synthetic volume sizes XxYxZ (default 36x50x36,120x140x60,128x128x64)")
    parser.add_argument("--patch", type=parse_size, default=(40, 56, 40), help="window XxYxZ (default 40x56x40)")
    parser.add_argument("--batch-size", type=int, default=4, help="our windows per forward (default 4)")
    parser.add_argument("--features", type=str, default="16,32,64,128", help="U-Net features per stage")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="hippocampus imagesTr folder (optional)")
    parser.add_argument("--no-real", action="store_true", help="skip the real hippocampus image")
    args = parser.parse_args()

    try:
        from monai.inferers import sliding_window_inference
    except ImportError:
        sys.exit("MONAI is needed for this benchmark: pip install 'monai>=1.4'")

    torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    repeats = 1 if args.quick else max(args.repeats, 1)
    default_sizes = "36x50x36,60x84x60" if args.quick else "36x50x36,120x140x60,128x128x64"
    sizes = [parse_size(s) for s in (args.sizes or default_sizes).split(",")]
    patch = tuple(args.patch)
    features = tuple(int(f) for f in args.features.split(","))

    model, model_name = build_model(features)
    model = model.to(device)
    volumes: list[tuple[str, Tensor]] = [
        ("x".join(map(str, size)), synthetic_volume(size, seed)) for seed, size in enumerate(sizes)]
    if not args.no_real and (real := real_volume(args.data)) is not None:
        volumes.append(real)
    volumes = [(name, v.to(device)) for name, v in volumes]

    def ours(image: Tensor, amp: bool = False) -> Tensor:
        return sliding_window_predict(model, image, patch, NUM_CLASSES, overlap=0.5, batch_size=args.batch_size,
                                      device=device, amp=amp, output_device=device)

    def monai(image: Tensor, sw_batch_size: int) -> Tensor:
        logits = sliding_window_inference(image[None], patch, sw_batch_size, model, overlap=0.5, mode="gaussian",
                                          sigma_scale=0.125)
        return torch.softmax(logits, dim=1)[0]

    methods: dict[str, Callable[[Tensor], Tensor]] = {
        "ours": ours,
        "monai_bs1": lambda image: monai(image, 1),
        f"monai_bs{args.batch_size}": lambda image: monai(image, args.batch_size),
    }
    if device.type == "cuda":
        methods["ours_bf16"] = lambda image: ours(image, amp=True)

    def forward_only(image: Tensor) -> Tensor:
        """The floor: the network alone on as many window batches as we run, without any blending."""
        n_windows = 1
        for size, window in zip(image.shape[1:], patch):
            n_windows *= len(window_starts(max(size, window), window, 0.5))
        batch = torch.zeros((args.batch_size, image.shape[0], *patch), device=device)
        for first in range(0, n_windows, args.batch_size):
            logits = model(batch[:min(args.batch_size, n_windows - first)])
        return logits

    methods["forward_only"] = forward_only

    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"threads {torch.get_num_threads()}, torch {torch.__version__}, model {model_name}, window {patch}, "
          f"overlap 0.5, gaussian sigma 0.125 * window, our batch {args.batch_size}, repeats {repeats}")

    with torch.inference_mode():
        # Warm-up: allocator, oneDNN/cuDNN kernel choice for the window batch shapes.
        for fn in methods.values():
            fn(volumes[0][1])

        header = (f"{'volume':>16} {'windows':>7} {'grid':>5} | " + " ".join(f"{m:>10}" for m in methods)
                  + f" | {'ratio':>6} {f'ratio_bs{args.batch_size}':>9} | {'max|dp|':>9}")
        print(header)
        print("-" * len(header))
        rows = []
        for name, image in volumes:
            size = tuple(image.shape[1:])
            ours_grid = [window_starts(max(s, p), p, 0.5) for s, p in zip(size, patch)]
            same_grid = ours_grid == [monai_grid(s, p, 0.5) for s, p in zip(size, patch)]
            n_windows = len(ours_grid[0]) * len(ours_grid[1]) * len(ours_grid[2])
            seconds: dict[str, list[float]] = {m: [] for m in methods}
            outputs: dict[str, Tensor] = {}
            for _ in range(repeats):  # interleaved, so drifting machine load hits every method alike
                for method, fn in methods.items():
                    elapsed, outputs[method] = timed(lambda: fn(image), device)
                    seconds[method].append(elapsed)
            best = {m: min(v) for m, v in seconds.items()}  # best of N: machine load only adds time
            diff = (outputs["ours"] - outputs["monai_bs1"]).abs().max().item()
            diff_same_batch = (outputs["ours"] - outputs[f"monai_bs{args.batch_size}"]).abs().max().item()
            diff_bs = (outputs[f"monai_bs{args.batch_size}"] - outputs["monai_bs1"]).abs().max().item()
            row = {"volume": name, "size": size, "windows": n_windows, "same_grid": same_grid,
                   "seconds": best, "max_abs_diff": diff, "max_abs_diff_same_batch": diff_same_batch,
                   "monai_batch_diff": diff_bs}
            if "ours_bf16" in outputs:
                row["bf16_max_abs_diff"] = (outputs["ours_bf16"] - outputs["monai_bs1"]).abs().max().item()
            rows.append(row)
            print(f"{name:>16} {n_windows:>7} {'same' if same_grid else 'diff':>5} | "
                  + " ".join(f"{best[m]:>10.3f}" for m in methods)
                  + f" | {best['monai_bs1'] / best['ours']:>6.2f}"
                  + f" {best[f'monai_bs{args.batch_size}'] / best['ours']:>9.2f} | {diff:>9.2e}", flush=True)

    def mean_seconds(method: str) -> float:
        return statistics.fmean(r["seconds"][method] for r in rows)

    ours_s, base_s, base_bs_s = mean_seconds("ours"), mean_seconds("monai_bs1"), \
        mean_seconds(f"monai_bs{args.batch_size}")
    aligned = [r["max_abs_diff"] for r in rows if r["same_grid"]]
    aligned_same_batch = [r["max_abs_diff_same_batch"] for r in rows if r["same_grid"]]
    misaligned = [r["max_abs_diff"] for r in rows if not r["same_grid"]]
    forward_s = mean_seconds("forward_only")
    print()
    print(f"mean seconds per volume: ours {ours_s:.3f}, MONAI sw_batch_size=1 {base_s:.3f} "
          f"(ratio {base_s / ours_s:.2f}), MONAI sw_batch_size={args.batch_size} {base_bs_s:.3f} "
          f"(ratio {base_bs_s / ours_s:.2f})")
    print(f"max |ours - MONAI| of probabilities where the window grids coincide: "
          f"{max(aligned) if aligned else float('nan'):.2e}"
          + (f"; where they differ (evenly spread vs MONAI's fixed step): {max(misaligned):.2e}" if misaligned else ""))
    if aligned_same_batch:
        print(f"  ...against MONAI with the same batch size (identical network batches): "
              f"{max(aligned_same_batch):.2e}; MONAI against itself, batch {args.batch_size} vs 1: "
              f"{max(r['monai_batch_diff'] for r in rows if r['same_grid']):.2e} (convolution rounding)")
    print(f"the network alone on the same window batches: {forward_s:.3f} s/volume, "
          f"{100 * forward_s / ours_s:.0f}% of ours: blending costs {ours_s - forward_s:+.3f} s/volume")
    if device.type == "cuda":
        print(f"ours with bf16 autocast (CUDA default): {mean_seconds('ours_bf16'):.3f} s/volume, "
              f"max |diff| {max(r['bf16_max_abs_diff'] for r in rows):.2e}")
    print(json.dumps({
        "benchmark": "sliding_window_inference",
        "ours": round(ours_s, 4),
        "baseline": round(base_s, 4),
        "unit": "s/volume",
        "ratio": round(base_s / ours_s, 3),
        "max_abs_diff": max(aligned) if aligned else None,
        "max_abs_diff_same_batch": max(aligned_same_batch) if aligned_same_batch else None,
        "baseline_same_batch": round(base_bs_s, 4),
        "ratio_same_batch": round(base_bs_s / ours_s, 3),
        "device": str(device),
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
