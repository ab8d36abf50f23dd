"""Write the bundled model's ONNX export beside it: src/pneumoscan/assets/model.onnx.

    python tools/export_bundled_onnx.py

Run it whenever assets/model.pt changes (tools/bundle_model.py does). The file is the checked,
simplified export (``inference.onnx_export.export_onnx``) with ``source_sha256`` = model.pt's
sha256, so the default ``pneumoscan predict``/``serve`` (no --model) score with ONNX Runtime
straight away: no export on first use, no torch import. A stale file (model.pt retrained, this
not rerun) is never used: ``inference.loading`` checks the sha256 and exports as for any model.pt.
"""

from __future__ import annotations

import sys

from pneumoscan.modeling import artifact
from pneumoscan.inference.loading import BUNDLED_ONNX
from pneumoscan.inference.onnx_export import export_onnx


def main() -> int:
    out = export_onnx(artifact.BUNDLED_MODEL, BUNDLED_ONNX)
    print(f"{out} ({out.stat().st_size / 1e6:.1f} MB) from {artifact.BUNDLED_MODEL}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
