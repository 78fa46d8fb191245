"""The predict path's own pieces: multipart parsing (checked against Starlette's parser), the inference
layout (runners x threads), batches shared out among runners, shutdown of the batcher, and the
normalisation staying bit-identical to the one preprocessing definition."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartParser

from lensmith.params import ServeParams
from lensmith.preprocess import Preprocessing
from lensmith.serve.batching import BatcherStopped, MicroBatcher
from lensmith.serve.multipart import MalformedMultipart, Part, boundary_of, header_params, parse_form_data
from lensmith.serve.service import inference_layout

pytestmark = pytest.mark.timeout(300)


# ---- multipart ---------------------------------------------------------------------------------------------


def encoded(files: list, data: dict | None = None) -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://lensmith/v1/predict", files=files, data=data)
    return request.read(), request.headers["content-type"]


async def starlette_parts(body: bytes, content_type: str) -> list[tuple]:
    async def stream():  # noqa: ANN202
        yield body

    form = await MultiPartParser(Headers({"content-type": content_type}), stream()).parse()
    parts = []
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            parts.append((name, value.filename, value.content_type, await value.read()))
        else:
            parts.append((name, None, None, value))
    return parts


def comparable(part: Part) -> tuple:
    """As Starlette hands it over: plain fields as text (latin-1, its default charset), no content type."""
    if part.filename is None:
        return (part.name, None, None, part.data.decode("latin-1"))
    return (part.name, part.filename, part.content_type, part.data)


names = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters='"\\;='), min_size=1, max_size=12)
# no backslash: python-multipart keeps only what follows the last one (old IE sent whole Windows paths);
# the service uses a filename only to tell a file part from a plain field
filenames = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=0x2FF, exclude_characters="\r\n\x7f\\"), min_size=1, max_size=20)
contents = st.binary(max_size=300).map(lambda b: b + b"\r\n--" + b[:5])  # CRLF and dashes inside the data


@settings(max_examples=150, deadline=None)
@given(parts=st.lists(st.tuples(names, filenames, st.sampled_from(["image/jpeg", "image/png", "text/plain"]), contents), min_size=1, max_size=4),
       fields=st.dictionaries(names, st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=20), max_size=2))
def test_multipart_parsing_agrees_with_starlette(parts: list, fields: dict) -> None:
    body, content_type = encoded([(n, (f, c, t)) for n, f, t, c in parts], fields)
    boundary = boundary_of(content_type)
    assert boundary is not None
    ours = parse_form_data(body, boundary)
    theirs = asyncio.run(starlette_parts(body, content_type))
    key = lambda p: (p[1] is None, p[0], p[1] or "", str(p[3]))  # noqa: E731 - Starlette lists plain fields first
    assert sorted(map(comparable, ours), key=key) == sorted(theirs, key=key)
    assert [p.data for p in ours if p.filename is not None] == [c for _, _, _, c in parts]


def test_header_parameters_quoted_escaped_and_unquoted() -> None:
    assert header_params('form-data; name="files"; filename="a \\"b\\"; c.jpg"') == ("form-data", {"name": "files", "filename": 'a "b"; c.jpg'})
    assert header_params("multipart/form-data; boundary=abc; charset=utf-8") == ("multipart/form-data", {"boundary": "abc", "charset": "utf-8"})
    assert boundary_of('multipart/form-data; boundary="x y"') == b"x y"
    assert boundary_of("multipart/form-data") is None and boundary_of("application/json") is None


def test_a_preamble_an_epilogue_and_a_part_without_headers_are_handled() -> None:
    body = b"preamble\r\n--b\r\nContent-Disposition: form-data; name=file; filename=a.jpg\r\n\r\nJPEG\r\n--b\r\n\r\nx\r\n--b--\r\nepilogue"
    with pytest.raises(MalformedMultipart, match="Content-Disposition"):
        parse_form_data(body, b"b")
    body = b"preamble\r\n--b\r\nContent-Disposition: form-data; name=file; filename=a.jpg\r\n\r\nJPEG\r\n--b--\r\nepilogue"
    assert parse_form_data(body, b"b") == [Part("file", "a.jpg", None, b"JPEG")]


MALFORMED = {
    "no boundary in the body": b"just bytes",
    "part never closed": b'--b\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\ndata',
    "headers never end": b'--b\r\nContent-Disposition: form-data; name="file"',
    "header without colon": b"--b\r\nnot a header\r\n\r\ndata\r\n--b--",
    "not form-data": b'--b\r\nContent-Disposition: attachment; name="file"\r\n\r\ndata\r\n--b--',
    "no name": b'--b\r\nContent-Disposition: form-data; filename="a"\r\n\r\ndata\r\n--b--',
    "junk after a boundary": b'--bXYZ\r\nContent-Disposition: form-data; name="file"\r\n\r\ndata\r\n--b--',
}


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_malformed_bodies_raise(case: str) -> None:
    with pytest.raises(MalformedMultipart):
        parse_form_data(MALFORMED[case], b"b")


# ---- inference layout and batching -------------------------------------------------------------------------


def test_inference_layout_single_threaded_runs_one_more_than_cores_on_cpu() -> None:
    cpu = ServeParams()
    assert inference_layout(cpu, cores=2) == (3, 1)
    assert inference_layout(cpu.model_copy(update={"runners": 2}), cores=2) == (2, 1)
    assert inference_layout(cpu.model_copy(update={"threads": 2}), cores=4) == (2, 2)
    assert inference_layout(cpu.model_copy(update={"threads": 8}), cores=4) == (1, 8)
    cuda = cpu.model_copy(update={"providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]})
    assert inference_layout(cuda, cores=16) == (1, 0)


def test_queued_requests_are_shared_out_among_free_runners_and_run_side_by_side() -> None:
    running, peak, lock = 0, 0, threading.Lock()

    def run(model: object, batch: np.ndarray) -> list[int]:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.1)
        with lock:
            running -= 1
        return batch[:, 0].tolist()

    async def main() -> tuple[list, list[int]]:
        batcher = MicroBatcher(run, max_batch=16, max_wait_s=0.05, runners=2)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit("m", np.array([[i]])) for i in range(16)))
        await batcher.stop()
        return results, batcher.batch_sizes

    results, sizes = asyncio.run(main())
    assert results == [[i] for i in range(16)]  # every request gets its own row back
    assert sorted(sizes) == [8, 8] and peak == 2  # two batches of 8 at once, not one of 16 on one core


def test_with_several_runners_a_batch_takes_its_fair_share_of_the_work() -> None:
    batcher = MicroBatcher(lambda m, b: list(b), max_batch=32, max_wait_s=0.005, runners=2)
    assert batcher.batch_limit(queued=16, running_images=0, running_batches=0) == 8  # both free: split now
    assert batcher.batch_limit(queued=8, running_images=8, running_batches=1) == 8
    assert batcher.batch_limit(queued=15, running_images=1, running_batches=1) == 8  # leave 7 for the other runner
    assert batcher.batch_limit(queued=100, running_images=0, running_batches=1) == 32  # never above max_batch
    assert batcher.batch_limit(queued=1, running_images=0, running_batches=1) == 1
    three = MicroBatcher(lambda m, b: list(b), max_batch=32, max_wait_s=0.005, runners=3)
    assert three.batch_limit(queued=12, running_images=0, running_batches=0) == 4
    assert three.batch_limit(queued=6, running_images=6, running_batches=2) == 4
    gpu = MicroBatcher(lambda m, b: list(b), max_batch=32, max_wait_s=0.005, runners=1)
    assert gpu.batch_limit(queued=1, running_images=0, running_batches=0) == 32  # one runner: fill the batch


def test_a_free_runner_does_not_take_the_whole_queue_while_the_other_runs_a_few() -> None:
    started = threading.Event()
    release = threading.Event()

    def run(model: object, batch: np.ndarray) -> list[int]:
        if batch[0, 0] == -1:  # the first, small batch: hold its runner
            started.set()
            release.wait(5)
        return batch[:, 0].tolist()

    async def main() -> list[int]:
        batcher = MicroBatcher(run, max_batch=32, max_wait_s=0.0, runners=2)
        batcher.start()
        first = asyncio.create_task(batcher.submit("m", np.array([[-1], [-1]])))
        await asyncio.to_thread(started.wait, 5)
        rest = [asyncio.create_task(batcher.submit("m", np.array([[i]]))) for i in range(14)]
        await asyncio.sleep(0.2)
        release.set()
        await asyncio.gather(first, *rest)
        await batcher.stop()
        return batcher.batch_sizes

    sizes = asyncio.run(main())
    # 16 images, 2 runners: the free one takes 8 (2 running + 14 queued, halved), not all 14; the held
    # batch of 2 finishes last
    assert sizes[0] == 8 and sizes[-1] == 2 and sum(sizes) == 16


def test_one_runner_waits_to_fill_the_batch() -> None:
    async def main() -> list[int]:
        batcher = MicroBatcher(lambda m, b: list(b), max_batch=4, max_wait_s=0.5, runners=1)
        batcher.start()
        first = asyncio.create_task(batcher.submit("m", np.zeros((1, 1))))
        await asyncio.sleep(0.05)
        rest = [batcher.submit("m", np.zeros((1, 1))) for _ in range(3)]
        await asyncio.gather(first, *rest)
        await batcher.stop()
        return batcher.batch_sizes

    assert asyncio.run(main()) == [4]


def test_stop_finishes_running_batches_and_fails_queued_requests() -> None:
    release = threading.Event()

    def run(model: object, batch: np.ndarray) -> list[str]:
        release.wait(5)
        return ["done"] * len(batch)

    async def main() -> list:
        batcher = MicroBatcher(run, max_batch=1, max_wait_s=0.0, runners=1)
        batcher.start()
        tasks = [asyncio.create_task(batcher.submit("m", np.zeros((1, 1)))) for _ in range(3)]
        await asyncio.sleep(0.1)  # the first is running, the others queued
        threading.Timer(0.2, release.set).start()
        await batcher.stop()
        return await asyncio.gather(*tasks, return_exceptions=True)

    first, *queued = asyncio.run(main())
    assert first == ["done"]
    assert all(isinstance(q, BatcherStopped) for q in queued)


def test_normalize_is_bit_identical_to_the_reference_formula() -> None:
    p = Preprocessing(image_size=32, resize=32)
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    mean = np.asarray(p.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(p.std, dtype=np.float32).reshape(1, -1, 1, 1)
    reference = ((nhwc.transpose(0, 3, 1, 2).astype(np.float32) / 255.0) - mean) / std
    got = p.normalize(nhwc.transpose(0, 3, 1, 2))
    assert got.dtype == np.float32 and got.flags.c_contiguous
    assert np.array_equal(got, reference)


def test_a_container_cpu_quota_caps_the_runners(tmp_path) -> None:  # noqa: ANN001
    from lensmith.procutil import cgroup_cpu_limit

    v2 = tmp_path / "cpu.max"
    v2.write_text("150000 100000\n")
    assert cgroup_cpu_limit(((v2, None),)) == 1.5
    v2.write_text("max 100000\n")
    assert cgroup_cpu_limit(((v2, None),)) is None
    quota, period = tmp_path / "quota", tmp_path / "period"
    quota.write_text("-1\n")
    period.write_text("100000\n")
    assert cgroup_cpu_limit(((tmp_path / "missing", None), (quota, period))) is None
    quota.write_text("200000\n")
    assert cgroup_cpu_limit(((quota, period),)) == 2.0


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="thread priorities are set through setpriority (Linux)")
def test_inference_threads_run_below_the_event_loop_priority() -> None:
    """serve.runner_nice: the runs' threads get a higher nice value than the thread that serves requests."""
    def nice_of_this_thread(model: object, batch: np.ndarray) -> list[int]:
        return [os.getpriority(os.PRIO_PROCESS, threading.get_native_id())] * len(batch)

    async def main(nice: int) -> tuple[int, int]:
        batcher = MicroBatcher(nice_of_this_thread, max_batch=4, max_wait_s=0.0, runners=2, runner_nice=nice)
        batcher.start()
        try:
            runner_nice = (await batcher.submit(None, np.zeros((1, 3))))[0]
        finally:
            await batcher.stop()
        return runner_nice, os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    lowered, loop_nice = asyncio.run(main(7))
    assert lowered == min(19, loop_nice + 7)
    same, loop_nice = asyncio.run(main(0))
    assert same == loop_nice
