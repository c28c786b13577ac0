"""Reading logs: every supported format, and one-line errors naming file, row and column."""

from __future__ import annotations

import gzip

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recserve.features.logs import DataError, data_attribution, lookup_ids, read_interactions, read_table

ROWS = "user_id,item_id,timestamp,invoice\n7,85123A,1291191960,1\n7,71053,1291191960,1\n8,00042,1291191999,2\n"


def test_csv_gz_parquet_and_jsonl_read_the_same(tmp_path):
    csv = tmp_path / "a.csv.gz"
    csv.write_bytes(gzip.compress(ROWS.encode()))
    table = pa.table({"user_id": [7, 7, 8], "item_id": ["85123A", "71053", "00042"],
                      "timestamp": [1291191960, 1291191960, 1291191999], "invoice": [1, 1, 2]})
    pq.write_table(table, tmp_path / "a.parquet")
    (tmp_path / "a.jsonl").write_text(
        "".join(f'{{"user_id": "{u}", "item_id": "{i}", "timestamp": {t}}}\n'
                for u, i, t in zip([7, 7, 8], ["85123A", "71053", "00042"], [1291191960, 1291191960, 1291191999])))
    for name in ("a.csv.gz", "a.parquet", "a.jsonl"):
        ev = read_interactions(tmp_path / name)
        assert ev.user_id.tolist() == ["7", "7", "8"]
        assert ev.item_id.tolist() == ["85123A", "71053", "00042"]  # ids stay strings: leading zeros kept
        assert ev.timestamp.dtype == np.int64 and ev.timestamp.tolist() == [1291191960, 1291191960, 1291191999]


def test_parquet_timestamps_with_sub_second_parts_floor_to_seconds(tmp_path):
    p = tmp_path / "ns.parquet"
    ts = pa.array([1291191960_123456789, 1291191961_999999999], type=pa.timestamp("ns", tz="UTC"))
    pq.write_table(pa.table({"user_id": ["1", "1"], "item_id": ["a", "b"], "timestamp": ts}), p)
    assert read_interactions(p).timestamp.tolist() == [1291191960, 1291191961]


def test_truncated_gzip_is_a_data_error(tmp_path):
    p = tmp_path / "cut.csv.gz"
    rows = "user_id,item_id,timestamp\n" + "".join(f"{i},item{i},{1291191960 + i}\n" for i in range(5000))
    p.write_bytes(gzip.compress(rows.encode())[:2000])
    with pytest.raises(DataError, match=r"cut\.csv\.gz: cannot read csv"):
        read_interactions(p)


def test_context_columns_read_as_text_with_missing_values(tmp_path):
    p = tmp_path / "ctx.csv"
    p.write_text("user_id,item_id,timestamp,store\n1,a,5,007\n1,b,6,\n")
    assert read_interactions(p, string_columns=("store",)).columns["store"].tolist() == ["007", None]
    with pytest.raises(DataError, match=r"ctx\.csv, column 'device': missing"):
        read_interactions(p, string_columns=("device",))


def test_iso_timestamps_are_unix_seconds(tmp_path):
    p = tmp_path / "iso.csv"
    p.write_text("user_id,item_id,timestamp\n1,a,2010-12-01T08:26:00\n1,b,2010-12-01 08:27:00\n")
    assert read_interactions(p).timestamp.tolist() == [1291191960, 1291192020]


@pytest.mark.parametrize(
    "content, message",
    [
        ("", r"bad\.csv: empty file"),
        ("user_id,item_id,timestamp\n", r"bad\.csv: no rows"),
        ("user_id,timestamp\n1,5\n", r"bad\.csv, column 'item_id': missing \(columns present: user_id, timestamp\)"),
        ("user_id,item_id,timestamp\n1,a,5\n1,b,2011-13-45\n", r"bad\.csv line 3, column 'timestamp': cannot parse '2011-13-45'"),
        ("user_id,item_id,timestamp\n1,a,5\n,b,6\n", r"bad\.csv line 3, column 'user_id': missing value"),
        ("user_id,item_id,timestamp\n1,a,5\n2,b,\n", r"bad\.csv line 3, column 'timestamp': missing timestamp"),
    ],
)
def test_bad_csv_gets_one_line_naming_file_row_column(tmp_path, content, message):
    p = tmp_path / "bad.csv"
    p.write_text(content)
    with pytest.raises(DataError, match=message) as e:
        read_interactions(p)
    assert "\n" not in str(e.value)


def test_bad_parquet_rows_are_zero_based(tmp_path):
    p = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"user_id": ["1", "2"], "item_id": ["a", None], "timestamp": [1, 2]}), p)
    with pytest.raises(DataError, match=r"bad\.parquet row 1, column 'item_id': missing value"):
        read_interactions(p)


def test_unknown_extension_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="unknown file type"):
        read_interactions(tmp_path / "x.xlsx")
    with pytest.raises(DataError, match="no such file"):
        read_interactions(tmp_path / "nope.csv")


def test_lookup_ids_names_the_first_unknown_id(tmp_path):
    vocab = np.array(["a", "c", "e"], dtype=object)
    assert lookup_ids(tmp_path / "t.csv", "item_id", np.array(["e", "a"], dtype=object), vocab).tolist() == [2, 0]
    with pytest.raises(DataError, match=r"t\.csv line 3, column 'item_id': unknown id 'z'"):
        lookup_ids(tmp_path / "t.csv", "item_id", np.array(["a", "z", "b"], dtype=object), vocab)


def test_read_table_and_attribution(tmp_path):
    p = tmp_path / "items.csv"
    p.write_text("item_id,description\n001,RED MUG\n")
    (tmp_path / "README.md").write_text("# Data\n\nIntro.\n\nLicense: CC BY 4.0\n\nAttribution: A. Author, 2012.\n")
    t = read_table(p, required=("item_id",), id_columns=("item_id",))
    assert t["item_id"].tolist() == ["001"] and t["description"].tolist() == ["RED MUG"]
    assert data_attribution(p) == "License: CC BY 4.0\n\nAttribution: A. Author, 2012."
