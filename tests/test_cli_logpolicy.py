"""Every CLI command keeps decoder warnings (which quote DICOM attribute values) out of its output
and its log file: codes and counts only (``core.logpolicy``, applied around dispatch in ``cli.app``)."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from pneumoscan.core import logpolicy
from servers import cli_env
from test_serve_logs import PLANT, planted_dicom

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "chest_xray_sample" / "test"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pneumoscan.cli", "-v", *args], capture_output=True, text=True,
                          env=cli_env(), timeout=600)


def planted_files(folder: Path) -> None:
    """A DICOM whose NumberOfFrames (IS) holds the plant, which pydicom both warns and logs about
    (quoting it), and a corrupt RLE one, whose decoder logs an exception; both with the plant in
    every text attribute."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "frames.dcm").write_bytes(planted_dicom(NumberOfFrames=PLANT))
    (folder / "rle.dcm").write_bytes(planted_dicom(rle=True))


@pytest.mark.slow  # a CLI process loading the bundled model
def test_predict_prints_codes_not_planted_values(tmp_path):
    planted_files(tmp_path / "in")
    shutil.copy(next(SAMPLE.glob("NORMAL/*.jpeg")), tmp_path / "in" / "film.jpeg")
    done = run_cli("predict", str(tmp_path / "in"))
    out = done.stdout + done.stderr
    assert done.returncode == 2 and "film.jpeg" in done.stdout  # the good film is scored, the others skipped
    assert "decoder warning pydicom" in done.stderr  # pydicom did warn: as a code and a count
    assert "LEAKTEST" not in out, [line for line in out.splitlines() if "LEAKTEST" in line]
    assert "Traceback" not in out


@pytest.mark.slow  # a CLI process evaluating the bundled model
def test_evaluate_log_file_carries_no_planted_value(tmp_path):
    data = tmp_path / "data"
    for label in ("NORMAL", "PNEUMONIA"):
        (data / label).mkdir(parents=True)
        for film in sorted((SAMPLE / label).glob("*.jpeg"))[:4]:
            shutil.copy(film, data / label / film.name)
    planted_files(data / "NORMAL")
    done = run_cli("evaluate", "--data", str(data), "--out", str(tmp_path / "eval"), "--bootstrap", "50",
                   "--errors", "0")
    log = (tmp_path / "eval" / "evaluate.log").read_text()
    assert done.returncode == 0, done.stderr
    assert "decoder warning" in log
    for text in (done.stdout, done.stderr, log):
        assert "LEAKTEST" not in text and "Traceback" not in text


def test_capture_covers_handlers_added_later_and_nests(tmp_path):
    """A run log attached after the capture began sees no decoder record; an inner (server's)
    capture neither double-counts nor ends the outer one; leaving restores Python's warnings."""
    root = logging.getLogger()
    before = logpolicy.counts().get("pydicom.test:0:warning", 0)
    previous = warnings.showwarning
    with logpolicy.capture_decoder_warnings(every=False):
        late = logging.FileHandler(tmp_path / "run.log")
        root.addHandler(late)
        try:
            with logpolicy.capture_decoder_warnings():
                logging.getLogger("pydicom.test").handle(logging.LogRecord(
                    "pydicom.test", logging.WARNING, __file__, 0, f"Invalid value {PLANT}", None, None))
            warnings.warn(f"a value {PLANT}", UserWarning)  # the outer capture still holds
            logging.getLogger("pydicom").warning("Invalid value %s", PLANT)
        finally:
            root.removeHandler(late)
            late.close()
    assert PLANT not in (tmp_path / "run.log").read_text()
    assert "decoder warning" in (tmp_path / "run.log").read_text()
    assert logpolicy.counts()["pydicom.test:0:warning"] == before + 1
    assert warnings.showwarning is previous and logging.getLogger("pydicom").propagate
