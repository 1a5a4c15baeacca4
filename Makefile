# audit-logs: the two commands are `make run` and `make test`; see README.md.
SHELL := /usr/bin/env bash
LOCAL := deploy/local

.PHONY: run test lint bench fmt build up down status logs clean-state

run: ## Whole system locally (stack, migrations, services, demo data); Ctrl-C stops it
	@$(LOCAL)/run.sh

test: ## Every test, against a real Kafka and ClickHouse started (and stopped) as needed
	@$(LOCAL)/test.sh

bench: ## Benchmarks (release build): ingest, read API, streams, retention; BENCH=ingest|api|streams|retention runs one. Tables kept in services/*/benches/RESULTS.md, STREAMS.md and RETENTION.md
	@$(LOCAL)/bench.sh $(or $(BENCH),all)

lint: ## Formatting and clippy, warnings are errors
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

fmt:
	cargo fmt --all

build:
	cargo build --workspace --all-targets

up: ## Start Kafka + ClickHouse on loopback (idempotent)
	@$(LOCAL)/stack.sh up

down: ## Stop Kafka + ClickHouse
	@$(LOCAL)/stack.sh down

status:
	@$(LOCAL)/stack.sh status

logs:
	@$(LOCAL)/stack.sh logs

clean-state: down ## Stop the stack and delete its data (keeps downloaded jars)
	@rm -rf .state/clickhouse .state/kafka .state/services
