"""The service's default limits, importable without FastAPI or torch (the CLI's --help uses them)."""

from pneumoscan import MAX_PIXELS

MiB = 2**20
DEFAULT_MAX_UPLOAD_BYTES = 20 * MiB  # per file: a large uncompressed DICOM radiograph fits
DEFAULT_MAX_PIXELS = MAX_PIXELS  # per image, read from the header before decoding; as for files
DEFAULT_MAX_BATCH_FILES = 32
API_KEY_ENV = "PNEUMOSCAN_API_KEY"

# Scoring queue (serve.batcher): requests wait in one bounded FIFO queue and a worker thread scores
# up to MICRO_BATCH images per engine call, waiting at most MAX_WAIT_MS for a batch to fill.
# A full queue answers 503 "busy" with Retry-After; a request that waited SCORE_TIMEOUT_S gets 504.
# At 32 clients on two shared cores the FIFO cut p99 latency ~35% against taking turns on a lock;
# batching itself adds no throughput there (ONNX Runtime already runs batches as runs of 4), so
# MICRO_BATCH=1 ("off") costs nothing on such a machine; larger batches help on bigger ones.
DEFAULT_MICRO_BATCH = 8  # images per engine call; 1 turns batching off (the queue stays)
DEFAULT_MAX_WAIT_MS = 2.0  # how long the worker waits for more requests once it has one
DEFAULT_QUEUE_SIZE = 64  # requests waiting to be scored before new ones get 503
DEFAULT_SCORE_TIMEOUT_S = 30.0  # the longest a request waits for its score before a 504
RETRY_AFTER_S = 1  # the Retry-After header of a 503 "busy"

# Hostile or broken clients (serve.guard, serve.server): the request head must arrive within
# HEADER_TIMEOUT_S of connecting (or of the previous answer), the body within BODY_TIMEOUT_S of the
# head (else 408 and the connection is closed); an idle keep-alive connection is closed after
# KEEP_ALIVE_S. At most MAX_CONNECTIONS are open (a new one evicts the longest idle) and
# MAX_IN_FLIGHT requests are handled at once (503 + Retry-After beyond). On SIGTERM, requests
# in flight get GRACE_S to finish, then 503.
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_BODY_TIMEOUT_S = 60.0
DEFAULT_KEEP_ALIVE_S = 5.0
DEFAULT_MAX_CONNECTIONS = 1000
DEFAULT_MAX_IN_FLIGHT = 64
DEFAULT_GRACE_S = 10.0
