"""`python -m unet3d` runs the command line (which lives in flows.cli, the Prefect wiring layer)."""
from flows.cli import main

raise SystemExit(main())
