"""Check a shard set before training on it: every sample once through the training decode + preprocess + tokenize
path (the loader's SampleProcessor), counted as ok or skipped by reason. No shuffle, no epochs, no bad-fraction
limit: it reports, it never stops. Shards are spread over worker processes.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from pretrain.data import errors
from pretrain.data.batching import vision_cost
from pretrain.data.errors import SampleError
from pretrain.data.sample import SampleProcessor, sample_kind
from pretrain.data.stream import ShardReader, TarShardError

OTHER = "other"  # an exception that is not a SampleError: training would stop on it, so it is shown in full
MAX_NOTES = 3  # details kept per shard of unexpected errors


@dataclass
class ShardReport:
    url: str
    ok: int = 0
    skipped: Counter = field(default_factory=Counter)
    truncated_text: int = 0  # kept samples whose text was cut to data.max_length
    images: Counter = field(default_factory=Counter)  # kept samples by the images (tiles) they give the tower
    kinds: Counter = field(default_factory=Counter)  # kept samples by kind (data.sample.KINDS)
    problem: str | None = None  # why the shard ended early (truncated tar, failed pipe)
    notes: list[str] = field(default_factory=list)


@dataclass
class VerifyReport:
    shards: list[ShardReport] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return sum(s.ok for s in self.shards)

    @property
    def skipped(self) -> dict[str, int]:
        total: Counter = Counter()
        for s in self.shards:
            total.update(s.skipped)
        return dict(sorted(total.items()))

    @property
    def images_per_sample(self) -> dict[int, int]:
        total: Counter = Counter()
        for s in self.shards:
            total.update(s.images)
        return dict(sorted(total.items()))

    @property
    def samples_by_kind(self) -> dict[str, int]:
        total: Counter = Counter()
        for s in self.shards:
            total.update(s.kinds)
        return dict(sorted(total.items()))

    def summary(self) -> dict:
        """The `{"ok": n, "skipped": {reason: n}}` object `pretrain shards verify` prints last."""
        return {"ok": self.ok, "skipped": self.skipped}


def verify_shard(url: str, processor: SampleProcessor) -> ShardReport:
    """Run every sample of one shard through `processor`."""
    report = ShardReport(url)
    try:
        for raw in ShardReader().iterate(url):
            try:
                sample = processor(raw.parts)
            except SampleError as err:
                report.skipped[err.reason] += 1
                continue
            except Exception as err:  # not a data problem we know: training would crash here
                report.skipped[OTHER] += 1
                if len(report.notes) < MAX_NOTES:
                    report.notes.append(f"{url} sample {raw.key}: {type(err).__name__}: {err}")
                continue
            report.ok += 1
            report.truncated_text += int(sample.truncated)
            report.images[vision_cost(sample)] += 1
            report.kinds[sample_kind(raw.parts)] += 1
    except TarShardError as err:
        # As the loader counts it: one per shard that ends early; the samples after the cut cannot be counted.
        report.skipped[errors.TRUNCATED_TAR] += 1
        report.problem = str(err)
    return report


_PROCESSOR: SampleProcessor | None = None


def _init_worker(processor: SampleProcessor) -> None:
    global _PROCESSOR
    _PROCESSOR = processor
    import torch

    torch.set_num_threads(1)  # one process per core


def _verify_in_worker(url: str) -> ShardReport:
    assert _PROCESSOR is not None
    return verify_shard(url, _PROCESSOR)


def _reports(urls: list[str], processor: SampleProcessor, workers: int) -> Iterator[ShardReport]:
    if workers <= 1 or len(urls) <= 1:
        for url in urls:
            yield verify_shard(url, processor)
        return
    # fork shares the built tokenizer and processor; elsewhere they are pickled into each worker once.
    method = "fork" if sys.platform.startswith("linux") else None
    ctx = multiprocessing.get_context(method)
    with ProcessPoolExecutor(min(workers, len(urls)), mp_context=ctx, initializer=_init_worker,
                             initargs=(processor,)) as pool:
        yield from pool.map(_verify_in_worker, urls)


def verify_shards(urls: list[str], processor: SampleProcessor, workers: int = 1,
                  on_shard: Callable[[ShardReport], None] | None = None) -> VerifyReport:
    """Verify every shard (in `workers` processes); `on_shard` sees each shard's report as it finishes, in order."""
    report = VerifyReport()
    for shard in _reports(urls, processor, workers):
        report.shards.append(shard)
        if on_shard is not None:
            on_shard(shard)
    return report
