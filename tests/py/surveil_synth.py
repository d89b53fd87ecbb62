"""The shipped DuckDB SQL (queries/) over a data set OUR code wrote, with the
generator's truth as the known answers.

Usage: surveil_synth.py QUERIES_DIR ROOT [--bridge]

ROOT is either a synthetic fleet written by `vitalmq surveil generate` (its truth in
ROOT/synth.json: what it wrote, per lot, in the queries' terms), or with --bridge a
data set written by a real bridge's parquet sink, its truth in ROOT/truth.json (written
by the Rust driver from what it sent). Runs EVERY .sql file of QUERIES_DIR with duckdb
and asserts the known answers; prints a JSON summary for the driver
(tests/surveil_synth.rs).
"""

import json
import os
import sys

import duckdb


def query(con, path, **variables):
    for k, v in variables.items():
        con.execute(f"SET VARIABLE {k} = ?", [v])
    with open(path) as f:
        cur = con.execute(f.read())
    names = [d[0] for d in cur.description]
    out = [dict(zip(names, r)) for r in cur.fetchall()]
    for k in variables:
        con.execute(f"RESET VARIABLE {k}")
    return out


def open_views(queries, root):
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute("SET VARIABLE surveillance_root = ?", [root])
    con.execute(open(os.path.join(queries, "views.sql")).read())
    return con


def rollup_agrees(con, queries):
    """rollup.sql over this data set gives the rate questions' answers of the raw
    tables, row for row, and leaves no raw row for them to read."""
    q = lambda name, **v: query(con, os.path.join(queries, name), **v)
    raw = [q("rates_by.sql"), q("outliers.sql"), q("outliers.sql", measure="dropped")]
    con.execute(open(os.path.join(queries, "rollup.sql")).read())
    assert con.execute("SELECT len(getvariable('rolled_weeks'))").fetchone()[0] > 0
    assert con.execute("SELECT count(*) FROM device_weeks_raw").fetchone()[0] == 0
    rolled = [q("rates_by.sql"), q("outliers.sql"), q("outliers.sql", measure="dropped")]
    assert rolled == raw, "rollup answers differ from the raw tables'"


def shipped(queries):
    return sorted(f for f in os.listdir(queries) if f.endswith(".sql") and f != "views.sql")


def synthetic(queries, root):
    with open(os.path.join(root, "synth.json")) as f:
        meta = json.load(f)
    truth = meta["truth"]
    con = open_views(queries, root)
    q = lambda name, **v: query(con, os.path.join(queries, name), **v)
    ran = set()

    # rates_by: per lot, every measure's count and both denominators equal the truth.
    rates = q("rates_by.sql")
    ran.add("rates_by.sql")
    get = {(r["measure"], r["dimension"], r["value"]): r for r in rates}
    measures = ["alerts", "device_alarms", "gaps", "refusals", "dropped"]
    for lot, counts in truth["lots"].items():
        for m in measures:
            r = get[(m, "lot", lot)]
            assert r["device_weeks"] == counts["device_weeks"], (lot, m, r, counts)
            assert r["readings"] == counts["readings"], (lot, m, r, counts)
            assert r["n"] == counts[m], (lot, m, r["n"], counts[m])
    for m in measures:
        total = sum(r["n"] for r in rates if r["measure"] == m and r["dimension"] == "lot")
        assert total == truth["fleet"][m], (m, total, truth["fleet"][m])
        weeks = sum(r["n"] for r in rates if r["measure"] == m and r["dimension"] == "week")
        assert weeks == truth["fleet"][m], (m, "by week", weeks)
    assert sorted(r["value"] for r in rates
                  if r["measure"] == "dropped" and r["dimension"] == "week") == truth["weeks"]

    # Row counts of each table as written.
    for table, n in (("events", truth["events"]), ("refusals", truth["refusals"]),
                     ("gaps", truth["gaps"]), ("alerts", truth["alerts"]),
                     ("scores", truth["scores"])):
        got = con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        assert got == n, (table, got, n)

    # outliers: the planted lot stands out for dropped messages, and nothing else does.
    top = q("outliers.sql", measure="dropped")
    ran.add("outliers.sql")
    defect = meta["defect_lot"]
    assert (top[0]["dimension"], top[0]["value"]) == ("lot", defect), top[:3]
    out = [(r["dimension"], r["value"]) for r in top if r["stands_out"]]
    assert out == [("lot", defect)], out
    for measure in ("gaps", "refusals"):
        t = q("outliers.sql", measure=measure, dimension="lot")
        assert t[0]["value"] == defect and t[0]["stands_out"], (measure, t)

    # PSI of SpO2 between the first and the last week: the same population, stable;
    # every reading is in one of the two periods when there are two weeks.
    weeks = truth["weeks"]
    psi = q("psi.sql", metric="spo2", reference_from=weeks[0], reference_to=weeks[0],
            compare_from=weeks[-1], compare_to=weeks[-1])[0]
    ran.add("psi.sql")
    if len(weeks) == 2:
        assert psi["reference_n"] + psi["compare_n"] == truth["fleet"]["readings"], psi
    assert psi["psi"] < 0.1, psi

    # PSI of the score: the live version against itself 0; the candidate (one point
    # higher) shifted.
    live, cand = meta["live_version"], meta["candidate_version"]
    same = q("psi_score.sql", reference_version=live, compare_version=live)[0]
    ran.add("psi_score.sql")
    assert same["reference_n"] == truth["fleet"]["live_scores"], same
    assert abs(same["psi"]) < 1e-9, same
    shifted = q("psi_score.sql", reference_version=live, compare_version=cand)[0]
    assert shifted["compare_n"] == truth["fleet"]["candidate_scores"], shifted
    assert shifted["psi"] > 0.25, shifted

    rollup_agrees(con, queries)
    ran.add("rollup.sql")
    missing = sorted(set(shipped(queries)) - ran)
    assert not missing, f"shipped SQL without a check here: {missing}"
    return {"outliers_dropped": top[:3], "psi_score": shifted["psi"], "psi_spo2": psi["psi"]}


def bridge(queries, root):
    with open(os.path.join(root, "truth.json")) as f:
        truth = json.load(f)
    con = open_views(queries, root)
    q = lambda name, **v: query(con, os.path.join(queries, name), **v)
    ran = set()
    events = con.execute("SELECT count(*), count(DISTINCT event_id) FROM events").fetchone()
    assert events == (truth["events"], truth["events"]), (events, truth)
    # The sink writes each event's boot epoch (dropped counts per (device, epoch)).
    no_epoch = con.execute("SELECT count(*) FROM events WHERE epoch IS NULL").fetchone()[0]
    assert no_epoch == 0, no_epoch
    rates = q("rates_by.sql")
    ran.add("rates_by.sql")
    get = {(r["measure"], r["dimension"], r["value"]): r for r in rates}
    for lot, counts in truth["lots"].items():
        r = get[("dropped", "lot", lot)]
        assert r["readings"] == counts["readings"], (lot, r, counts)
        assert r["n"] == counts["dropped"], (lot, r, counts)
        assert r["device_weeks"] == counts["device_weeks"], (lot, r, counts)
    top = q("outliers.sql", measure="dropped", dimension="lot")
    ran.add("outliers.sql")
    # A healthy simulated fleet drops nothing: one row per lot, none standing out.
    assert sorted(r["value"] for r in top) == sorted(truth["lots"]), top
    assert not any(r["stands_out"] for r in top), top
    weeks = sorted({r["value"] for r in rates if r["dimension"] == "week"})
    psi = q("psi.sql", metric="spo2", reference_from=weeks[0], reference_to=weeks[0],
            compare_from=weeks[-1], compare_to=weeks[-1])[0]
    ran.add("psi.sql")
    assert psi["reference_n"] > 0, psi
    score = q("psi_score.sql", reference_version="1.0.0", compare_version="1.0.0")[0]
    ran.add("psi_score.sql")
    assert score["psi"] is None or abs(score["psi"]) < 1e-9, score
    rollup_agrees(con, queries)
    ran.add("rollup.sql")
    missing = sorted(set(shipped(queries)) - ran)
    assert not missing, f"shipped SQL without a check here: {missing}"
    return {"dropped_by_lot": {lot: get[("dropped", "lot", lot)]["n"] for lot in truth["lots"]}}


def main():
    queries, root = sys.argv[1], sys.argv[2]
    result = bridge(queries, root) if "--bridge" in sys.argv[3:] else synthetic(queries, root)
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
