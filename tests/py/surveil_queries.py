"""The shipped DuckDB SQL (queries/) against a small simulated fleet with known answers.

Usage: surveil_queries.py QUERIES_DIR WORK_DIR

Builds the fleet as rows (WORK_DIR/fleet.json, the same rows `vitalmq surveil --rows`
reads), writes it as the surveillance Parquet data set exactly as docs/surveillance.md
pins it (pyarrow; Hive partitions `week=YYYY-Www`, files `part-<first>-<last>.parquet`),
runs EVERY .sql file of QUERIES_DIR with duckdb, asserts the known answers and prints
the results as one JSON object (query name -> rows) for the Rust driver
(tests/surveil_queries.rs) to compare with the command's.

The fleet: 40 devices, 4 lots of 10 (LOT-A..LOT-D), 3 ISO weeks (2026-W47..W49), four
vitals readings and two status messages per device-week. LOT-C has the planted defect:
its devices drop 5 messages a week (the others 1) and open a gap every week (the others
one gap in W48 for every fifth device). dev-00001 reboots in W48 (its dropped counter
goes 2 -> 1, epoch 1 -> 2); dev-00002 reboots there too, but its new boot's counter
(3) is not lower than the old one's (1): only the `epoch` column shows the boot, so
its 3 messages count whole (a guess from a falling counter would count 2). Devices 1-5 report an unapproved model. SpO2 shifts down in W49; the
NEWS2 candidate version 1.1.0 scores 3 points above the live 1.0.0. LOT-E (5 more
devices) has a bad key: all its messages are refused, it has no events, and must stand
out for refusals all the same. One operational alert (source `ops`) is not counted.
"""

import datetime as dt
import json
import math
import os
import shutil
import sys

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

UTC = dt.timezone.utc
MONDAY = dt.datetime(2026, 11, 16, tzinfo=UTC)
WEEKS = 3
TS = pa.timestamp("ms", tz="UTC")

EVENTS = pa.schema([
    pa.field("event_id", pa.string(), nullable=False),
    ("kind", pa.string()), ("observed_at", TS), ("received_at", TS),
    ("device", pa.string()), ("subject", pa.string()), ("site", pa.string()),
    ("region", pa.string()), ("lot", pa.string()), ("hardware_model", pa.string()),
    ("fw", pa.string()), ("model", pa.string()), ("model_status", pa.string()),
    ("spo2", pa.float64()), ("pulse", pa.float64()), ("resp", pa.float64()),
    ("temp", pa.float64()), ("sbp", pa.float64()), ("dbp", pa.float64()),
    ("q", pa.float64()), ("implausible", pa.bool_()), ("battery", pa.float64()),
    ("dropped", pa.int64()), ("alarm_code", pa.string()), ("alarm_level", pa.string()),
    ("alarm_active", pa.bool_()), ("epoch", pa.int64()),
])
ALERTS = pa.schema([
    ("alert_id", pa.string()), ("state", pa.string()), ("rule", pa.string()),
    ("rule_version", pa.string()), ("severity", pa.string()), ("source", pa.string()),
    ("role", pa.string()), ("at", TS), ("device", pa.string()), ("subject", pa.string()),
    ("site", pa.string()), ("region", pa.string()), ("lot", pa.string()),
    ("hardware_model", pa.string()), ("fw", pa.string()), ("model", pa.string()),
    ("model_status", pa.string()), ("rule_set_version", pa.string()),
])
SCORES = pa.schema([
    ("score_id", pa.string()), ("model", pa.string()), ("version", pa.string()),
    ("config_sha256", pa.string()), ("role", pa.string()), ("observed_at", TS),
    ("subject", pa.string()), ("site", pa.string()), ("region", pa.string()),
    ("device", pa.string()), ("lot", pa.string()), ("hardware_model", pa.string()),
    ("fw", pa.string()), ("aggregate", pa.int32()), ("risk", pa.string()),
    ("complete", pa.bool_()), ("red", pa.bool_()), ("missing", pa.string()),
])
REFUSALS = pa.schema([
    ("at", TS), ("device", pa.string()), ("site", pa.string()), ("region", pa.string()),
    ("lot", pa.string()), ("hardware_model", pa.string()), ("fw", pa.string()),
    ("reason", pa.string()),
])
GAPS = pa.schema([
    ("device", pa.string()), ("site", pa.string()), ("region", pa.string()),
    ("lot", pa.string()), ("hardware_model", pa.string()), ("fw", pa.string()),
    ("epoch", pa.int64()), ("from_seq", pa.int64()), ("to_seq", pa.int64()),
    ("state", pa.string()), ("opened_at", TS),
])
TABLES = {"events": (EVENTS, "observed_at"), "alerts": (ALERTS, "at"),
          "scores": (SCORES, "observed_at"), "refusals": (REFUSALS, "at"),
          "gaps": (GAPS, "opened_at")}


def ms(t):
    return int(t.timestamp() * 1000)


def at(week, day, hour, minute=0):
    return ms(MONDAY + dt.timedelta(days=7 * week + day, hours=hour, minutes=minute))


def device_facts(i):
    return {
        "device": f"dev-{i:05d}",
        "site": "site-1" if i <= 20 else "site-2",
        "region": "eu-west" if i % 2 else "eu-north",
        "lot": "LOT-" + "ABCDE"[(i - 1) // 10],
        "hardware_model": "hw-a" if (i // 2) % 2 == 0 else "hw-b",
        "fw": "5.12.1" if i % 4 in (0, 1) else "5.13.0",
    }


def model_of(i):
    if i <= 5:
        return {"model": "arrhythmia-net/2.2.0", "model_status": "unapproved"}
    return {"model": "arrhythmia-net/2.1.0", "model_status": "approved"}


def dropped_series(i):
    if i == 1:
        return [0, 1, 2, 1, 1, 2]  # reboots in W48: 2 -> 1 is a new boot
    if i == 2:
        return [0, 1, 1, 3, 3, 4]  # reboots in W48: 1 -> 3, a new boot all the same
    if 21 <= i <= 30:
        return [0, 5, 5, 10, 10, 15]  # LOT-C
    return [0, 1, 1, 2, 2, 3]


REBOOT = 3  # index of the first status of the new boot (dev-00001 and dev-00002)


def epoch_of(i, status_index):
    return 2 if i in (1, 2) and status_index >= REBOOT else 1


def fleet():
    """The fleet as rows: table -> list of dicts (times in ms since the epoch, UTC)."""
    rows = {t: [] for t in TABLES}
    for i in range(1, 41):
        d = device_facts(i)
        m = model_of(i)
        subject = f"sp-{i:05d}"
        drops = dropped_series(i)
        for w in range(WEEKS):
            spo2 = [97, 95, 93, 97] if w < 2 else [93, 91, 93, 95]
            for k, s in enumerate(spo2):
                t = at(w, 1, 8 + 2 * k, i)
                rows["events"].append({
                    "event_id": f"ev-{i}-{w}-v{k}", "kind": "vitals", "observed_at": t,
                    "received_at": t + 500, **d, "subject": subject, **m,
                    "spo2": float(s), "pulse": 80.0, "resp": 16.0, "temp": 37.0,
                    "sbp": 120.0, "dbp": 75.0, "q": 0.95, "implausible": False,
                    "epoch": epoch_of(i, 2 * w),
                })
            for k in range(2):
                t = at(w, 2 + 3 * k, 9, i)
                rows["events"].append({
                    "event_id": f"ev-{i}-{w}-s{k}", "kind": "status", "observed_at": t,
                    "received_at": t + 500, **d, "subject": subject, **m,
                    "battery": 0.8, "dropped": drops[2 * w + k],
                    "epoch": epoch_of(i, 2 * w + k),
                })
            # LOT-C opens a gap every week, every fifth other device one in W48.
            if 21 <= i <= 30 or (i % 5 == 0 and w == 1):
                rows["gaps"].append({
                    **d, "epoch": 1, "from_seq": 100 * w + 50, "to_seq": 100 * w + 52,
                    "state": "closed" if w < 2 else "open", "opened_at": at(w, 3, 6, i),
                })
            if i <= 4:
                for k in range(2):
                    rows["refusals"].append({
                        "at": at(w, 4, 7 + k, i), **d, "reason": "bad_signature"})
            for version, role, shift in (("1.0.0", "live", 0), ("1.1.0", "shadow", 3)):
                for k in range(2):
                    agg = (i + w + k) % 4 + shift
                    rows["scores"].append({
                        "score_id": f"sc-{version}-{i}-{w}-{k}", "model": "news2",
                        "version": version, "config_sha256": "ab" * 32, "role": role,
                        "observed_at": at(w, 1, 15 + k, i), "subject": subject,
                        **d, "aggregate": agg,
                        "risk": "low" if agg <= 4 else "medium",
                        "complete": True, "red": False, "missing": "",
                    })
        if i <= 6:  # a device alarm raised and cleared in W48
            for k, active in enumerate((True, False)):
                t = at(1, 3, 10 + k, i)
                rows["events"].append({
                    "event_id": f"ev-{i}-alarm-{k}", "kind": "alarm", "observed_at": t,
                    "received_at": t + 500, **d, "subject": subject, **m,
                    "alarm_code": "arrhythmia", "alarm_level": "urgent",
                    "alarm_active": active, "epoch": epoch_of(i, 3),
                })
        alert = {**d, **m, "subject": subject, "rule_version": "3",
                 "severity": "high"}
        if i <= 8:  # raised and resolved in W49
            for k, state in enumerate(("open", "resolved")):
                rows["alerts"].append({
                    **alert, "alert_id": f"al-{i}", "state": state, "rule": "spo2-low",
                    "source": "rule", "role": "live", "at": at(2, 4, 10 + k, i)})
        if i <= 3:  # shadow outputs are never delivered: not counted
            rows["alerts"].append({
                **alert, "alert_id": f"sh-{i}", "state": "open", "rule": "spo2-low",
                "source": "rule", "role": "shadow", "at": at(2, 4, 12, i)})
        if i == 9:  # opened and escalated: one alert
            for k, state in enumerate(("open", "escalated")):
                rows["alerts"].append({
                    **alert, "alert_id": "nd-9", "state": state, "rule": "no-data",
                    "source": "no-data", "role": None, "at": at(0, 5, 10 + k, i)})
    # LOT-E (dev-00041..45) signs with a bad key: every message refused, no events at
    # all. Its device-weeks come from its refusals, so it can stand out.
    for i in range(41, 46):
        for w in range(WEEKS):
            for k in range(4):
                rows["refusals"].append({
                    "at": at(w, 2, 7 + k, i), **device_facts(i), "reason": "unknown_key"})
    # An operational alert (store trouble): not a clinical alert, not counted.
    rows["alerts"].append({
        **device_facts(10), "alert_id": "op-1", "state": "open", "rule": "ops/store",
        "source": "ops", "role": "live", "at": at(0, 5, 12)})
    # A refusal whose topic named no device.
    rows["refusals"].append({"at": at(2, 6, 1), "device": None, "reason": "malformed"})
    return rows


def iso_week(t_ms):
    y, w, _ = dt.datetime.fromtimestamp(t_ms / 1000, UTC).isocalendar()
    return f"{y}-W{w:02d}"


def write_parquet(rows, root):
    for table, (schema, time_col) in TABLES.items():
        by_week = {}
        for n, row in enumerate(rows[table], start=1):
            by_week.setdefault(iso_week(row[time_col]), []).append((n, row))
        for week, part in sorted(by_week.items()):
            first, last = part[0][0], part[-1][0]
            cols = {}
            for f in schema:
                values = [r.get(f.name) for _, r in part]
                if pa.types.is_timestamp(f.type):
                    values = [None if v is None else dt.datetime.fromtimestamp(v / 1000, UTC)
                              for v in values]
                cols[f.name] = values
            path = os.path.join(root, table, f"week={week}")
            os.makedirs(path, exist_ok=True)
            pq.write_table(pa.Table.from_pydict(cols, schema=schema),
                           os.path.join(path, f"part-{first}-{last}.parquet"))


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


def session(queries, root, rollup):
    """A fresh DuckDB session over the data set: views.sql, then rollup.sql if asked."""
    con = duckdb.connect()
    con.execute("SET VARIABLE surveillance_root = ?", [root])
    con.execute(open(os.path.join(queries, "views.sql")).read())
    if rollup:
        con.execute(open(os.path.join(queries, "rollup.sql")).read())
    return con


def answers(con, queries):
    """Every rate question's answer with its column types, and device_weeks itself, as
    compared between the raw tables and the rollup."""
    def q(name, **variables):
        for k, v in variables.items():
            con.execute(f"SET VARIABLE {k} = ?", [v])
        cur = con.execute(open(os.path.join(queries, name)).read())
        out = ([(d[0], str(d[1])) for d in cur.description], cur.fetchall())
        for k in variables:
            con.execute(f"RESET VARIABLE {k}")
        return out
    def sql(text):
        cur = con.execute(text)
        return ([(d[0], str(d[1])) for d in cur.description], cur.fetchall())
    return {
        "rates": q("rates_by.sql"),
        "rates_dropped_lot": q("rates_by.sql", measure="dropped", dimension="lot"),
        "outliers": q("outliers.sql"),
        "outliers_dropped": q("outliers.sql", measure="dropped"),
        "fleet": sql("SELECT * FROM fleet_rates ORDER BY measure"),
        "device_weeks": sql("SELECT * FROM device_weeks ORDER BY ALL"),
    }


def rate(a, measure, dimension, value):
    names = [n for n, _ in a["rates"][0]]
    for row in a["rates"][1]:
        r = dict(zip(names, row))
        if (r["measure"], r["dimension"], r["value"]) == (measure, dimension, value):
            return r["n"]
    raise KeyError((measure, dimension, value))


def rollup_data_files(root):
    out = []
    for table in ("rollup_device_weeks", "rollup_dropped_carry"):
        for dirpath, _, files in os.walk(os.path.join(root, table)):
            out += [os.path.join(dirpath, f) for f in files]
    return sorted(out)


def write_rows(root, table, week, name, rows):
    schema, _ = TABLES[table]
    cols = {}
    for f in schema:
        values = [r.get(f.name) for r in rows]
        if pa.types.is_timestamp(f.type):
            values = [None if v is None else dt.datetime.fromtimestamp(v / 1000, UTC)
                      for v in values]
        cols[f.name] = values
    path = os.path.join(root, table, f"week={week}", name)
    pq.write_table(pa.Table.from_pydict(cols, schema=schema), path)
    return path


def agrees(queries, root):
    """rollup.sql in a fresh session answers as views.sql alone does, and reads no raw
    row for the rate questions."""
    raw = answers(session(queries, root, False), queries)
    con = session(queries, root, True)
    assert con.execute("SELECT count(*) FROM device_weeks_raw").fetchone()[0] == 0
    rolled = answers(con, queries)
    for k in raw:
        assert rolled[k] == raw[k], (k, rolled[k][0], raw[k][0])
    return raw, con


def check_rollup(queries, work, rows):
    """rollup.sql gives the raw tables' answers, row for row and type for type, in every
    state a data set goes through: first run, nothing new, a late file in a rolled week
    (that week and every later one recomputed, the counters carried from the week
    before), the late file gone again, a file rewritten under its name, an interrupted
    run's broken file, a week deleted by retention."""
    src = os.path.join(work, "surveillance")
    root = os.path.join(work, "rollup-states")
    shutil.copytree(src, root)
    raw, con = agrees(queries, root)
    weeks = con.execute("SELECT getvariable('rolled_weeks')").fetchone()[0]
    assert sorted(weeks) == ["2026-W47", "2026-W48", "2026-W49"], weeks
    written = rollup_data_files(root)
    assert len(written) == 2 * 3, written  # one file per table and week
    stamps = {f: os.stat(f).st_mtime_ns for f in written}

    # Nothing new: nothing written, nothing rewritten, no run marker left behind.
    runs = sorted(os.listdir(os.path.join(root, "rollup_runs")))
    agrees(queries, root)
    assert rollup_data_files(root) == written
    assert all(os.stat(f).st_mtime_ns == t for f, t in stamps.items())
    assert sorted(os.listdir(os.path.join(root, "rollup_runs"))) == runs

    # A middle week's rollup deleted (by hand, or by retention before its data): it is
    # recomputed from the week before it, never seeded from the weeks after it.
    for table in ("rollup_device_weeks", "rollup_dropped_carry"):
        shutil.rmtree(os.path.join(root, table, "week=2026-W48"))
    again, _ = agrees(queries, root)
    assert again == raw
    written = rollup_data_files(root)
    stamps = {f: os.stat(f).st_mtime_ns for f in written}

    # Late rows for W48: a LOT-C status whose counter went up by 7 (dev-00021, boot 1:
    # 10 -> 17 before the W49 statuses at 10 and 15, which then add nothing), and a
    # refusal of dev-00001.
    late = [
        write_rows(root, "events", "2026-W48", "part-9001-9001.parquet", [{
            **device_facts(21), **model_of(21), "event_id": "ev-late-21",
            "kind": "status", "observed_at": at(1, 6, 9, 21),
            "received_at": at(1, 6, 9, 21) + 500, "subject": "sp-00021",
            "battery": 0.7, "dropped": 17, "epoch": 1}]),
        write_rows(root, "refusals", "2026-W48", "part-9002-9002.parquet", [{
            "at": at(1, 6, 10, 1), **device_facts(1), "reason": "bad_signature"}]),
    ]
    late_raw, _ = agrees(queries, root)
    # +7 in W48; W49's statuses (10, 15) now add nothing: 5 fewer there.
    assert rate(late_raw, "dropped", "lot", "LOT-C") == 150 + 7 - 5
    assert rate(late_raw, "dropped", "week", "2026-W48") == \
        rate(raw, "dropped", "week", "2026-W48") + 7
    assert rate(late_raw, "dropped", "week", "2026-W49") == \
        rate(raw, "dropped", "week", "2026-W49") - 5
    assert rate(late_raw, "refusals", "lot", "LOT-A") == 24 + 1
    after = rollup_data_files(root)
    # W48 and W49 under new fingerprints (chained), W47 untouched, nothing overwritten.
    assert len(after) == len(written) + 2 * 2, after
    assert all(os.stat(f).st_mtime_ns == t for f, t in stamps.items())

    # The late files gone again: the earlier fingerprints, and answers, come back.
    for f in late:
        os.remove(f)
    back, _ = agrees(queries, root)
    assert back == raw

    # A file rewritten under its own name, same rows, another lot for dev-00021 (a
    # redelivery after a registry change): its size and time change the fingerprint.
    w48 = os.path.join(root, "events", "week=2026-W48")
    [name] = [f for f in os.listdir(w48)]
    table = pq.read_table(os.path.join(w48, name)).to_pylist()
    for r in table:
        if r["device"] == "dev-00021":
            r["lot"] = "LOT-Z"
    events_schema, _ = TABLES["events"]
    path = os.path.join(w48, name)
    pq.write_table(pa.Table.from_pylist(table, schema=events_schema), path)
    t = os.stat(path).st_mtime + 5
    os.utime(path, (t, t))
    rewritten, con = agrees(queries, root)
    assert rewritten != raw

    # An interrupted run: a broken file in a run directory without a marker, for the
    # current fingerprint and newer than the complete run, is never read, and is
    # listed as obsolete.
    [fp] = con.execute("SELECT fp FROM rollup_source WHERE week = '2026-W49'").fetchone()
    broken = os.path.join(root, "rollup_device_weeks", "week=2026-W49", f"fp={fp}",
                          "run=99991231T235959-dead")
    os.makedirs(broken)
    with open(os.path.join(broken, "data_0.parquet"), "wb") as f:
        f.write(b"PAR1 half a file")
    _, con = agrees(queries, root)
    obsolete = [r[0] for r in con.execute("SELECT dir FROM rollup_obsolete").fetchall()]
    assert broken in obsolete, obsolete

    # Retention deletes a week: every later week's fingerprint changes with it.
    for table in TABLES:
        shutil.rmtree(os.path.join(root, table, "week=2026-W47"), ignore_errors=True)
    gone, con = agrees(queries, root)
    assert gone != rewritten
    weeks = con.execute("SELECT getvariable('rolled_weeks')").fetchone()[0]
    assert sorted(weeks) == ["2026-W48", "2026-W49"], weeks


def main():
    queries, work = sys.argv[1], sys.argv[2]
    rows = fleet()
    with open(os.path.join(work, "fleet.json"), "w") as f:
        json.dump(rows, f)
    root = os.path.join(work, "surveillance")
    write_parquet(rows, root)

    # The data set reads back as written (pyarrow), partitions and all.
    back = pq.read_table(os.path.join(root, "events")).num_rows
    assert back == len(rows["events"]), (back, len(rows["events"]))

    con = duckdb.connect()
    con.execute("SET VARIABLE surveillance_root = ?", [root])
    con.execute(open(os.path.join(queries, "views.sql")).read())
    shipped = sorted(f for f in os.listdir(queries) if f.endswith(".sql") and f != "views.sql")
    q = lambda name, **v: query(con, os.path.join(queries, name), **v)
    results = {}
    ran = set()

    # rates_by: every measure and dimension at once, then one variable-filtered view.
    rates = q("rates_by.sql")
    ran.add("rates_by.sql")
    results["rates_by"] = rates
    get = {(r["measure"], r["dimension"], r["value"]): r for r in rates}
    # Exposure: 40 devices x 3 weeks, 4 readings each.
    for lot in "ABCD":
        r = get[("dropped", "lot", f"LOT-{lot}")]
        assert (r["device_weeks"], r["readings"]) == (30, 120), r
    # Dropped: per-boot counter increases, per (device, epoch); the reboots of
    # dev-00001 (4 in all) and dev-00002 (1 + 4 = 5) add their new boots' values.
    assert get[("dropped", "lot", "LOT-A")]["n"] == 8 * 3 + 4 + 5, get[("dropped", "lot", "LOT-A")]
    assert get[("dropped", "lot", "LOT-B")]["n"] == 30
    assert get[("dropped", "lot", "LOT-C")]["n"] == 150
    assert get[("dropped", "lot", "LOT-C")]["per_device_week"] == 5.0
    assert get[("dropped", "week", "2026-W48")]["n"] == 2 + 3 + 28 * 1 + 10 * 5, \
        get[("dropped", "week", "2026-W48")]
    assert get[("gaps", "lot", "LOT-C")]["n"] == 30
    assert get[("gaps", "lot", "LOT-A")]["n"] == 2
    assert get[("gaps", "week", "2026-W48")]["n"] == 10 + 6
    assert get[("refusals", "lot", "LOT-A")]["n"] == 24
    none = get[("refusals", "lot", "(none)")]
    assert (none["n"], none["device_weeks"], none["per_device_week"]) == (1, 0, None), none
    assert get[("device_alarms", "model", "arrhythmia-net/2.2.0 [unapproved]")]["n"] == 5
    assert get[("device_alarms", "model", "arrhythmia-net/2.1.0 [approved]")]["n"] == 1
    assert get[("device_alarms", "model_status", "unapproved")]["device_weeks"] == 15
    assert get[("alerts", "week", "2026-W49")]["n"] == 8  # shadow outputs excluded
    assert get[("alerts", "week", "2026-W47")]["n"] == 1  # open + escalated: one alert
    assert get[("alerts", "lot", "LOT-A")]["n"] == 9
    lot_e = get[("refusals", "lot", "LOT-E")]
    assert (lot_e["n"], lot_e["device_weeks"], lot_e["readings"]) == (60, 15, 0), lot_e
    assert get[("refusals", "firmware", "5.12.1")]["n"] > 0  # refusals carry firmware
    only = q("rates_by.sql", measure="gaps", dimension="lot")
    assert [r["value"] for r in only] == ["LOT-A", "LOT-B", "LOT-C", "LOT-D", "LOT-E"], only

    # outliers: LOT-C stands out for dropped messages and for gaps, found by the query.
    top = q("outliers.sql", measure="dropped")
    ran.add("outliers.sql")
    assert (top[0]["dimension"], top[0]["value"]) == ("lot", "LOT-C"), top[:3]
    assert top[0]["stands_out"] and top[0]["ratio"] > 2, top[0]
    assert [r["value"] for r in top if r["stands_out"]] == ["LOT-C"], \
        [r for r in top if r["stands_out"]]
    gaps_top = q("outliers.sql", measure="gaps", dimension="lot")
    assert gaps_top[0]["value"] == "LOT-C" and gaps_top[0]["stands_out"], gaps_top
    refused_top = q("outliers.sql", measure="refusals", dimension="lot")
    assert refused_top[0]["value"] == "LOT-E" and refused_top[0]["stands_out"], refused_top
    assert [r["value"] for r in refused_top if r["stands_out"]] == ["LOT-E"], refused_top
    results["outliers_refusals"] = refused_top
    results["outliers_dropped"] = top
    results["outliers_all"] = q("outliers.sql")

    # PSI of SpO2: identical weeks ~0, the shifted week far above 0.25.
    same = q("psi.sql", metric="spo2", reference_from="2026-W47", reference_to="2026-W47",
             compare_from="2026-W48", compare_to="2026-W48")[0]
    ran.add("psi.sql")
    assert same["reference_n"] == 160 and same["compare_n"] == 160, same
    assert abs(same["psi"]) < 1e-9, same
    shifted = q("psi.sql", metric="spo2", reference_from="2026-W47",
                reference_to="2026-W48", compare_from="2026-W49", compare_to="2026-W49")[0]
    e = 0.0001
    expected = ((0.25 - e) * math.log(0.25 / e) + (0.5 - 0.25) * math.log(0.5 / 0.25)
                + (e - 0.5) * math.log(e / 0.5))
    assert shifted["psi"] > 0.25 and abs(shifted["psi"] - expected) < 1e-5, (shifted, expected)
    results["psi_same"] = same
    results["psi_shifted"] = shifted

    # PSI of the score between versions: a version against itself 0, the candidate > 0.25.
    self_psi = q("psi_score.sql", reference_version="1.0.0", compare_version="1.0.0")[0]
    ran.add("psi_score.sql")
    assert self_psi["reference_n"] == 240 and abs(self_psi["psi"]) < 1e-9, self_psi
    cand = q("psi_score.sql", reference_version="1.0.0", compare_version="1.1.0")[0]
    assert cand["compare_n"] == 240 and cand["psi"] > 0.25, cand
    results["psi_score_self"] = self_psi
    results["psi_score_candidate"] = cand

    check_rollup(queries, work, rows)
    ran.add("rollup.sql")

    missing = sorted(set(shipped) - ran)
    assert not missing, f"shipped SQL without a test here: {missing}"
    print(json.dumps(results, default=str))


if __name__ == "__main__":
    main()
