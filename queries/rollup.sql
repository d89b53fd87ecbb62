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
-- 1. fingerprints every week of the data set from the Parquet files of events, alerts,
--    gaps and refusals in the week's partitions (name, size, modification time to the
--    second, and the row counts of the Parquet footers: no data is read) and of the
--    definitions the rows come from, CHAINED: a week's
--    fingerprint covers every earlier week too, because the dropped-message counters
--    of a week carry into the next (a late, redelivered, rewritten or deleted earlier
--    week changes every later fingerprint);
-- 2. computes every week from the first whose fingerprint the rollup does not hold
--    from the raw tables (the weeks before it seed the counters) and writes it in a
--    directory of this run: `<root>/rollup_device_weeks/week=W/fp=F/run=R/` and
--    `<root>/rollup_dropped_carry/week=W/fp=F/run=R/` (the counter each boot of a device
--    reached in the week), then, last, the run's marker `<root>/rollup_runs/run=R/`,
--    written only when every file of the run reads back whole.
--    Files of a run without a marker (interrupted) are never read; a run never writes
--    into a directory that another run wrote;
-- 3. points this session's `device_weeks` at the rollup's files of every week (those of
--    its newest complete run per week and fingerprint), as an explicit file list.
-- The answers are those of views.sql alone, row for row and type for type
-- (tests/py/surveil_queries.py checks it). It writes into the data set's root. The
-- session reads the data set as it was when rollup.sql ran: run it again for newer
-- files (the raw questions, psi.sql, read the tables live). `rollup_obsolete` lists
-- the run directories no longer read (older fingerprints, interrupted runs, weeks
-- deleted from the data set): delete them when convenient (queries/README.md), and
-- delete a week's rollup directories with the week itself (retention).

-- 1. The chained fingerprint of each week that has rows.
CREATE OR REPLACE TEMP TABLE rollup_source AS
WITH files AS (
    SELECT regexp_extract(filename, '/week=([^/]+)/[^/]+$', 1) AS week,
           regexp_extract(filename, '([^/]+/week=[^/]+/[^/]+)$', 1) || ':' || size || ':'
               || epoch_ms(last_modified) AS part
    FROM read_blob([getvariable('surveillance_root') || '/events/*/*.parquet',
                    getvariable('surveillance_root') || '/alerts/*/*.parquet',
                    getvariable('surveillance_root') || '/gaps/*/*.parquet',
                    getvariable('surveillance_root') || '/refusals/*/*.parquet'])
), counts AS (
    SELECT week, 'events' AS t, count(*) AS n FROM events GROUP BY week
    UNION ALL SELECT week, 'alerts', count(*) FROM alerts GROUP BY week
    UNION ALL SELECT week, 'gaps', count(*) FROM gaps GROUP BY week
    UNION ALL SELECT week, 'refusals', count(*) FROM refusals GROUP BY week
), weeks AS (
    SELECT week, md5(string_agg(part, ',' ORDER BY part)) AS own
    FROM (SELECT week, part FROM files
          UNION ALL
          SELECT week, t || ':' || n FROM counts)
    WHERE week IN (SELECT week FROM counts GROUP BY week HAVING sum(n) > 0)
    GROUP BY week
), definitions AS (
    -- The definitions the rollup's rows come from: another version of them (a newer
    -- checkout on the same data set) makes every week's fingerprint another.
    SELECT md5('vitalmq-rollup/v1;' || string_agg(sql, ';' ORDER BY view_name)) AS digest
    FROM duckdb_views()
    WHERE view_name IN ('device_weeks_raw', 'dropped_increases')
)
SELECT week,
       md5((SELECT digest FROM definitions) || ',' || string_agg(own, ',') OVER (
           ORDER BY week ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)) AS fp
FROM weeks;

-- This run's id: the time, then random (later runs sort later).
SET VARIABLE rollup_run = strftime(now(), '%Y%m%dT%H%M%S') || '-'
                          || substr(gen_random_uuid()::VARCHAR, 1, 8);

-- Every rollup file of a complete run (its marker exists), newest run first per
-- (table, week, fingerprint).
CREATE OR REPLACE MACRO rollup_complete() AS TABLE
WITH data AS (
    SELECT file, regexp_extract(file,
               '/rollup_([a-z_]+)/week=([^/]+)/fp=([^/]+)/run=([^/]+)/[^/]+$',
               ['t', 'week', 'fp', 'run']) AS k
    FROM glob(getvariable('surveillance_root') || '/rollup_*/week=*/fp=*/run=*/*.parquet')
), done AS (
    SELECT DISTINCT regexp_extract(file, '/rollup_runs/run=([^/]+)/', 1) AS run
    FROM glob(getvariable('surveillance_root') || '/rollup_runs/run=*/*')
)
SELECT file, k.t AS t, k.week AS week, k.fp AS fp, k.run AS run,
       k.run = max(k.run) OVER (PARTITION BY k.t, k.week, k.fp) AS newest
FROM data
WHERE k.run IN (SELECT run FROM done);

-- The weeks the rollup holds under their current fingerprint (both tables), up to the
-- first week it does not hold: a later week's counters must never seed an earlier one.
CREATE OR REPLACE MACRO rollup_held() AS TABLE
WITH stored AS (
    SELECT week, fp FROM rollup_complete() WHERE newest
    GROUP BY week, fp HAVING count(DISTINCT t) = 2
), judged AS (
    SELECT s.week, s.fp, st.week IS NOT NULL AS stored
    FROM rollup_source s LEFT JOIN stored st USING (week, fp)
)
SELECT week, fp FROM judged
WHERE stored AND week < coalesce((SELECT min(week) FROM judged WHERE NOT stored), '9999');

-- The files to read for the held weeks.
CREATE OR REPLACE MACRO rollup_files(table_name) AS TABLE
SELECT c.file
FROM rollup_complete() c JOIN rollup_held() h USING (week, fp)
WHERE c.newest AND c.t = table_name;

-- The rollup's rows from an explicit list of files (never a glob: an interrupted
-- run's files are not in it), without the marker rows; none when the list is empty.
CREATE OR REPLACE VIEW device_weeks_rolled AS
SELECT * FROM query(CASE WHEN len(getvariable('rolled_device_weeks')) > 0
    THEN 'SELECT * EXCLUDE (fp, run, marker) FROM read_parquet(
              getvariable(''rolled_device_weeks''), hive_partitioning = true,
              hive_types = {''week'': VARCHAR, ''fp'': VARCHAR, ''run'': VARCHAR})
          WHERE NOT marker'
    ELSE 'SELECT * FROM device_weeks_raw WHERE false' END);

CREATE OR REPLACE VIEW dropped_seed AS
SELECT * FROM query(CASE WHEN len(getvariable('rolled_dropped_carry')) > 0
    THEN 'SELECT device, epoch,
                 CASE WHEN epoch IS NULL THEN arg_max(last, week)
                      ELSE max(highest) END AS dropped
          FROM read_parquet(getvariable(''rolled_dropped_carry''),
                            hive_partitioning = true,
                            hive_types = {''week'': VARCHAR, ''fp'': VARCHAR,
                                          ''run'': VARCHAR})
          WHERE NOT marker
          GROUP BY device, epoch'
    ELSE 'SELECT NULL::VARCHAR AS device, NULL::BIGINT AS epoch,
                 NULL::BIGINT AS dropped WHERE false' END);

SET VARIABLE rolled_weeks = (SELECT coalesce(list(week), []::VARCHAR[])
                             FROM rollup_held());
SET VARIABLE rolled_device_weeks = (SELECT coalesce(list(file), []::VARCHAR[])
                                    FROM rollup_files('device_weeks'));
SET VARIABLE rolled_dropped_carry = (SELECT coalesce(list(file), []::VARCHAR[])
                                     FROM rollup_files('dropped_carry'));

-- 2. Writes the weeks not held: their device-week rows (and one marker row per week,
-- so a week without rows is rolled up all the same) and the highest and last counter
-- of each (device, epoch) in the week, then the run's marker.
COPY (
    SELECT d.*, s.fp, getvariable('rollup_run') AS run
    FROM (SELECT *, false AS marker FROM device_weeks_raw
          UNION ALL BY NAME
          SELECT week, false AS exposed, true AS marker FROM rollup_source
          WHERE NOT list_contains(getvariable('rolled_weeks'), week)) d
    JOIN rollup_source s USING (week)
)
TO (getvariable('surveillance_root') || '/rollup_device_weeks')
   (FORMAT parquet, PARTITION_BY (week, fp, run), OVERWRITE_OR_IGNORE);

COPY (
    SELECT c.*, s.fp, getvariable('rollup_run') AS run
    FROM (SELECT week, device, epoch, max(dropped) AS highest,
                 arg_max(dropped, (observed_at, event_id)) AS last, false AS marker
          FROM events
          WHERE kind = 'status' AND dropped IS NOT NULL
            AND NOT list_contains(getvariable('rolled_weeks'), week)
          GROUP BY ALL
          UNION ALL BY NAME
          SELECT week, true AS marker FROM rollup_source
          WHERE NOT list_contains(getvariable('rolled_weeks'), week)) c
    JOIN rollup_source s USING (week)
)
TO (getvariable('surveillance_root') || '/rollup_dropped_carry')
   (FORMAT parquet, PARTITION_BY (week, fp, run), OVERWRITE_OR_IGNORE);

-- The marker, only once every file of the run reads back whole (a torn file makes
-- this statement fail, and the run stays incomplete); none when nothing was written.
SET VARIABLE rollup_written = (SELECT count(*) FROM rollup_source
                               WHERE NOT list_contains(getvariable('rolled_weeks'), week));
COPY (
    SELECT getvariable('rollup_run') AS run, count(DISTINCT filename) AS files,
           CASE WHEN count(DISTINCT filename) <> 2 * getvariable('rollup_written')
                THEN error('rollup run ' || getvariable('rollup_run')
                           || ': not every file was written')
           END AS checked
    FROM query(CASE WHEN getvariable('rollup_written') > 0
        THEN 'SELECT filename FROM read_parquet(
                  getvariable(''surveillance_root'') || ''/rollup_*/week=*/fp=*/run=''
                      || getvariable(''rollup_run'') || ''/*.parquet'', filename = true)'
        ELSE 'SELECT NULL::VARCHAR AS filename WHERE false' END)
    HAVING getvariable('rollup_written') > 0
)
TO (getvariable('surveillance_root') || '/rollup_runs')
   (FORMAT parquet, PARTITION_BY (run), OVERWRITE_OR_IGNORE);

-- 3. Every week is held now: read them all from the rollup.
SET VARIABLE rolled_weeks = (SELECT coalesce(list(week), []::VARCHAR[])
                             FROM rollup_held());
SET VARIABLE rolled_device_weeks = (SELECT coalesce(list(file), []::VARCHAR[])
                                    FROM rollup_files('device_weeks'));
SET VARIABLE rolled_dropped_carry = (SELECT coalesce(list(file), []::VARCHAR[])
                                     FROM rollup_files('dropped_carry'));

-- The run directories no longer read by this session: older fingerprints, runs
-- without a marker, weeks deleted from the data set. Delete them only while no other
-- session uses the rollup (another session may still read an older fingerprint, and
-- a run in progress has no marker yet).
CREATE OR REPLACE VIEW rollup_obsolete AS
SELECT DISTINCT regexp_extract(file, '^(.*/run=[^/]+)/[^/]+$', 1) AS dir
FROM glob(getvariable('surveillance_root') || '/rollup_*/week=*/fp=*/run=*/*.parquet')
WHERE file NOT IN (SELECT unnest(getvariable('rolled_device_weeks')))
  AND file NOT IN (SELECT unnest(getvariable('rolled_dropped_carry')))
ORDER BY dir;
