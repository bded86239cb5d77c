"""Augmentation speed: our batched `BatchAugmenter` against MONAI's per-sample dictionary transforms.

Both sides apply the same spatial and intensity work to every sample of a (B, 1, X, Y, Z) batch with a label:
a rotation of up to 30 degrees about each axis and a scaling in [0.7, 1.4] (one resampling; bilinear image,
nearest label), a flip of each axis with probability 0.5, and Gaussian noise. Ours runs on the whole batch at
once on the batch's device; the baseline is MONAI's `RandAffined` + `RandFlipd` + `RandGaussianNoised`, applied
one sample at a time as a CPU data-loader worker would. Our default config (every transform nnU-Net uses, at its
probabilities) is timed as well, for reference.

Times are the median of `--repeats` calls after one warm-up call, in milliseconds per batch. The last line printed
is one JSON object: {"benchmark", "ours", "baseline", "unit", "ratio" (baseline / ours: > 1 means ours is faster),
...}.

    python benchmarks/augment_speed.py                       # 2x1x40x56x40 on the CPU, 2 threads
    python benchmarks/augment_speed.py --device cuda --batch 4 --shape 128 128 128

Needs MONAI (the `bench` extra); it is imported only here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

# Allow `python benchmarks/augment_speed.py` from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unet3d.augment import AugmentConfig, BatchAugmenter  # noqa: E402

MAX_ROTATION_DEG = 30.0
SCALE_RANGE = (0.7, 1.4)
NOISE_STD = 0.1


def make_batch(batch: int, shape: tuple[int, int, int], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth random image and a label with a foreground block and an ignore (255) core."""
    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.interpolate(torch.randn(batch, 1, 6, 6, 6, generator=g), size=shape,
                                            mode="trilinear", align_corners=True)
    label = torch.zeros(batch, 1, *shape, dtype=torch.uint8)
    x, y, z = shape
    label[:, :, x // 4:3 * x // 4, y // 4:3 * y // 4, z // 4:3 * z // 4] = 1
    label[:, :, 3 * x // 8:5 * x // 8, 3 * y // 8:5 * y // 8, 3 * z // 8:5 * z // 8] = 255
    return image.to(device), label.to(device)


def matched_config() -> AugmentConfig:
    """Our config doing the baseline's work: rotation, scaling, flips and noise on every sample, nothing else."""
    off = {name: 0.0 for name in ("p_elastic", "p_blur", "p_brightness", "p_contrast", "p_lowres", "p_gamma")}
    return AugmentConfig(p_rotate=1.0, max_rotation_deg=MAX_ROTATION_DEG, p_scale=1.0, scale_range=SCALE_RANGE,
                         p_flip=0.5, p_noise=1.0, noise_std_range=(NOISE_STD, NOISE_STD), **off)


def monai_pipeline():
    from monai.transforms import Compose, RandAffined, RandFlipd, RandGaussianNoised

    rotate = MAX_ROTATION_DEG * torch.pi / 180.0
    pipeline = Compose([
        # MONAI's scale_range is the offset from 1: (0.7, 1.4) is (-0.3, 0.4)
        RandAffined(keys=("image", "label"), prob=1.0, rotate_range=(rotate,) * 3,
                    scale_range=((SCALE_RANGE[0] - 1, SCALE_RANGE[1] - 1),) * 3, mode=("bilinear", "nearest"),
                    padding_mode="zeros"),
        RandFlipd(keys=("image", "label"), prob=0.5, spatial_axis=0),
        RandFlipd(keys=("image", "label"), prob=0.5, spatial_axis=1),
        RandFlipd(keys=("image", "label"), prob=0.5, spatial_axis=2),
        RandGaussianNoised(keys=("image",), prob=1.0, std=NOISE_STD),
    ])
    pipeline.set_random_state(seed=0)
    return pipeline


def median_ms(step, repeats: int, device: str) -> float:
    step()  # warm-up: kernels compiled, buffers allocated
    seconds = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--shape", type=int, nargs=3, default=(40, 56, 40), metavar=("X", "Y", "Z"))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    torch.set_num_threads(args.threads)
    shape = tuple(args.shape)
    image, label = make_batch(args.batch, shape, args.device)
    generator = torch.Generator(device=args.device).manual_seed(0)

    ours_matched = BatchAugmenter(matched_config())
    ours_defaults = BatchAugmenter(AugmentConfig())
    ours_ms = median_ms(lambda: ours_matched(image, label, generator), args.repeats, args.device)
    defaults_ms = median_ms(lambda: ours_defaults(image, label, generator), args.repeats, args.device)

    pipeline = monai_pipeline()
    cpu_image, cpu_label = image.cpu(), label.cpu()

    def baseline_step():
        return [pipeline({"image": cpu_image[i], "label": cpu_label[i]}) for i in range(args.batch)]

    baseline_ms = median_ms(baseline_step, args.repeats, "cpu")

    where = f"{args.batch}x1x{'x'.join(map(str, shape))} on {args.device} ({args.threads} threads)"
    print(f"ours, rotation+scale+flips+noise, whole batch: {ours_ms:8.1f} ms per batch  ({where})")
    print(f"ours, default config (every transform):       {defaults_ms:8.1f} ms per batch")
    print(f"MONAI RandAffined+RandFlipd+RandGaussianNoised per sample on cpu: {baseline_ms:8.1f} ms per batch")
    print(json.dumps({"benchmark": "augment_speed", "ours": round(ours_ms, 2),
                      "baseline": round(baseline_ms, 2), "baseline_name": "MONAI RandAffined+RandFlipd+"
                      "RandGaussianNoised, per sample on the CPU", "unit": "ms per batch",
                      "ratio": round(baseline_ms / ours_ms, 3), "ours_default_config": round(defaults_ms, 2),
                      "batch": args.batch, "shape": list(shape), "device": args.device, "threads": args.threads}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
