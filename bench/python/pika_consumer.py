"""A minimal pika consumer: the baseline a Python team would write by hand.

Consumes --count messages from --queue with the given prefetch, acking each one as it
arrives (no work), then prints "done <count>" and waits for standard input to close before
exiting, so the driver can read this process's CPU time while it is still alive.
"""

import argparse
import sys

import pika


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/%2f")
    parser.add_argument("--queue", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--prefetch", type=int, default=50)
    args = parser.parse_args()

    connection = pika.BlockingConnection(pika.URLParameters(args.url))
    channel = connection.channel()
    channel.basic_qos(prefetch_count=args.prefetch)
    received = 0

    def on_message(ch, method, _properties, _body):
        nonlocal received
        ch.basic_ack(delivery_tag=method.delivery_tag)
        received += 1
        if received >= args.count:
            ch.stop_consuming()

    channel.basic_consume(queue=args.queue, on_message_callback=on_message)
    print("ready", flush=True)
    channel.start_consuming()
    print(f"done {received}", flush=True)
    sys.stdin.read()
    connection.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
