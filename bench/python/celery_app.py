"""A Celery app with one no-op task, configured as close to taskworker's setup as Celery
allows: RabbitMQ as the broker, no result backend, prefork pool of 2 processes, 50 messages
prefetched (prefetch multiplier 25 x concurrency 2), and each message acked after its task ran
(acks_late), as taskworker acks a job after it finished.

Environment: BENCH_AMQP_URL, BENCH_QUEUE (the queue to consume and publish to), BENCH_JOBS
and BENCH_MARKER (when the BENCH_JOBS-th task has run, its time is written to BENCH_MARKER, so
the driver knows the last one finished).
"""

import multiprocessing
import os
import time

from celery import Celery

QUEUE = os.environ.get("BENCH_QUEUE", "bench.celery")
JOBS = int(os.environ.get("BENCH_JOBS", "0"))
MARKER = os.environ.get("BENCH_MARKER", "")

app = Celery(
    "flagshed_bench",
    broker=os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"),
)
app.conf.update(
    task_default_queue=QUEUE,
    task_ignore_result=True,
    result_backend=None,
    task_acks_late=True,
    worker_prefetch_multiplier=25,
    worker_concurrency=2,
    worker_pool="prefork",
    worker_enable_remote_control=False,
    worker_send_task_events=False,
    broker_connection_retry_on_startup=True,
    task_serializer="json",
    accept_content=["json"],
)

# Created before the pool forks, so every pool process shares the one counter.
_finished = multiprocessing.Value("q", 0)


@app.task(name="bench.noop")
def noop():
    """Does nothing; counts itself so the run knows when the last task finished."""
    with _finished.get_lock():
        _finished.value += 1
        count = _finished.value
    if JOBS and count == JOBS and MARKER:
        with open(MARKER, "w", encoding="ascii") as out:
            out.write(f"{time.time():.6f}\n")
