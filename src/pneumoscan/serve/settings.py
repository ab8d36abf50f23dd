"""The service's default limits, importable without FastAPI or torch (the CLI's --help uses them)."""

MiB = 2**20
DEFAULT_MAX_UPLOAD_BYTES = 20 * MiB  # per file: a large uncompressed DICOM radiograph fits
DEFAULT_MAX_PIXELS = 50_000_000  # per image (7000 x 7000), read from the header before decoding
DEFAULT_MAX_BATCH_FILES = 32
API_KEY_ENV = "PNEUMOSCAN_API_KEY"
