"""Console helpers: progress without a terminal, a run's log file, Lightning's lines once."""

import logging

from pneumoscan.cli import console


def progress_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "pneumoscan.progress"]


def test_progress_is_logged_every_tenth_without_a_terminal(caplog):
    caplog.set_level(logging.INFO)
    bars = console.StageBars(tty=False)
    for done in range(1, 201):
        bars("decoding images", done, 200)
    bars.close()
    lines = progress_lines(caplog)
    assert len(lines) == 10
    assert lines[0] == "decoding images: 10% (20/200)" and lines[-1] == "decoding images: 100% (200/200)"


def test_progress_of_unknown_length_and_of_several_stages(caplog):
    caplog.set_level(logging.INFO)
    bars = console.StageBars(tty=False, unknown_every=100)
    for done in range(1, 251):
        bars("decoding images", done, 0)
    for done in (1, 2, 3):
        bars("embedding train (8 views)", done, 3)
    assert progress_lines(caplog) == ["decoding images: 100", "decoding images: 200",
                                      "embedding train (8 views): 33% (1/3)", "embedding train (8 views): 67% (2/3)",
                                      "embedding train (8 views): 100% (3/3)"]


def test_on_a_terminal_bars_instead_of_lines(caplog):
    caplog.set_level(logging.INFO)
    bars = console.StageBars(tty=True)
    bars("decoding images", 5, 10)
    assert not progress_lines(caplog) and bars.bars["decoding images"].n == 5
    bars.close()


def test_plural():
    assert console.plural(1, "unreadable file") == "1 unreadable file"
    assert console.plural(3, "unreadable file") == "3 unreadable files"
    assert console.plural(0, "prediction") == "0 predictions"


def test_run_log_keeps_lines_from_before_the_folder_existed(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    run_log = console.start_run_log()
    log = logging.getLogger("pneumoscan.test")
    try:
        log.info("decoded before the run folder")
        (tmp_path / "run").mkdir()
        run_log.attach(tmp_path / "run" / "train.log")
        log.info("trained in it")
    finally:
        run_log.close()
    log.info("after close")
    text = (tmp_path / "run" / "train.log").read_text()
    assert "decoded before the run folder" in text and "trained in it" in text and "after close" not in text
    assert run_log not in logging.getLogger().handlers


def test_log_to_file_appends(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    for word in ("first", "second"):
        handler = console.log_to_file(tmp_path / "x.log")
        logging.getLogger("pneumoscan.test").info(word)
        handler.close()
    assert [line.split(": ", 1)[1] for line in (tmp_path / "x.log").read_text().splitlines()] == ["first", "second"]


def test_lightning_lines_go_through_our_handlers_once():
    import lightning  # noqa: F401  (adds its own stderr handler on import)

    console.route_lightning_logs()
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        assert logger.propagate and not [h for h in logger.handlers if isinstance(h, logging.StreamHandler)]


def test_training_callbacks_without_a_terminal_log_epochs():
    from lightning.pytorch.callbacks import TQDMProgressBar

    callbacks = console.training_callbacks(console.RunLog(), tty=False)
    assert [type(c).__name__ for c in callbacks] == ["EpochLog", "AttachRunLog"]
    assert isinstance(console.training_callbacks(tty=True)[0], TQDMProgressBar)
