# Benchmarks: included by the top-level Makefile, which defines `broker` (starts RabbitMQ
# when it is missing). They print figures; none of them asserts a timing.
#
#   make bench      every bench in full, about two hours on 2 cores: tables on stdout, CSV,
#                   markdown and SVG files under target/bench/, and the plots in docs/
#   make bench-ci   short overload, handler and shedding runs (a few seconds each) that fail
#                   only if a run did not complete or a ledger did not balance; under three
#                   minutes

CARGO ?= cargo

.PHONY: bench bench-ci amqp-tools

bench: broker amqp-tools
	$(CARGO) bench --locked --bench decision
	$(CARGO) bench --locked --bench throughput
	$(CARGO) bench --locked --bench overload
	$(CARGO) bench --locked --bench handlers
	$(CARGO) bench --locked --bench shedding
	$(CARGO) bench --locked --bench tls
	$(CARGO) bench --locked --bench metrics_cost

bench-ci: broker
	$(CARGO) bench --locked --bench overload -- --ci
	$(CARGO) bench --locked --bench handlers -- --ci
	$(CARGO) bench --locked --bench shedding -- --ci

# The handlers bench compares taskworker with amqp-consume (Debian's amqp-tools), installed by
# scripts/ensure-test-tools with the other tools the tests and benches use.
amqp-tools:
	scripts/ensure-test-tools
