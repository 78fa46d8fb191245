"""Disk and backlog limits (#16): prediction log and review queue retention by age and size (oldest first),
the log writer's capped backlog, full-disk writes dropped and counted, and the /metrics collector."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from lensmith.params import ServeParams
from lensmith.serve import predlog
from lensmith.serve.predlog import PredictionLog, read_log
from lensmith.serve.review import IMAGES_DIR, QUEUE_FILE, ReviewQueue, read_queue
from lensmith.serve.storage import DAY_S, Retention, StorageCollector, log_retention, review_retention
from lensmith.fsutil import write_json_atomic

pytestmark = pytest.mark.timeout(120)
DISK_FULL = OSError(errno.ENOSPC, "No space left on device")


def records(prefix: str, n: int) -> list[dict]:
    return [{"id": f"{prefix}-{i}"} for i in range(n)]


def old_log_file(directory: Path, name: str, size: int, age_days: float) -> Path:
    path = directory / f"predictions-{name}.jsonl"
    bare = json.dumps({"id": name, "pad": ""})
    path.write_text(json.dumps({"id": name, "pad": "x" * max(size - len(bare) - 1, 0)}) + "\n")
    stamp = time.time() - age_days * DAY_S
    os.utime(path, (stamp, stamp))
    return path


# ---- prediction log retention -------------------------------------------------------------------------


def test_log_files_older_than_the_age_limit_are_deleted_and_counted(tmp_path: Path) -> None:
    old = [old_log_file(tmp_path, f"2020010{i}T000000000000Z-1-aaaa-0001", 200, 100 + i) for i in range(3)]
    recent = old_log_file(tmp_path, "20990101T000000000000Z-1-bbbb-0001", 200, 1)
    log = PredictionLog(tmp_path, rotate_bytes=1 << 20, retention=Retention(max_age_s=30 * DAY_S))
    log.append(records("a", 2))
    assert log.flush(timeout=10)
    log.close()
    assert not any(p.exists() for p in old) and recent.exists()
    stats = log.stats()
    assert stats.removed == {"age": 3, "size": 0} and stats.kept_items == 2  # the recent file and the new one
    assert [r["id"] for r in read_log(tmp_path) if r["id"].startswith("a-")] == ["a-0", "a-1"]


def test_log_files_beyond_the_size_limit_go_oldest_first_never_the_current_one(tmp_path: Path) -> None:
    files = [old_log_file(tmp_path, f"f{i}", 1000, 10 - i) for i in range(5)]  # f0 least recently written
    log = PredictionLog(tmp_path, rotate_bytes=1 << 20, background=False, retention=Retention(max_bytes=2500))
    log.append(records("a", 1))
    assert [p.exists() for p in files] == [False, False, False, True, True]  # 2 x 1000 + the new file fit
    assert log.stats().removed == {"age": 0, "size": 3}
    assert log.stats().kept_bytes <= 2500
    log.close()
    tiny = PredictionLog(tmp_path / "tiny", rotate_bytes=1024, background=False, retention=Retention(max_bytes=1))
    tiny.append(records("b", 3))
    assert len(list((tmp_path / "tiny").glob("predictions-*.jsonl"))) == 1  # the file being written stays
    assert len(read_log(tmp_path / "tiny")) == 3
    tiny.close()


def test_retention_reads_the_serve_params() -> None:
    params = ServeParams(log_max_bytes=5, log_max_age_days=2, review_max_bytes=7, review_max_age_days=0.5)
    assert log_retention(params) == Retention(5, 2 * DAY_S)
    assert review_retention(params) == Retention(7, 0.5 * DAY_S)
    assert ServeParams().log_max_backlog == 20_000


# ---- the log writer's backlog and a full disk ----------------------------------------------------------


def test_a_full_disk_caps_the_backlog_drops_and_counts_and_warns_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(predlog, "RETRY_S", (0.01,))
    disk_full = threading.Event()
    disk_full.set()
    real_write = PredictionLog._write

    def write(self: PredictionLog, batch: list[dict]) -> None:
        if disk_full.is_set():
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, batch)

    monkeypatch.setattr(PredictionLog, "_write", write)
    log = PredictionLog(tmp_path, rotate_bytes=1 << 20, max_backlog=50, interval_s=0.001)
    with caplog.at_level(logging.WARNING, logger="lensmith.serve"):
        for i in range(40):
            log.append(records(f"r{i}", 5))  # 200 records, never blocks, never raises
        deadline = time.monotonic() + 10
        while not log.stats().write_errors and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = log.stats()
        assert stats.backlog == 50 and stats.dropped["backlog_full"] == 150
        assert stats.write_errors.get("ENOSPC", 0) >= 1
        assert caplog.text.count("record(s) dropped") == 1  # rate-limited: one warning for 30 drops
        assert caplog.text.count("No space left") == 1
        disk_full.clear()
        assert log.flush(timeout=10)
    log.close()
    assert len(read_log(tmp_path)) == 50 and log.stats().backlog == 0 and log.lost == 0


def test_synchronous_mode_drops_a_failed_write_without_raising(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: PredictionLog, batch: list[dict]) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PredictionLog, "_write", broken)
    log = PredictionLog(tmp_path, rotate_bytes=1 << 20, background=False)
    log.append(records("s", 3))
    assert log.stats().dropped["write_error"] == 3 and log.stats().write_errors == {"ENOSPC": 1}
    log.close()


# ---- review queue retention ----------------------------------------------------------------------------


def add(queue: ReviewQueue, seed: int, *, size: int = 1000, reason: str = "low_confidence", label: str | None = None) -> str:
    data = bytes([seed % 256]) * size + str(seed).encode()
    item = queue.add(
        image=data, sha256=hashlib.sha256(data).hexdigest(), ext="jpg", reason=reason,
        prediction={"id": f"p{seed}", "label": "ok", "confidence": 0.3, "model_version": "v0001"}, feedback_label=label,
    )
    return item


def age_items(directory: Path, days: float, count: int) -> None:
    """Make the first `count` queue items `days` old."""
    lines = (directory / QUEUE_FILE).read_text().splitlines()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - days * DAY_S))
    items = [json.loads(line) for line in lines]
    for item in items[:count]:
        item["time"] = stamp
    (directory / QUEUE_FILE).write_text("".join(json.dumps(i) + "\n" for i in items))


def test_review_items_older_than_the_age_limit_go_with_their_images(tmp_path: Path) -> None:
    queue = ReviewQueue(tmp_path, Retention(max_age_s=30 * DAY_S))
    ids = [add(queue, i) for i in range(4)]
    age_items(tmp_path, 40, 2)
    assert queue.prune() == {"age": 2}
    assert [i["item_id"] for i in read_queue(tmp_path)] == ids[2:]
    assert len(list((tmp_path / IMAGES_DIR).iterdir())) == 2
    assert queue.stats().removed["age"] == 2 and queue.stats().kept_items == 2


def test_review_queue_beyond_the_size_limit_drops_the_oldest_on_add(tmp_path: Path) -> None:
    queue = ReviewQueue(tmp_path, Retention(max_bytes=5000))
    ids = [add(queue, i) for i in range(8)]  # ~1.3 KB each with its line
    kept = [i["item_id"] for i in read_queue(tmp_path)]
    assert kept == ids[-len(kept):] and 2 <= len(kept) < 8  # the newest, in order
    on_disk = sum(p.stat().st_size for p in (tmp_path / IMAGES_DIR).iterdir()) + (tmp_path / QUEUE_FILE).stat().st_size
    assert on_disk <= 5000 and queue.stats().kept_bytes == on_disk
    assert queue.stats().removed["size"] == 8 - len(kept)


def test_an_image_shared_by_a_kept_item_stays(tmp_path: Path) -> None:
    queue = ReviewQueue(tmp_path, Retention(max_age_s=30 * DAY_S))
    add(queue, 1)
    add(queue, 1, reason="feedback", label="wrong")  # the same image again, later
    age_items(tmp_path, 40, 1)
    assert queue.prune() == {"age": 1}
    assert len(read_queue(tmp_path)) == 1 and len(list((tmp_path / IMAGES_DIR).iterdir())) == 1


def test_labelled_feedback_is_kept_until_an_import_took_it_in(tmp_path: Path) -> None:
    queue = ReviewQueue(tmp_path, Retention(max_age_s=30 * DAY_S, max_bytes=2000))
    labelled = add(queue, 1, reason="feedback", label="crack")
    add(queue, 2, reason="feedback", label="wrong")
    add(queue, 3)
    age_items(tmp_path, 40, 3)
    queue.prune()
    assert [i["item_id"] for i in read_queue(tmp_path)] == [labelled]
    sha = read_queue(tmp_path)[0]["image_sha256"]
    write_json_atomic(tmp_path / "imports" / "import-1.json", {"imported": [{"image_sha256": sha}], "skipped": [], "conflicts": []})
    queue.prune()
    assert read_queue(tmp_path) == [] and list((tmp_path / IMAGES_DIR).iterdir()) == []


def test_a_line_cut_short_is_skipped_by_readers_and_removed_by_retention(tmp_path: Path) -> None:
    queue = ReviewQueue(tmp_path)
    add(queue, 1)
    with open(tmp_path / QUEUE_FILE, "a") as fh:
        fh.write('{"item_id": "half')
    assert len(read_queue(tmp_path)) == 1
    assert queue.prune() == {"invalid": 1}
    assert len((tmp_path / QUEUE_FILE).read_text().splitlines()) == 1


def test_a_full_disk_drops_low_confidence_items_counted_and_warned_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import lensmith.serve.review as review

    def full(path: Path, line: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(review, "append_line", full)
    queue = ReviewQueue(tmp_path)
    data = b"img"
    kwargs = dict(image=data, sha256=hashlib.sha256(data).hexdigest(), ext="jpg", reason="low_confidence", prediction={"id": "p"})
    with caplog.at_level(logging.WARNING, logger="lensmith.serve"):
        assert queue.offer(**kwargs) is None and queue.offer(**kwargs) is None  # type: ignore[arg-type]
    assert queue.stats().dropped == {"write_error": 2} and queue.stats().write_errors == {"ENOSPC": 2}
    assert caplog.text.count("could not store") == 1
    with pytest.raises(OSError):
        queue.add(**kwargs)  # type: ignore[arg-type]  # feedback: the caller is told


def test_a_failed_append_leaves_no_half_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    queue = ReviewQueue(tmp_path)
    add(queue, 1)
    size = (tmp_path / QUEUE_FILE).stat().st_size
    real_write = os.write

    def half_then_full(fd: int, data: bytes) -> int:
        real_write(fd, data[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    assert add_offer(queue, 2) is None
    monkeypatch.undo()
    assert (tmp_path / QUEUE_FILE).stat().st_size == size
    add(queue, 3)
    assert len(read_queue(tmp_path)) == 2


def add_offer(queue: ReviewQueue, seed: int) -> str | None:
    data = bytes([seed]) * 100
    return queue.offer(image=data, sha256=hashlib.sha256(data).hexdigest(), ext="jpg", reason="low_confidence", prediction={"id": "p"})


# ---- /metrics --------------------------------------------------------------------------------------------


def test_the_collector_exports_kept_removed_dropped_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = PredictionLog(tmp_path / "log", rotate_bytes=1 << 20, background=False)
    queue = ReviewQueue(tmp_path / "review", Retention(max_age_s=DAY_S))
    log.append(records("a", 2))
    add(queue, 1)
    add(queue, 2)
    age_items(tmp_path / "review", 2, 1)
    queue.prune()
    registry = CollectorRegistry()
    registry.register(StorageCollector(log, queue))
    text = generate_latest(registry).decode()
    assert "lensmith_prediction_log_files 1.0" in text and "lensmith_prediction_log_backlog_records 0.0" in text
    assert 'lensmith_prediction_log_dropped_records_total{reason="backlog_full"} 0.0' in text
    assert "lensmith_review_queue_items 1.0" in text
    assert 'lensmith_review_queue_removed_items_total{reason="age"} 1.0' in text
    assert 'lensmith_review_queue_dropped_items_total{reason="write_error"} 0.0' in text
    log.close()


def test_an_image_whose_item_could_not_be_queued_is_not_left_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lensmith.serve.review as review

    def full(path: Path, line: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(review, "append_line", full)
    assert add_offer(ReviewQueue(tmp_path), 1) is None
    assert list((tmp_path / IMAGES_DIR).iterdir()) == []


def test_a_failing_retention_pass_never_writes_records_twice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def unlistable(directory: Path, pattern: str) -> list:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(predlog, "stored_files", unlistable)
    log = PredictionLog(tmp_path, rotate_bytes=1 << 20, retention=Retention(max_bytes=10))
    log.append(records("a", 3))
    assert log.flush(timeout=10)
    log.close()
    assert [r["id"] for r in read_log(tmp_path)] == ["a-0", "a-1", "a-2"]
