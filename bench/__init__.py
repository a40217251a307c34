"""The benchmark of lit-rlhf against TRL: `python bench/run.py` (see bench/README.md).

A package only so that its modules import each other by one name (``bench.timing``) from every process that runs
them: run.py, the lit-rlhf subprocesses (whose CLI puts the working directory, the repository root, on sys.path) and
the peer subprocesses (``python -m bench.peer_trl`` from the repository root). It imports nothing itself: the peer
venvs have neither lit-rlhf nor Lightning."""
