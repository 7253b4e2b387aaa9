"""Publishes N no-op tasks in Celery's own message format (send_task), to the queue named by
BENCH_QUEUE, over one producer connection. Not timed: the benchmark times consumption."""

import sys

from celery_app import QUEUE, app


def main() -> int:
    count = int(sys.argv[1])
    with app.producer_or_acquire() as producer:
        for _ in range(count):
            app.send_task("bench.noop", queue=QUEUE, producer=producer)
    print(f"published {count}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
