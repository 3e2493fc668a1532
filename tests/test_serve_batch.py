"""The batching queue of `pegasus-x serve`, without a server: grouping, limits, answers, cancelling."""

from __future__ import annotations

import threading

import pytest

from pegasus_x.errors import RequestError
from pegasus_x.serve_batch import DONE, TOKEN, Batcher, Job
from pegasus_x.serve_metrics import Metrics
from pegasus_x.summarize import Summarizer


@pytest.fixture(scope="module")
def summarizer():
    return Summarizer(None, max_input_tokens=64)


def job(length: int, rows: int = 1, **options) -> Job:
    return Job(list(range(2, length + 1)) + [1], options, False, lambda *_: None, length, 0, rows)


def batcher(summarizer, **limits) -> Batcher:
    settings = dict(max_batch_size=4, max_batch_tokens=1000, max_wait=0.0, max_queue=8) | limits
    return Batcher(summarizer, Metrics(), **settings)


def test_batches_group_options_and_nearby_lengths(summarizer):
    b = batcher(summarizer, max_batch_size=3, max_batch_tokens=3 * 50)
    jobs = [job(40, num_beams=1), job(10, num_beams=2), job(45, num_beams=1), job(100, num_beams=1),
            job(38, num_beams=1), job(20, num_beams=1)]
    for j in jobs:
        b.submit(j)
    first = b._take_batch()
    # The oldest job, then the same-option jobs nearest to it in length, within 3 jobs and 150 padded tokens.
    assert first == [jobs[0], jobs[4], jobs[2]]
    assert b._take_batch() == [jobs[1]]                # other options: its own batch
    assert b._take_batch() == [jobs[3]]                # 100 + 20 tokens, padded: 2 x 100 > 150
    assert b._take_batch() == [jobs[5]]
    assert b.queue_length == 0


def test_batches_stay_within_the_row_limit(summarizer):
    b = batcher(summarizer, max_batch_size=8, max_batch_rows=8)
    beams = [job(10, rows=4, num_beams=4) for _ in range(3)]
    wide = [job(10, rows=12, num_beams=12) for _ in range(2)]
    for j in beams + wide:
        b.submit(j)
    assert b._batch_full()                             # two 4-beam requests fill 8 rows: no waiting for more
    assert b._take_batch() == beams[:2] and b._take_batch() == beams[2:]
    assert b._take_batch() == [wide[0]] and b._take_batch() == [wide[1]]    # past the limit alone: alone
    b = batcher(summarizer, max_batch_size=3, max_batch_rows=None)
    for j in beams:
        b.submit(j)
    assert b._take_batch() == beams                    # no row limit: the request limit


def test_prepare_counts_each_requests_rows(summarizer):
    b = batcher(summarizer)
    assert b.prepare("a text", {"num_beams": 3}, False, lambda *_: None).rows == 3
    assert b.prepare("a text", {"num_beams": 1}, False, lambda *_: None).rows == 1
    default = summarizer.model.generation_config.num_beams or 1
    assert b.prepare("a text", summarizer.generation_options(), False, lambda *_: None).rows == default


def test_default_row_limit_is_the_fused_steps_on_a_cpu(summarizer):
    from pegasus_x import native
    from pegasus_x.native.abi import MAX_DRAFT_ROWS
    from pegasus_x.serve_batch import default_max_rows

    model = summarizer.model
    assert default_max_rows(model) == (MAX_DRAFT_ROWS if native.available(model) else None)
    model.set_native(False)
    try:
        assert default_max_rows(model) is None
    finally:
        model.set_native(True)


def test_sampling_runs_alone(summarizer):
    b = batcher(summarizer)
    jobs = [job(10, do_sample=True, seed=1), job(10, do_sample=True, seed=1)]
    for j in jobs:
        b.submit(j)
    assert b._take_batch() == [jobs[0]] and b._take_batch() == [jobs[1]]


def test_full_queue_and_closing_refuse(summarizer):
    b = batcher(summarizer, max_queue=2)
    b.submit(job(5))
    b.submit(job(5))
    with pytest.raises(RequestError) as err:
        b.submit(job(5))
    assert err.value.status == 503
    b._queue.clear()
    b.start()
    b.close()
    with pytest.raises(RequestError) as err:
        b.submit(job(5))
    assert err.value.status == 503 and "shutting down" in str(err.value)


@pytest.mark.slow
def test_worker_answers_like_the_summarizer_and_streams(summarizer):
    b = batcher(summarizer)
    texts = ["The join command joins lines of two files on a common field.",
             "The sort command writes sorted lines of text files to standard output, one after another."]
    events: list[list] = [[], []]
    done = threading.Semaphore(0)

    def notify(i):
        def put(kind, data):
            events[i].append((kind, data))
            if kind != TOKEN:
                done.release()
        return put
    jobs = [b.prepare(t, {"num_beams": 1}, stream=True, notify=notify(i)) for i, t in enumerate(texts)]
    for j in jobs:
        b.submit(j)
    b.start()
    for _ in jobs:
        assert done.acquire(timeout=60)
    b.close()
    for i, text in enumerate(texts):
        kind, answer = events[i][-1]
        assert kind == DONE
        assert answer["summary"] == summarizer.run([text], num_beams=1)[0].text
        assert "".join(d["text"] for k, d in events[i][:-1] if k == TOKEN) == answer["summary"]


def test_cancel_drops_a_queued_job(summarizer):
    b = batcher(summarizer)
    j = job(10)
    b.submit(j)
    b.cancel(j)
    assert b.queue_length == 0 and j.cancelled.is_set()
    b.cancel(j)  # twice: counted once
    assert "pegasus_x_cancelled_total 1" in b.metrics.render(0, 0)
    answered = job(10)
    b.cancel(answered)  # neither queued nor running: already answered, not counted
    assert "pegasus_x_cancelled_total 1" in b.metrics.render(0, 0)
