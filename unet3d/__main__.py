"""`python -m unet3d` runs the `unet3d` command line through its installed console script (the command line
lives in the Prefect wiring layer, which this library never imports)."""
import sys
from importlib.metadata import entry_points


def main() -> int:
    scripts = entry_points(group="console_scripts", name="unet3d")
    if not scripts:
        print("python -m unet3d: the unet3d command line is not installed (run `pip install -e .` in the "
              "project folder)", file=sys.stderr)
        return 1
    return next(iter(scripts)).load()()


if __name__ == "__main__":
    raise SystemExit(main())
