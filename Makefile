# The two commands a newcomer needs (README): `make run` and `make test`.
# Each bootstraps .venv first (scripts/bootstrap.sh), so a fresh clone needs nothing else.
.PHONY: run test lint bench venv

venv:
	@bash scripts/bootstrap.sh

run: venv
	.venv/bin/mlsae run $(ARGS)

test: venv
	.venv/bin/ruff check .
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -n 2 --dist loadfile --durations=15 $(ARGS)

lint: venv
	.venv/bin/ruff check .

bench: venv
	.venv/bin/python benchmarks/bench_train.py
	.venv/bin/python benchmarks/bench_extract.py
	.venv/bin/python benchmarks/bench_sql.py
	.venv/bin/python benchmarks/bench_serve.py
