#!/usr/bin/env python3
"""Polls a bridge store for scripts/bench-bridge, every 100 ms, read-only.

    poll-store.py DB OUT [--until-head N] [--until-drained --sink NAME] --deadline S

Appends one JSON line per sample to OUT: {"t": unix ms, "head": highest outbox
position, "cursor": the sink's delivered_through or null}. Stops when every condition
given holds: the head reached N (--until-head), the sink's cursor reached a non-zero
head (--until-drained); exit status 0 then, 1 when the deadline (seconds) passed first. Each query is its own
read transaction (autocommit), so the poller never holds back the bridge's checkpoints.
"""

import argparse
import json
import sqlite3
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("db")
    p.add_argument("out")
    p.add_argument("--until-head", type=int)
    p.add_argument("--until-drained", action="store_true")
    p.add_argument("--sink")
    p.add_argument("--deadline", type=float, required=True)
    a = p.parse_args()
    if (a.until_head is None and not a.until_drained) or (a.until_drained and not a.sink):
        p.error("--until-head and/or --until-drained (which needs --sink)")
    end = time.monotonic() + a.deadline
    conn = None
    with open(a.out, "a", encoding="utf-8") as out:
        while time.monotonic() < end:
            try:
                if conn is None:
                    conn = sqlite3.connect(f"file:{a.db}?mode=ro", uri=True,
                                           isolation_level=None, timeout=5)
                head = conn.execute("SELECT COALESCE(MAX(position), 0) FROM events").fetchone()[0]
                cursor = None
                if a.sink:
                    row = conn.execute("SELECT delivered_through FROM sink_cursors WHERE sink = ?",
                                       (a.sink,)).fetchone()
                    cursor = row[0] if row else None
            except sqlite3.Error:
                # Not created yet, or busy: try again at the next tick.
                conn = None
                time.sleep(0.1)
                continue
            out.write(json.dumps({"t": int(time.time() * 1000), "head": head, "cursor": cursor}) + "\n")
            out.flush()
            reached = a.until_head is None or head >= a.until_head
            drained = not a.until_drained or (head > 0 and cursor is not None and cursor >= head)
            if reached and drained:
                return 0
            time.sleep(0.1)
    return 1


if __name__ == "__main__":
    sys.exit(main())
