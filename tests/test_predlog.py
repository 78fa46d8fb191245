"""The prediction log's background writer: order, flush, nothing lost on close, failed writes retried."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest

from lensmith.serve import predlog
from lensmith.serve.predlog import PredictionLog, PredictionLogClosed, read_log

pytestmark = pytest.mark.timeout(120)


def records(prefix: str, n: int) -> list[dict]:
    return [{"id": f"{prefix}-{i}", "confidence": i / n} for i in range(n)]


def test_records_from_many_threads_are_all_written_in_each_threads_order(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path, rotate_bytes=4096)

    def writer(t: int) -> None:
        for i in range(200):
            log.append([{"id": f"{t}-{i}"}])

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    ids = [r["id"] for r in read_log(tmp_path)]
    assert len(ids) == 800 and len(set(ids)) == 800
    for t in range(4):
        assert [i for i in ids if i.startswith(f"{t}-")] == [f"{t}-{i}" for i in range(200)]
    assert len(list(tmp_path.glob("predictions-*.jsonl"))) > 1  # rotated while writing in the background


def test_close_writes_everything_still_pending(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    slow_write = PredictionLog._write

    def slow(self: PredictionLog, batch: list[dict]) -> None:
        time.sleep(0.05)
        slow_write(self, batch)

    monkeypatch.setattr(PredictionLog, "_write", slow)
    log = PredictionLog(tmp_path, rotate_bytes=1 << 20)
    for i in range(20):
        log.append(records(f"r{i}", 5))
    assert log.backlog > 0  # the writer is behind: close must still write all of it
    log.close()
    assert [r["id"] for r in read_log(tmp_path)] == [r["id"] for i in range(20) for r in records(f"r{i}", 5)]
    assert log.backlog == 0 and log.lost == 0
    with pytest.raises(PredictionLogClosed):
        log.append(records("late", 1))


def test_append_returns_before_the_write_and_flush_waits_for_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    real_write = PredictionLog._write

    def gated(self: PredictionLog, batch: list[dict]) -> None:
        gate.wait(10)
        real_write(self, batch)

    monkeypatch.setattr(PredictionLog, "_write", gated)
    log = PredictionLog(tmp_path, rotate_bytes=1 << 20)
    log.append(records("a", 3))  # would block here if the write happened inside append
    assert read_log(tmp_path) == [] and log.backlog == 3
    assert log.flush(timeout=0.1) is False
    gate.set()
    assert log.flush(timeout=10) is True
    assert [r["id"] for r in read_log(tmp_path)] == ["a-0", "a-1", "a-2"]
    log.close()


def test_a_failed_write_is_retried_without_losing_or_reordering(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(predlog, "RETRY_S", (0.01,))
    failures = {"left": 3}
    real_write = PredictionLog._write

    def flaky(self: PredictionLog, batch: list[dict]) -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise OSError(28, "No space left on device")
        real_write(self, batch)

    monkeypatch.setattr(PredictionLog, "_write", flaky)
    log = PredictionLog(tmp_path, rotate_bytes=1 << 20)
    with caplog.at_level(logging.ERROR, logger="lensmith.serve"):
        log.append(records("a", 2))
        log.append(records("b", 2))
        assert log.flush(timeout=10)
    log.close()
    assert [r["id"] for r in read_log(tmp_path)] == ["a-0", "a-1", "b-0", "b-1"]
    assert log.lost == 0 and "No space left" in caplog.text


def test_close_gives_up_on_a_dead_disk_and_says_how_many_were_lost(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(predlog, "RETRY_S", (0.01,))

    def broken(self: PredictionLog, batch: list[dict]) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(PredictionLog, "_write", broken)
    log = PredictionLog(tmp_path, rotate_bytes=1 << 20)
    with caplog.at_level(logging.ERROR, logger="lensmith.serve"):
        log.append(records("a", 4))
        time.sleep(0.1)
        log.close()  # returns: a shutdown never hangs on a dead disk
    assert log.lost == 4
    assert "could not write 4 record(s)" in caplog.text and "a-0" in caplog.text


def test_synchronous_mode_writes_inside_append(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path, rotate_bytes=1 << 20, background=False)
    log.append(records("s", 2))
    assert [r["id"] for r in read_log(tmp_path)] == ["s-0", "s-1"]
    log.close()


def test_records_reach_the_file_within_the_interval_without_a_flush(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path, rotate_bytes=1 << 20, interval_s=0.05)
    log.append(records("t", 2))
    deadline = time.monotonic() + 5
    while len(read_log(tmp_path)) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [r["id"] for r in read_log(tmp_path)] == ["t-0", "t-1"]  # a crash now would lose nothing
    log.append(records("u", 1))  # after a quiet spell the writer wakes again
    assert log.flush(timeout=5) and len(read_log(tmp_path)) == 3
    log.close()


def test_an_exit_without_close_still_writes_the_pending_records(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys; from lensmith.serve.predlog import PredictionLog; "
        "log = PredictionLog(sys.argv[1], 1 << 20, interval_s=10.0); "
        "log.append([{'id': str(i)} for i in range(50)])"  # exits at once: no close(), writer still waiting
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=60)
    assert [r["id"] for r in read_log(tmp_path)] == [str(i) for i in range(50)]
