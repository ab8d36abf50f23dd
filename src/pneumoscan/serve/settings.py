"""The service's default limits, importable without FastAPI or torch (the CLI's --help uses them)."""

from pneumoscan import MAX_PIXELS

MiB = 2**20
DEFAULT_MAX_UPLOAD_BYTES = 20 * MiB  # per file: a large uncompressed DICOM radiograph fits
DEFAULT_MAX_PIXELS = MAX_PIXELS  # per image, read from the header before decoding; as for files
DEFAULT_MAX_BATCH_FILES = 32
API_KEY_ENV = "PNEUMOSCAN_API_KEY"
