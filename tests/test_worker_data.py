"""raysim.worker_data: a worker's cache of per-client examples, stacked into one table per call."""

from __future__ import annotations

import numpy as np

from raysim.config import validate_config
from raysim.data.per_client import open_per_client
from raysim.tasks import task_for
from raysim.worker_data import ClientExamples


def _setup(max_bytes=1 << 30):
    cfg = validate_config({"seed": 1, "model": {"name": "random:bert-tiny", "max_length": 16},
                           "data": {"source": "synthetic:text-cls",
                                    "synthetic": {"examples_per_client": 6, "seq_len": 16},
                                    "partition": {"scheme": "dirichlet", "alpha": 0.5, "min_samples": 2}},
                           "federation": {"num_clients": 1000, "clients_per_round": 4}})
    source = open_per_client(cfg)
    return source, ClientExamples(source, task_for(cfg), max_bytes=max_bytes)


def test_gather_stacks_each_client_once_at_its_offset():
    source, examples = _setup()
    table, offsets = examples.gather([5, 9, 5, 700])
    assert list(offsets) == [5, 9, 700]
    for cid, start in offsets.items():
        raw = source.client(cid)
        rows = slice(start, start + len(raw))
        assert np.array_equal(table["labels"][rows], raw.labels)
        assert np.array_equal(table["input_ids"][rows, :raw.input_ids.shape[1]], raw.input_ids)
    assert len(table["labels"]) == sum(len(source.client(c)) for c in offsets)
    assert table["input_ids"].dtype == np.int32 and table["attention_mask"].dtype == np.int8   # compact


def test_the_cache_is_bounded_and_keeps_the_recent_clients():
    source, examples = _setup()
    one = sum(v.nbytes for v in examples.arrays(0).values())
    small = ClientExamples(source, examples.task, max_bytes=3 * one)
    for cid in range(10):
        small.arrays(cid)
    assert small.bytes <= 3 * one and len(small.cache) < 10
    assert 9 in small.cache and 0 not in small.cache
    small.arrays(9)
    assert small.hits == 1 and small.misses == 10
