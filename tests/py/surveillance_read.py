"""Reads a surveillance data set (docs/surveillance.md) back with pyarrow and DuckDB,
independently of the Rust code that wrote it, and prints what it found as JSON:
per table the column names and types each reader sees, the row count each reader
gets, how many distinct row ids there are, and the subjects found.

Usage: surveillance_read.py ROOT
"""

import json
import os
import sys

import duckdb
import pyarrow.dataset as ds

TABLES = ["events", "alerts", "scores", "refusals", "gaps"]
# The id that makes a row unique, per table (None: no single id column).
IDS = {"events": "event_id", "alerts": None, "scores": "score_id", "refusals": None, "gaps": None}


def pyarrow_table(path):
    dataset = ds.dataset(path, format="parquet", partitioning="hive")
    table = dataset.to_table()
    columns = {f.name: str(f.type) for f in dataset.schema}
    return table, columns


def main():
    root = sys.argv[1]
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    out = {}
    for name in TABLES:
        path = os.path.join(root, name)
        if not os.path.isdir(path):
            continue
        table, pa_columns = pyarrow_table(path)
        glob = os.path.join(path, "*", "*.parquet")
        rel = f"read_parquet('{glob}', hive_partitioning = true)"
        described = con.execute(f"DESCRIBE SELECT * FROM {rel}").fetchall()
        duck_columns = {row[0]: row[1] for row in described}
        duck_rows = con.execute(f"SELECT count(*) FROM {rel}").fetchone()[0]
        entry = {
            "pyarrow_columns": pa_columns,
            "duckdb_columns": duck_columns,
            "pyarrow_rows": table.num_rows,
            "duckdb_rows": duck_rows,
            "weeks": sorted(set(table.column("week").to_pylist())),
        }
        id_column = IDS[name]
        if id_column:
            entry["distinct_ids"] = con.execute(
                f"SELECT count(DISTINCT {id_column}) FROM {rel}"
            ).fetchone()[0]
        if "subject" in pa_columns:
            entry["subjects"] = sorted(
                s for s in set(table.column("subject").to_pylist()) if s is not None
            )
        if name == "events":
            # The planted defect: dropped messages per lot. Status rows carry a per-boot
            # cumulative counter, so a boot's messages are its highest value.
            entry["dropped_by_lot"] = {
                lot: int(n)
                for lot, n in con.execute(
                    f"SELECT lot, coalesce(sum(top), 0) FROM (SELECT lot, device, epoch, "
                    f"max(dropped) AS top FROM {rel} GROUP BY ALL) GROUP BY lot"
                ).fetchall()
                if lot is not None
            }
        out[name] = entry
    json.dump(out, sys.stdout, sort_keys=True)


if __name__ == "__main__":
    main()
