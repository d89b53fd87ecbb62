-- The rollup: the per device-week rows every rate question reads (`device_weeks` of
-- views.sql), kept as Parquet next to the data set, so the questions over a year read
-- tens of thousands of rows instead of hundreds of millions. Run after views.sql:
--
--   SET VARIABLE surveillance_root = '/data/surveillance';
--   .read queries/views.sql
--   .read queries/rollup.sql
--   .read queries/outliers.sql       -- and any other question
--
-- What it does, each time it runs:
-- 1. fingerprints every week of the data set: the Parquet files of events, alerts, gaps
--    and refusals in the week's partitions and their row counts (Parquet metadata: no
--    data is read);
-- 2. brings the rollup up to date: the weeks from the first one whose fingerprint is
--    not in the rollup (new, or changed since: a late or redelivered file) to the last
--    are computed from the raw tables and written, each under its fingerprint
--    (`<root>/rollup/device_weeks/week=W/fp=F/`, and the counters each boot of a
--    device reached in `<root>/rollup/dropped_carry/week=W/fp=F/`, which the next week's
--    dropped-message increases start from). A changed week rewrites every later week
--    too: its dropped counters carry into them. Rows of an older fingerprint stay on
--    disk and are never read (delete them when convenient);
-- 3. points this session's `device_weeks` at the rollup for every week whose
--    fingerprint it holds (the first weeks, up to a week that is missing), and at the
--    raw tables for the rest (none right after step 2).
-- The answers are those of views.sql alone, row for row (tests/py/surveil_queries.py
-- checks it). It writes into the data set's root: run it where that is allowed, one
-- session at a time. Weeks with no rows (the sink's `week=0000-W00` zero-row files)
-- are not part of the rollup.

-- 1. The fingerprint of each week that has rows.
CREATE OR REPLACE TEMP TABLE rollup_source AS
SELECT week, md5(string_agg(part, ',' ORDER BY part)) AS fp
FROM (
    SELECT week, 'events:' || count(*) AS part, count(*) AS n FROM events GROUP BY week
    UNION ALL
    SELECT week, 'alerts:' || count(*), count(*) FROM alerts GROUP BY week
    UNION ALL
    SELECT week, 'gaps:' || count(*), count(*) FROM gaps GROUP BY week
    UNION ALL
    SELECT week, 'refusals:' || count(*), count(*) FROM refusals GROUP BY week
    UNION ALL
    SELECT regexp_extract(file, '/week=([^/]+)/[^/]+$', 1),
           regexp_extract(file, '([^/]+/week=[^/]+/[^/]+)$', 1), 0
    FROM (
        SELECT file FROM glob(getvariable('surveillance_root') || '/events/*/*.parquet')
        UNION ALL
        SELECT file FROM glob(getvariable('surveillance_root') || '/alerts/*/*.parquet')
        UNION ALL
        SELECT file FROM glob(getvariable('surveillance_root') || '/gaps/*/*.parquet')
        UNION ALL
        SELECT file FROM glob(getvariable('surveillance_root') || '/refusals/*/*.parquet')
    )
)
GROUP BY week
HAVING sum(n) > 0;

-- The weeks (in order) whose fingerprint the rollup holds, up to the first missing one.
CREATE OR REPLACE MACRO rollup_fresh() AS TABLE
WITH stored AS (
    SELECT s.week AS week, s.fp AS fp
    FROM (
        SELECT DISTINCT t, regexp_extract(file, '/week=([^/]+)/fp=([^/]+)/[^/]+$',
                                          ['week', 'fp']) AS s
        FROM (
            SELECT 'device_weeks' AS t, file
            FROM glob(getvariable('surveillance_root')
                      || '/rollup_device_weeks/*/*/*.parquet')
            UNION ALL
            SELECT 'dropped_carry', file
            FROM glob(getvariable('surveillance_root')
                      || '/rollup_dropped_carry/*/*/*.parquet')
        )
    )
    GROUP BY ALL
    HAVING count(DISTINCT t) = 2
)
SELECT week, fp
FROM (
    SELECT r.week, r.fp,
           bool_and(s.week IS NOT NULL) OVER (ORDER BY r.week
               ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS fresh
    FROM rollup_source r
    LEFT JOIN stored s ON s.week = r.week AND s.fp = r.fp
)
WHERE fresh;

-- The rollup's files, read only for the (week, fingerprint) pairs in `rolled_keys`.
-- Each directory holds a placeholder partition (week=none) so the globs always match.
CREATE OR REPLACE MACRO rollup_read(t) AS TABLE
SELECT * EXCLUDE (fp)
FROM read_parquet(getvariable('surveillance_root') || '/rollup_' || t || '/*/*/*.parquet',
                  hive_partitioning = true, union_by_name = true,
                  hive_types = {'week': VARCHAR, 'fp': VARCHAR})
WHERE list_contains(getvariable('rolled_keys'), week || '/' || fp);

COPY (SELECT * FROM device_weeks_raw WHERE false
      UNION ALL BY NAME SELECT 'none' AS week, 'none' AS fp)
TO (getvariable('surveillance_root') || '/rollup_device_weeks')
   (FORMAT parquet, PARTITION_BY (week, fp), OVERWRITE_OR_IGNORE);
COPY (SELECT NULL::VARCHAR AS device, NULL::BIGINT AS epoch, NULL::BIGINT AS highest,
             NULL::BIGINT AS last, 'none' AS week, 'none' AS fp)
TO (getvariable('surveillance_root') || '/rollup_dropped_carry')
   (FORMAT parquet, PARTITION_BY (week, fp), OVERWRITE_OR_IGNORE);

-- Reads the fresh weeks from the rollup, and the others raw (seeded from the rollup).
SET VARIABLE rolled_weeks = (SELECT coalesce(list(week ORDER BY week), []::VARCHAR[])
                             FROM rollup_fresh());
SET VARIABLE rolled_keys = (SELECT coalesce(list(week || '/' || fp), []::VARCHAR[])
                            FROM rollup_fresh());

CREATE OR REPLACE VIEW dropped_seed AS
SELECT device, epoch,
       CASE WHEN epoch IS NULL THEN arg_max(last, week) ELSE max(highest) END AS dropped
FROM rollup_read('dropped_carry')
WHERE device IS NOT NULL
GROUP BY device, epoch;

CREATE OR REPLACE VIEW device_weeks_rolled AS
SELECT * FROM rollup_read('device_weeks');

-- 2. Writes the weeks not fresh: their device-week rows (and one marker row per week,
-- with no device and no measure, so a week without rows is rolled up all the same)
-- and the highest and last counter of each (device, epoch) in the week.
COPY (
    SELECT d.*, s.fp
    FROM (SELECT * FROM device_weeks_raw
          UNION ALL BY NAME
          SELECT week, false AS exposed FROM rollup_source
          WHERE NOT list_contains(getvariable('rolled_weeks'), week)) d
    JOIN rollup_source s USING (week)
)
TO (getvariable('surveillance_root') || '/rollup_device_weeks')
   (FORMAT parquet, PARTITION_BY (week, fp), OVERWRITE_OR_IGNORE);

COPY (
    SELECT c.*, s.fp
    FROM (SELECT week, device, epoch, max(dropped) AS highest,
                 arg_max(dropped, (observed_at, event_id)) AS last
          FROM events
          WHERE kind = 'status' AND dropped IS NOT NULL
            AND NOT list_contains(getvariable('rolled_weeks'), week)
          GROUP BY ALL
          UNION ALL BY NAME
          SELECT week FROM rollup_source
          WHERE NOT list_contains(getvariable('rolled_weeks'), week)) c
    JOIN rollup_source s USING (week)
)
TO (getvariable('surveillance_root') || '/rollup_dropped_carry')
   (FORMAT parquet, PARTITION_BY (week, fp), OVERWRITE_OR_IGNORE);

-- 3. Every week just written is fresh now: read them all from the rollup.
SET VARIABLE rolled_weeks = (SELECT coalesce(list(week ORDER BY week), []::VARCHAR[])
                             FROM rollup_fresh());
SET VARIABLE rolled_keys = (SELECT coalesce(list(week || '/' || fp), []::VARCHAR[])
                            FROM rollup_fresh());
