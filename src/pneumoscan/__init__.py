"""pneumoscan: pneumonia detection in chest X-rays."""

__version__ = "0.1.0"

CLASS_NAMES = ("NORMAL", "PNEUMONIA")  # label 0, label 1 — always in this order
MAX_PIXELS = 50_000_000  # per image (7000 x 7000): files, uploads and DICOMs alike, checked before decoding
