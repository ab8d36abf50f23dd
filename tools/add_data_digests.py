"""Record in an existing model.pt which files it was trained on, so ``evaluate`` can warn on overlap.

    python tools/add_data_digests.py MODEL.pt SOURCE [SOURCE ...] [--out OUT.pt]

SOURCE is a run's manifest.csv (its train and val rows are taken: the files the weights, the
temperature and the threshold were fitted on) or an image folder (every image in it, recursively).
Models trained by this version record their digests themselves (``train.finalize``); this is for
older ones, such as the bundled model, whose training data was the whole shared training split:

    python tools/add_data_digests.py src/pneumoscan/assets/model.pt ../shared/data/chest_xray/train

The file's sha256 changes: renew whatever records it (assets/MODEL_CARD.md is rewritten here for the
bundled model; an ONNX export of it must be exported again).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from pneumoscan.modeling import artifact
from pneumoscan.io import data, imaging
from pneumoscan.core.files import content_digests, file_sha256, write_text

CARD = Path(artifact.BUNDLED_MODEL).parent / "MODEL_CARD.md"
SHA_LINE = re.compile(r"^\*\*File\.\*\* .*$", re.MULTILINE)


def source_files(sources: list[str]) -> list[str]:
    paths: list[str] = []
    for source in sources:
        if source.endswith(".csv"):
            paths += [s.path for s in data.read_manifest(source) if s.split in ("train", "val")]
        else:
            paths += [str(p) for p in imaging.collect_files([source])]
    return paths


def file_line(model: Path, n_digests: int) -> str:
    """The model card's line about the file; tools/bundle_model.py writes the same one."""
    return (f"**File.** `model.pt`, sha256 `{file_sha256(model)}`; it records the content digests of its "
            f"training and validation files ({n_digests} distinct), so `pneumoscan evaluate` warns when "
            "given any of them.")


def note_in_card(card: Path, model: Path, n_digests: int) -> None:
    """Keep the bundled model card's record of the file (sha256, digests) true."""
    line = file_line(model, n_digests)
    text = card.read_text()
    text = SHA_LINE.sub(line, text) if SHA_LINE.search(text) else text.replace(
        "\n**Training data.**", f"\n{line}\n\n**Training data.**", 1)
    write_text(card, text)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("sources", nargs="+", help="manifest.csv or image folders")
    p.add_argument("--out", help="write a copy here instead of changing MODEL")
    args = p.parse_args(argv)
    files = source_files(args.sources)
    if not files:
        print("add_data_digests: no files found", file=sys.stderr)
        return 2
    digests = content_digests(files)
    out = artifact.add_data_digests(args.model, digests, args.out)
    artifact.read(out)  # still a weights_only-loadable pneumoscan model
    if out.resolve() == Path(artifact.BUNDLED_MODEL).resolve() and CARD.is_file():
        note_in_card(CARD, out, len(digests))
    print(f"{out}: {len(digests)} digests of {len(files)} files; sha256 {file_sha256(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
