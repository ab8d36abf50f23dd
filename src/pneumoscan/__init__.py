"""pneumoscan: pneumonia detection in chest X-rays."""

__version__ = "0.1.0"

CLASS_NAMES = ("NORMAL", "PNEUMONIA")  # label 0, label 1 — always in this order
