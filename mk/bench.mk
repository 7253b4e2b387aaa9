# Benchmarks: included by the top-level Makefile, which defines `broker` (starts RabbitMQ
# when it is missing). They print figures; none of them asserts a timing.
#
#   make bench      the three benches in full, about 25 minutes on 2 cores: tables on stdout,
#                   CSV, markdown and SVG files under target/bench/, and the two plots in docs/
#   make bench-ci   a short overload run (2C; original and deadline-aware, a few seconds
#                   each) that fails only if a run did not complete or a ledger did not balance

CARGO ?= cargo

.PHONY: bench bench-ci

bench: broker
	$(CARGO) bench --locked --bench decision
	$(CARGO) bench --locked --bench throughput
	$(CARGO) bench --locked --bench overload

bench-ci: broker
	$(CARGO) bench --locked --bench overload -- --ci
