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
--    gaps and refusals in the week's partitions (name, size, modification time, and
--    the row counts of the Parquet footers: no data is read), CHAINED: a week's
--    fingerprint covers every earlier week too, because the dropped-message counters
--    of a week carry into the next (a late, redelivered, rewritten or deleted earlier
--    week changes every later fingerprint);
-- 2. computes every week whose fingerprint the rollup does not hold from the raw
--    tables (the weeks before it, which it holds, seed the counters) and writes it in a
--    directory of this run: `<root>/rollup_device_weeks/week=W/fp=F/run=R/` and
--    `<root>/rollup_dropped_carry/week=W/fp=F/run=R/` (the counter each boot of a device
--    reached in the week), then, last, the run's marker `<root>/rollup_runs/run=R/`.
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
    SELECT week, count(*) AS n FROM events GROUP BY week
    UNION ALL SELECT week, count(*) FROM alerts GROUP BY week
    UNION ALL SELECT week, count(*) FROM gaps GROUP BY week
    UNION ALL SELECT week, count(*) FROM refusals GROUP BY week
), weeks AS (
    SELECT week, md5(string_agg(part, ',' ORDER BY part)) AS own
    FROM files
    WHERE week IN (SELECT week FROM counts GROUP BY week HAVING sum(n) > 0)
    GROUP BY week
)
SELECT week,
       md5(string_agg(own, ',') OVER (ORDER BY week
           ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)) AS fp
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

-- The weeks whose current fingerprint the rollup holds (both tables), and the files
-- to read for them.
CREATE OR REPLACE MACRO rollup_files(table_name) AS TABLE
SELECT c.file
FROM rollup_complete() c JOIN rollup_source s USING (week, fp)
WHERE c.newest AND c.t = table_name
  AND (c.week, c.fp) IN (SELECT (week, fp) FROM rollup_complete() WHERE newest
                         GROUP BY week, fp HAVING count(DISTINCT t) = 2);

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

SET VARIABLE rolled_weeks = (SELECT coalesce(list(DISTINCT week), []::VARCHAR[])
                             FROM rollup_source
                             WHERE (week, fp) IN (
                                 SELECT (week, fp) FROM rollup_complete() WHERE newest
                                 GROUP BY week, fp HAVING count(DISTINCT t) = 2));
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

COPY (SELECT getvariable('rollup_run') AS run, count(*) AS weeks FROM rollup_source
      WHERE NOT list_contains(getvariable('rolled_weeks'), week))
TO (getvariable('surveillance_root') || '/rollup_runs')
   (FORMAT parquet, PARTITION_BY (run), OVERWRITE_OR_IGNORE);

-- 3. Every week is held now: read them all from the rollup.
SET VARIABLE rolled_weeks = (SELECT coalesce(list(DISTINCT week), []::VARCHAR[])
                             FROM rollup_source
                             WHERE (week, fp) IN (
                                 SELECT (week, fp) FROM rollup_complete() WHERE newest
                                 GROUP BY week, fp HAVING count(DISTINCT t) = 2));
SET VARIABLE rolled_device_weeks = (SELECT coalesce(list(file), []::VARCHAR[])
                                    FROM rollup_files('device_weeks'));
SET VARIABLE rolled_dropped_carry = (SELECT coalesce(list(file), []::VARCHAR[])
                                     FROM rollup_files('dropped_carry'));

-- The run directories no longer read (delete them when convenient).
CREATE OR REPLACE VIEW rollup_obsolete AS
SELECT DISTINCT regexp_extract(file, '^(.*/run=[^/]+)/[^/]+$', 1) AS dir
FROM glob(getvariable('surveillance_root') || '/rollup_*/week=*/fp=*/run=*/*.parquet')
WHERE file NOT IN (SELECT unnest(getvariable('rolled_device_weeks')))
  AND file NOT IN (SELECT unnest(getvariable('rolled_dropped_carry')))
ORDER BY dir;
