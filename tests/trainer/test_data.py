"""Splits, catalogue, spec building, and training features equal to the serving path."""

from __future__ import annotations

import numpy as np
import pytest

from recserve.features.logs import DataError
from recserve.trainer.config import TrainConfig
from recserve.features.csr import take_bags
from recserve.trainer.data import build_spec, encode_training, load_dataset, user_records

LOG = """user_id,item_id,timestamp,invoice
u1,a,10,100
u2,x,5,200
u1,b,20,101
u1,c,20,101
u1,d,20,101
u1,e,15,102
u2,y,6,201
u1,a,30,103
u1,f,30,103
"""


@pytest.fixture
def log(tmp_path):
    p = tmp_path / "log.csv"
    p.write_text(LOG)
    items = tmp_path / "items.csv"
    items.write_text("item_id,description,median_unit_price\na,red mug,1.5\nz,never sold,3.0\n")
    return p, items


def test_leave_last_out_holds_the_last_event_ties_by_file_order(log):
    data = load_dataset(TrainConfig(interactions=str(log[0]), min_events=3))
    ids = data.catalog.ids
    # u1 sorted: a@10, e@15, b,c,d@20, a,f@30 (file order breaks the ties) -> f held out
    assert data.user_ids[data.split.test_users].tolist() == ["u1"]  # u2 has 2 < 3 events
    assert ids[data.split.test_items].tolist() == ["f"]
    assert (~data.split.train).sum() == 1
    u1 = data.user == 0
    assert ids[data.item[u1]].tolist() == ["a", "e", "b", "c", "d", "a", "f"]


def test_last_basket_holds_out_the_whole_last_invoice(log):
    data = load_dataset(TrainConfig(interactions=str(log[0]), split="last_basket", min_events=3))
    assert data.user_ids[data.split.test_users].tolist() == ["u1"]
    assert sorted(data.catalog.ids[data.split.test_items].tolist()) == ["a", "f"]
    assert (~data.split.train).sum() == 2


def test_last_basket_holds_out_an_interleaved_invoice_whole(tmp_path):
    p = tmp_path / "interleaved.csv"
    # Invoices 7 and 8 share a timestamp and interleave in the file; 7 is the user's last.
    p.write_text("user_id,item_id,timestamp,invoice\n"
                 "u,a,1,5\nu,b,2,6\nu,c,3,8\nu,d,3,7\nu,e,3,8\nu,f,3,7\n")
    data = load_dataset(TrainConfig(interactions=str(p), split="last_basket", min_events=4))
    assert sorted(data.catalog.ids[data.split.test_items].tolist()) == ["d", "f"]
    assert data.catalog.ids[data.item[data.split.train]].tolist() == ["a", "b", "c", "e"]
    # 4 distinct invoices, not 5 runs: min_events=5 leaves nobody to test
    with pytest.raises(DataError, match="no user has 5"):
        load_dataset(TrainConfig(interactions=str(p), split="last_basket", min_events=5))


def test_basket_task_trains_on_history_as_of_the_basket_start(log):
    cfg = TrainConfig(interactions=str(log[0]), split="last_basket", min_events=3, history_len=5)
    data = load_dataset(cfg)
    spec = build_spec(cfg, data)
    enc = encode_training(cfg, spec, data)
    # u1's training events: a@10, e@15, then the basket {b, c, d}@20: each of the three sees
    # [e, a], not the basket's own earlier items
    want = spec.encode("user", [{"user_id": "u1", "history": ["e", "a"]}])["history"][0].tolist()
    u1_rows = np.flatnonzero(enc.example_user == 0)
    basket = [r for r in u1_rows if data.catalog.ids[enc.example_item[r]] in ("b", "c", "d")]
    for r in basket:
        assert take_bags(enc.user_bags["history"], np.array([r]))[0].tolist() == want


def test_non_numeric_prices_name_file_row_column(log, tmp_path):
    items = tmp_path / "prices.csv"
    items.write_text("item_id,price\na,1.5\nb,cheap\n")
    with pytest.raises(DataError, match=r"prices\.csv line 3, column 'price': 'cheap' is not a number"):
        load_dataset(TrainConfig(interactions=str(log[0]), items=str(items), min_events=3))


def test_no_testable_user_is_a_clear_error(log):
    with pytest.raises(DataError, match="no user has 50 or more events"):
        load_dataset(TrainConfig(interactions=str(log[0]), min_events=50))


def test_catalog_is_the_union_with_metadata(log):
    data = load_dataset(TrainConfig(interactions=str(log[0]), items=str(log[1]), min_events=3))
    assert data.catalog.ids.tolist() == ["a", "b", "c", "d", "e", "f", "x", "y", "z"]
    assert data.catalog.description[0] == "red mug" and data.catalog.description[1] is None
    assert data.catalog.price[-1] == 3.0 and np.isnan(data.catalog.price[1])


def test_duplicate_item_ids_in_metadata_are_refused(log, tmp_path):
    items = tmp_path / "dup.csv"
    items.write_text("item_id,description\na,one\nb,two\na,three\n")
    with pytest.raises(DataError, match=r"dup\.csv line 4, column 'item_id': duplicate id 'a'"):
        load_dataset(TrainConfig(interactions=str(log[0]), items=str(items), min_events=3))


def test_training_features_equal_the_serving_encoding(tiny_data):
    """Zero train/serve skew: the bags a training example gets from the vectorised path equal
    what spec.encode (the server's code) gives for that user's raw record at that moment."""
    from tests.trainer.conftest import tiny_config

    cfg = tiny_config(tiny_data, context_columns=("invoice",))  # a context column (with values)
    data = load_dataset(cfg)
    spec = build_spec(cfg, data)
    assert [f.name for f in spec.fields] == ["user_id", "item_id", "history", "invoice", "description", "price"]
    enc = encode_training(cfg, spec, data)
    train_pos = np.flatnonzero(data.split.train)
    rng = np.random.default_rng(0)
    for ex in rng.choice(len(train_pos), size=40, replace=False):
        pos = train_pos[ex]
        u = data.user[pos]
        earlier = [p for p in train_pos[:ex] if data.user[p] == u]  # train events before, sorted
        history = []
        for p in earlier:
            it = data.catalog.ids[data.item[p]]
            history = [it] + [h for h in history if h != it]
        record = {"user_id": data.user_ids[u], "history": history[: cfg.history_len],
                  "invoice": data.context["invoice"][pos]}
        want = spec.encode("user", [record])
        for name, bags in enc.user_bags.items():
            got = take_bags(bags, np.array([ex]))
            assert got[0].tolist() == want[name][0].tolist(), name
    want_items = spec.encode("item", data.catalog.records())
    for name, bags in enc.item_bags.items():
        assert bags[0].tolist() == want_items[name][0].tolist()


def test_user_records_are_the_history_after_training(log):
    cfg = TrainConfig(interactions=str(log[0]), min_events=3, history_len=3)
    data = load_dataset(cfg)
    (record,) = user_records(data, data.split.test_users, cfg.history_len)
    # u1's training events newest first, distinct: a@30, d, c (f is held out)
    assert record == {"user_id": "u1", "history": ["a", "d", "c"]}
