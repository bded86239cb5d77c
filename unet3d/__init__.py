"""3D U-Net library: networks, losses, augmentation, training, inference, metrics, image I/O and resampling.

Pure Python/PyTorch. Spatial axis order everywhere is (x, y, z), the order of SimpleITK's GetSize() and
GetSpacing(); numpy volumes are (X, Y, Z) and torch batches (B, C, X, Y, Z).
"""

__version__ = "0.1.0"
