"""Helpers shared by the test suite, imported as a package (`from helpers.runs import launch`); the fixtures
themselves live in conftest.py.

- runs: the test recipe, `pretrain launch` as a user runs it, metrics.jsonl read back
- loading: the sample processor the loader tests use
- shards: small good and broken input files, hand-made tars
- model, export, trainer, consolidate: reading checkpoints back, parity checks, background runs
- slurm_cluster: a real 2-node Slurm cluster on loopback
- *_worker.py: scripts run under torchrun by the tests
"""
