# flagshed: the two commands a new user needs are `make demo` and `make test`.
# Both install and start RabbitMQ when it is missing (scripts/ensure-rabbitmq).

CARGO ?= cargo
NEXTEST := $(shell $(CARGO) nextest --version >/dev/null 2>&1 && echo yes)

.PHONY: all release broker tools demo test chaos cluster-chaos lint clean

all: release

release:
	$(CARGO) build --release --locked --bins --examples

broker:
	scripts/ensure-rabbitmq

# openssl, nft and amqp-consume, which the TLS, cluster and handler tests and benches use.
tools:
	scripts/ensure-test-tools

demo: broker release
	./target/release/examples/demo

# The test command README.md gives and CI runs. Integration tests talk to the real broker;
# the TLS tests start a second local node with a TLS listener (scripts/rabbitmq-tls-node).
test: broker tools
ifeq ($(NEXTEST),yes)
	$(CARGO) nextest run --release --locked --no-fail-fast
else
	$(CARGO) test --release --locked --no-fail-fast
endif

# Fault injection (broker restart, kill -9, SIGTERM under load, flag service outages), one
# scenario at a time: it restarts the broker, so it never runs alongside other tests.
chaos: broker
	$(CARGO) test --release --locked --test chaos -- --ignored --test-threads=1 --nocapture

# A three-node RabbitMQ cluster beside the default broker (scripts/rabbitmq-cluster): a node is
# killed, then cut off the network, under load; every confirmed job is audited. One at a time.
cluster-chaos: broker tools
	$(CARGO) test --release --locked --test cluster -- --ignored --test-threads=1 --nocapture
	scripts/rabbitmq-cluster stop

# The second clippy builds the library as users get it, without the `internals` feature that
# tests and benches turn on, so code nothing in the daemons uses is reported.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets --locked -- -D warnings
	$(CARGO) clippy --lib --bins --locked -- -D warnings

clean:
	$(CARGO) clean

-include mk/install.mk
-include mk/bench.mk
