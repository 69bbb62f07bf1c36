"""Per-client data: synthetic clients generated from the seed, Parquet datasets read one client at a time."""

import pickle
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysim.config import ConfigError, SyntheticConfig, validate_config
from raysim.data.per_client import is_per_client, local_split, open_per_client
from raysim.data.raw import CLS_ID, NUM_SPECIAL_TOKENS, SEP_ID
from raysim.data.sources import make_synthetic, synthetic_key_tokens

SYNTH = {"seq_len": 12, "vocab_size": 120, "num_labels": 4, "examples_per_client": 30}


def _synth_cfg(num_clients=50, seed=0, partition=None, synthetic=None, task="seq_cls", **data):
    data = {"source": "synthetic:text-cls", "synthetic": {**SYNTH, **(synthetic or {})}, "test_clients": 5,
            "partition": partition or {"scheme": "iid", "min_samples": 2}, **data}
    return validate_config({"seed": seed, "data": data, "task": {"type": task},
                            "federation": {"num_clients": num_clients, "clients_per_round": 2}})


def _same_raw(a, b):
    assert a.label_names == b.label_names and np.array_equal(a.labels, b.labels)
    for field in ("input_ids",):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None and y is None) or np.array_equal(x, y)
    for field in ("texts", "text_pairs", "prompts", "responses"):
        assert getattr(a, field) == getattr(b, field)


# ----------------------------------------------------------------------------- the shared row generator


def _make_synthetic_as_it_was(cfg, seed):
    """make_synthetic before its row generation became `synthetic_rows`: the oracle for "unchanged"."""
    n, length, num_labels = cfg.num_examples, cfg.seq_len, cfg.num_labels
    keys = synthetic_key_tokens(cfg, seed)
    filler = np.setdiff1d(np.arange(NUM_SPECIAL_TOKENS, cfg.vocab_size), keys.ravel())
    rng = np.random.default_rng(seed)
    content = length - 2
    labels = rng.integers(0, num_labels, size=n)
    body = rng.choice(filler, size=(n, content))
    num_keys = np.full(n, max(1, int(round(cfg.key_fraction * content))))
    ranks = np.argsort(np.argsort(rng.random((n, content)), axis=1), axis=1)
    is_key = ranks < num_keys[:, None]
    key_pick = keys[labels[:, None], rng.integers(0, keys.shape[1], size=(n, content))]
    body = np.where(is_key, key_pick, body)
    input_ids = np.empty((n, length), dtype=np.int64)
    input_ids[:, 0], input_ids[:, 1:-1], input_ids[:, -1] = CLS_ID, body, SEP_ID
    return labels.astype(np.int64), input_ids


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("kwargs", [{}, {"num_examples": 300, "seq_len": 8, "vocab_size": 50, "num_labels": 3,
                                         "key_fraction": 0.6}, {"num_examples": 77, "seq_len": 4,
                                                                "vocab_size": 16, "num_labels": 2}])
def test_make_synthetic_output_is_unchanged(seed, kwargs):
    cfg = SyntheticConfig(**kwargs)
    raw = make_synthetic(cfg, seed)
    labels, input_ids = _make_synthetic_as_it_was(cfg, seed)
    assert np.array_equal(raw.labels, labels) and np.array_equal(raw.input_ids, input_ids)
    assert raw.input_ids.dtype == np.int64 and raw.label_names == [f"class_{i}" for i in range(cfg.num_labels)]


# ----------------------------------------------------------------------------- synthetic per-client data


def test_is_per_client():
    assert is_per_client(_synth_cfg().data)
    assert not is_per_client(_synth_cfg(synthetic={"examples_per_client": None}).data)
    pooled = validate_config({"data": {"source": "parquet:x.parquet"}}).data
    assert not is_per_client(pooled)
    assert is_per_client(validate_config({"data": {"source": "parquet-dataset:dir"}}).data)


def test_synthetic_is_deterministic_across_instances_and_pickling():
    cfg = _synth_cfg(partition={"scheme": "dirichlet", "alpha": 0.3, "min_samples": 2})
    a, b = open_per_client(cfg), open_per_client(cfg)
    c = pickle.loads(pickle.dumps(a))
    for cid in (0, 17, 49):
        _same_raw(a.client(cid), b.client(cid))
        _same_raw(a.client(cid), c.client(cid))
        _same_raw(a.client(cid), a.client(cid))
    _same_raw(a.test_set(), c.test_set())
    assert np.array_equal(a.sizes(), c.sizes()) and a.describe() == c.describe()
    other = open_per_client(_synth_cfg(seed=1, partition={"scheme": "dirichlet", "alpha": 0.3, "min_samples": 2}))
    assert not np.array_equal(a.client(0).input_ids[:3], other.client(0).input_ids[:3])


def test_synthetic_rows_follow_the_key_token_rule():
    cfg = _synth_cfg(num_clients=20)
    data = open_per_client(cfg)
    keys = synthetic_key_tokens(cfg.data.synthetic, cfg.seed)
    sizes = data.sizes()
    for cid in range(20):
        raw = data.client(cid)
        assert len(raw) == sizes[cid] and raw.input_ids.shape == (sizes[cid], SYNTH["seq_len"])
        assert raw.input_ids.dtype == np.int64 and raw.labels.dtype == np.int64
        assert np.all(raw.input_ids[:, 0] == CLS_ID) and np.all(raw.input_ids[:, -1] == SEP_ID)
        for row, label in zip(raw.input_ids, raw.labels):
            body = set(row[1:-1].tolist())
            assert body & set(keys[label].tolist())                      # a key token of its class
            others = np.delete(keys, label, axis=0).ravel().tolist()
            assert not body & set(others)                                # none of another class
    assert data.label_names == ["class_0", "class_1", "class_2", "class_3"]


def test_synthetic_sizes_are_lognormal_around_examples_per_client():
    cfg = _synth_cfg(num_clients=20000, synthetic={"examples_per_client": 100, "size_sigma": 0.5})
    sizes = open_per_client(cfg).sizes()
    assert sizes.shape == (20000,) and sizes.dtype == np.int64
    assert abs(sizes.mean() - 100) < 2
    assert abs(np.log(sizes).std() - 0.5) < 0.03


def test_synthetic_sizes_floor_and_equal_sizes():
    floored = open_per_client(_synth_cfg(num_clients=2000, partition={"scheme": "iid", "min_samples": 15},
                                         synthetic={"examples_per_client": 20, "size_sigma": 1.0})).sizes()
    assert floored.min() == 15 and np.mean(floored == 15) > 0.2
    tiny = open_per_client(_synth_cfg(num_clients=2000, synthetic={"examples_per_client": 2, "size_sigma": 2.0},
                                      partition={"scheme": "iid", "min_samples": 1})).sizes()
    assert tiny.min() == 2
    equal = open_per_client(_synth_cfg(num_clients=300, synthetic={"examples_per_client": 37, "size_sigma": 0}))
    assert np.all(equal.sizes() == 37)


def test_dirichlet_clients_are_more_skewed_than_iid_ones():
    def mean_max_share(partition):
        data = open_per_client(_synth_cfg(num_clients=200, partition=partition,
                                          synthetic={"examples_per_client": 60, "size_sigma": 0}))
        shares = [np.bincount(data.client(c).labels, minlength=4).max() / 60 for c in range(200)]
        return float(np.mean(shares))

    iid = mean_max_share({"scheme": "iid", "min_samples": 2})
    skewed = mean_max_share({"scheme": "dirichlet", "alpha": 0.1, "min_samples": 2})
    assert iid < 0.45 and skewed > iid + 0.3


def test_synthetic_test_set_is_the_held_out_clients():
    data = open_per_client(_synth_cfg(num_clients=50, test_clients=5))
    test = data.test_set()
    assert len(test) == data.describe()["test_examples"] and data.describe()["held_out_clients"] == 5
    # held-out client ids 50..54 are generated exactly like training clients 50..54 of a larger run
    larger = open_per_client(_synth_cfg(num_clients=60, test_clients=5))
    expected = [larger.client(c) for c in range(50, 55)]
    assert np.array_equal(test.labels, np.concatenate([r.labels for r in expected]))
    assert np.array_equal(test.input_ids, np.concatenate([r.input_ids for r in expected]))


def test_a_million_synthetic_clients_are_cheap():
    data = open_per_client(_synth_cfg(num_clients=1_000_000, synthetic={"examples_per_client": 50}))
    start = time.perf_counter()
    sizes = data.sizes()
    assert time.perf_counter() - start < 2.0
    assert sizes.shape == (1_000_000,) and abs(sizes.mean() - 50) < 1
    assert len(pickle.dumps(data)) < 100_000                       # the size cache is not pickled
    assert len(data.client(999_999)) == sizes[999_999]
    with pytest.raises(IndexError):
        data.client(1_000_000)


@pytest.mark.parametrize("change, key", [
    ({"partition": {"scheme": "shards", "min_samples": 2}}, "data.partition.scheme"),
    ({"max_examples": 100}, "data.max_examples"),
    ({"label_noise": {"fraction_clients": 0.5, "flip_prob": 0.5}}, "data.label_noise"),
    ({"task": "causal_lm"}, "task.type"),
    ({"text_pair_column": "other"}, "data.text_pair_column"),
    ({"prompt_column": "p"}, "data.prompt_column"),
    ({"synthetic": {"vocab_size": 16, "num_labels": 12}}, "data.synthetic.vocab_size"),
])
def test_synthetic_config_errors_name_the_key(change, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        open_per_client(_synth_cfg(**change))


def test_pooled_source_is_refused():
    with pytest.raises(ConfigError, match="data.source"):
        open_per_client(_synth_cfg(synthetic={"examples_per_client": None}))


# ----------------------------------------------------------------------------- local split


@pytest.mark.parametrize("n, fraction", [(1, 0.2), (2, 0.2), (10, 0.25), (37, 0.5), (100, 0.0), (5, 0.99)])
def test_local_split_sizes_and_disjointness(n, fraction):
    train, test = local_split(n, fraction, seed=3, cid=11)
    expected_test = 0 if fraction == 0 or n < 2 else min(max(1, round(n * fraction)), n - 1)
    assert len(test) == expected_test and len(train) == n - expected_test
    assert train.dtype == np.int64 and test.dtype == np.int64
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(n))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)
    again = local_split(n, fraction, seed=3, cid=11)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], test)


def test_local_split_depends_on_client_and_seed():
    base = local_split(200, 0.3, seed=0, cid=5)[1]
    assert not np.array_equal(base, local_split(200, 0.3, seed=0, cid=6)[1])
    assert not np.array_equal(base, local_split(200, 0.3, seed=1, cid=5)[1])


# ----------------------------------------------------------------------------- Parquet datasets


def _frame(seed=0, clients=30, labels=("neg", "neu", "pos")):
    """Rows of `clients` users (1-11 rows each) in random order, unique texts, and one row without a user."""
    rng = np.random.default_rng(seed)
    users = np.repeat([f"u{i:02d}" for i in range(clients)], rng.integers(1, 12, size=clients)).astype(object)
    rng.shuffle(users)
    users[5] = None
    n = len(users)
    return pd.DataFrame({"user": users, "text": [f"text {i}" for i in range(n)],
                         "pair": [f"pair {i}" for i in range(n)], "label": rng.choice(list(labels), size=n),
                         "region": rng.choice(["eu", "us"], size=n)})


def _write(frame, root, files=3):
    """Several files (row groups of 7), each holding rows of many clients; names sort in row order."""
    root.mkdir()
    for k, idx in enumerate(np.array_split(np.arange(len(frame)), files)):
        table = pa.Table.from_pandas(frame.iloc[idx], preserve_index=False)
        pq.write_table(table, root / f"part-{k}.parquet", row_group_size=7)
    return root


def _pq_cfg(root, num_clients=10, test_clients=4, task="seq_cls", min_samples=3, **data):
    data = {"source": f"parquet-dataset:{root}", "client_column": "user", "test_clients": test_clients,
            "partition": {"scheme": "shards", "min_samples": min_samples}, **data}
    return validate_config({"seed": 0, "data": data, "task": {"type": task},
                            "federation": {"num_clients": num_clients, "clients_per_round": 2}})


def _users_of(raw, frame):
    by_text = dict(zip(frame["text"], frame["user"]))
    return [by_text[t] for t in (raw.texts if raw.texts is not None else raw.responses)]


def test_parquet_clients_hold_exactly_their_rows(tmp_path):
    frame = _frame()
    data = open_per_client(_pq_cfg(_write(frame, tmp_path / "ds"), text_pair_column="pair"))
    assert data.num_clients == 10 and data.label_names == ["neg", "neu", "pos"]
    chosen = []
    for cid in range(10):
        raw = data.client(cid)
        user = _users_of(raw, frame)[0]
        expected = frame[frame["user"] == user]
        assert raw.texts == list(expected["text"]) and raw.text_pairs == list(expected["pair"])
        assert [raw.label_names[i] for i in raw.labels] == list(expected["label"])
        assert data.sizes()[cid] == len(expected) >= 3
        chosen.append(user)
    assert chosen == sorted(set(chosen))                               # ids follow the client values
    assert data.sizes().dtype == np.int64


def test_parquet_test_set_is_the_held_out_clients(tmp_path):
    frame = _frame()
    data = open_per_client(_pq_cfg(_write(frame, tmp_path / "ds")))
    test = data.test_set()
    held_out = set(_users_of(test, frame))
    training = {_users_of(data.client(c), frame)[0] for c in range(10)}
    assert len(held_out) == 4 and not held_out & training
    assert test.texts == list(frame[frame["user"].isin(held_out)]["text"])
    counts = frame["user"].value_counts()
    facts = data.describe()
    assert facts["dataset_clients"] == 30 and facts["rows_without_client"] == 1
    assert facts["skipped_clients"] == int((counts < 3).sum()) and all(counts[u] >= 3 for u in held_out)
    assert facts["test_examples"] == len(test) and facts["held_out_clients"] == 4 and facts["clients"] == 10
    assert facts["unused_clients"] == int((counts >= 3).sum()) - 14


def test_parquet_is_deterministic_and_pickles_small(tmp_path):
    root = _write(_frame(), tmp_path / "ds")
    a, b = open_per_client(_pq_cfg(root)), open_per_client(_pq_cfg(root))
    a.client(0)                                                        # opens (and caches) the dataset
    blob = pickle.dumps(a)
    c = pickle.loads(blob)
    assert len(blob) < 20_000
    for cid in range(10):
        _same_raw(a.client(cid), b.client(cid))
        _same_raw(a.client(cid), c.client(cid))
    _same_raw(a.test_set(), c.test_set())
    other = open_per_client(validate_config({**_pq_cfg(root).model_dump(), "seed": 5}))
    assert other.test_set().texts != a.test_set().texts               # the held-out choice is seeded


def test_parquet_integer_labels_keep_numeric_order(tmp_path):
    frame = _frame(labels=(2, 10, 1))
    data = open_per_client(_pq_cfg(_write(frame, tmp_path / "ds")))
    raw = data.client(3)
    expected = frame[frame["user"] == _users_of(raw, frame)[0]]
    assert data.label_names == ["1", "2", "10"]
    assert [int(data.label_names[i]) for i in raw.labels] == list(expected["label"])


@pytest.mark.parametrize("hive_column", ["region", "user"])
def test_parquet_hive_partitioned_layout(tmp_path, hive_column):
    frame = _frame().dropna(subset=["user"])
    pq.write_to_dataset(pa.Table.from_pandas(frame, preserve_index=False), tmp_path / "ds",
                        partition_cols=[hive_column])
    data = open_per_client(_pq_cfg(tmp_path / "ds"))
    in_file_order = frame.sort_values(hive_column, kind="stable")    # partition folders are read in name order
    for cid in range(10):
        raw = data.client(cid)
        expected = in_file_order[in_file_order["user"] == _users_of(raw, frame)[0]]
        assert raw.texts == list(expected["text"]) and len(raw) == data.sizes()[cid]
        assert [raw.label_names[i] for i in raw.labels] == list(expected["label"])


def test_parquet_causal_prompt_response_with_global_groups(tmp_path):
    frame = _frame().rename(columns={"text": "prompt", "pair": "response"})
    frame.loc[frame.index[::4], "label"] = None                       # missing groups become ""
    data = open_per_client(_pq_cfg(_write(frame, tmp_path / "ds"), task="causal_lm", prompt_column="prompt",
                                   response_column="response"))
    assert data.label_names == ["", "neg", "neu", "pos"]
    by_response = dict(zip(frame["response"], frame["user"]))
    for cid in range(10):
        raw = data.client(cid)
        expected = frame[frame["user"] == by_response[raw.responses[0]]]
        assert raw.prompts == list(expected["prompt"]) and raw.responses == list(expected["response"])
        assert [raw.label_names[i] for i in raw.labels] == list(expected["label"].fillna(""))
        assert raw.texts is None and raw.label_names == data.label_names


def test_parquet_causal_plain_text_without_labels(tmp_path):
    frame = _frame().drop(columns=["label"])
    data = open_per_client(_pq_cfg(_write(frame, tmp_path / "ds"), task="causal_lm"))
    raw = data.client(0)
    expected = frame[frame["user"] == dict(zip(frame["text"], frame["user"]))[raw.responses[0]]]
    assert data.label_names == ["all"] and np.all(raw.labels == 0)
    assert raw.responses == list(expected["text"]) and raw.prompts == [""] * len(expected)


@pytest.mark.parametrize("change, key, mentions", [
    ({"client_column": None}, "data.client_column", "user, text"),
    ({"client_column": "nope"}, "data.client_column", "user, text"),
    ({"text_column": "nope"}, "data.text_column", "user, text"),
    ({"label_column": "nope"}, "data.label_column", "user, text"),
    ({"text_pair_column": "nope"}, "data.text_pair_column", "user, text"),
    ({"task": "regression"}, "task.type", "seq_cls and causal_lm"),
    ({"num_clients": 30}, "federation.num_clients", "so at most"),
    ({"test_clients": 30}, "data.test_clients", "leaves none"),
    ({"prompt_column": "text"}, "data.prompt_column", "causal_lm"),
    ({"task": "causal_lm", "prompt_column": "text"}, "data.response_column", "data.prompt_column"),
    ({"task": "causal_lm", "text_pair_column": "pair"}, "data.text_pair_column", "causal_lm"),
    ({"max_examples": 50}, "data.max_examples", "per-client"),
    ({"label_noise": {"fraction_clients": 0.1, "flip_prob": 0.1}}, "data.label_noise", "per-client"),
])
def test_parquet_config_errors_name_the_key(tmp_path, change, key, mentions):
    root = _write(_frame(), tmp_path / "ds")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        open_per_client(_pq_cfg(root, **change))
    assert mentions in str(err.value) and "\n" not in str(err.value)


def test_parquet_too_many_clients_names_the_limit(tmp_path):
    frame = _frame()
    eligible = int((frame["user"].value_counts() >= 3).sum())
    with pytest.raises(ConfigError, match=rf"has {eligible} clients with ≥ 3 examples.*at most {eligible - 4}"):
        open_per_client(_pq_cfg(_write(frame, tmp_path / "ds"), num_clients=eligible))


def test_parquet_data_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="data.source: parquet-dataset folder not found"):
        open_per_client(_pq_cfg(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="data.source: no Parquet files"):
        open_per_client(_pq_cfg(tmp_path / "empty"))
    no_rows = _frame().iloc[:0]
    with pytest.raises(ConfigError, match="data.source: .* has no rows"):
        open_per_client(_pq_cfg(_write(no_rows, tmp_path / "no_rows", files=1)))
    missing = _frame()
    missing.loc[missing.index[3], "label"] = None
    with pytest.raises(ConfigError, match="data.label_column: .* 1 missing values"):
        open_per_client(_pq_cfg(_write(missing, tmp_path / "missing_label")))
    single = _frame(labels=("only",))
    with pytest.raises(ConfigError, match="data.label_column: .* only 1 distinct label"):
        open_per_client(_pq_cfg(_write(single, tmp_path / "single")))


def test_parquet_categorical_columns(tmp_path):
    frame = _frame()
    frame["user"], frame["label"] = frame["user"].astype("category"), frame["label"].astype("category")
    data = open_per_client(_pq_cfg(_write(frame, tmp_path / "ds")))
    assert data.label_names == ["neg", "neu", "pos"]
    for cid in range(10):
        raw = data.client(cid)
        expected = frame[frame["user"] == _users_of(raw, frame)[0]]
        assert raw.texts == list(expected["text"])
        assert [raw.label_names[i] for i in raw.labels] == list(expected["label"])


def test_parquet_counts_do_not_depend_on_merging(tmp_path, monkeypatch):
    from raysim.data import per_client_parquet

    root = _write(_frame(clients=60), tmp_path / "ds", files=5)
    once = open_per_client(_pq_cfg(root))
    monkeypatch.setattr(per_client_parquet, "MERGE_ROWS", 3)         # merge partial counts after each batch
    often = open_per_client(_pq_cfg(root))
    assert np.array_equal(once.sizes(), often.sizes()) and once.describe() == often.describe()
    assert once.client(4).texts == often.client(4).texts


def test_parquet_client_column_without_values(tmp_path):
    frame = _frame()
    frame["user"] = None
    with pytest.raises(ConfigError, match="data.client_column: .* holds no values"):
        open_per_client(_pq_cfg(_write(frame, tmp_path / "ds")))
