-- The surveillance data set (docs/surveillance.md) as DuckDB views, and the
-- definitions every question shares. Run first, after naming the data set's root:
--
--   SET VARIABLE surveillance_root = '/data/surveillance';
--   .read queries/views.sql
--
-- Base views, one per table, all partitions (`week` comes from the Hive path):
--   events, alerts, scores, refusals, gaps
-- Every table directory must hold at least one file (DuckDB binds a view to the
-- files it finds): the sink writes a zero-row file per table when it starts.
--
-- Shared definitions (the same in `vitalmq surveil`, src/surveil_cmd/):
--   dims         a row's grouping values as text, NULL spelled '(none)'; `model` is
--                reported as '<name/version> [<model_status>]'.
--   exposure     one row per device-week (and per firmware/model seen in it) in which
--                the device left any row (events, refusals, gaps), with its readings
--                (vitals events): the denominators.
--   occurrences  per measure, device-week and group, how many: the numerators.
--       alerts         alerts raised (distinct alert_id with a state 'open' row), any
--                      clinical source, shadow outputs excluded (they are never
--                      delivered), operational alerts (source 'ops') excluded
--       device_alarms  alarm events raised by the device (alarm_active = true)
--       gaps           sequence gaps opened (the gap's week is that of opened_at)
--       refusals       refused messages
--       dropped        messages the device dropped from its own buffer: `dropped` of a
--                      status event is a per-boot cumulative counter, so each status
--                      adds its increase over the highest value of the same (device,
--                      epoch) before it (the first status of a boot adds its whole
--                      value; a lower value adds nothing). Rows without an epoch
--                      (files written before the column existed) fall back to a guess:
--                      per device, a value lower than the previous one is a new boot.
--   rates        per measure, dimension (firmware, model, model_status, lot, region,
--                hardware_model, week) and value: device_weeks, readings, n, and the
--                rates per device-week and per 1000 readings.

CREATE OR REPLACE VIEW events AS
SELECT * FROM read_parquet(getvariable('surveillance_root') || '/events/**/*.parquet',
                           hive_partitioning = true, union_by_name = true);
CREATE OR REPLACE VIEW alerts AS
SELECT * FROM read_parquet(getvariable('surveillance_root') || '/alerts/**/*.parquet',
                           hive_partitioning = true, union_by_name = true);
CREATE OR REPLACE VIEW scores AS
SELECT * FROM read_parquet(getvariable('surveillance_root') || '/scores/**/*.parquet',
                           hive_partitioning = true, union_by_name = true);
CREATE OR REPLACE VIEW refusals AS
SELECT * FROM read_parquet(getvariable('surveillance_root') || '/refusals/**/*.parquet',
                           hive_partitioning = true, union_by_name = true);
CREATE OR REPLACE VIEW gaps AS
SELECT * FROM read_parquet(getvariable('surveillance_root') || '/gaps/**/*.parquet',
                           hive_partitioning = true, union_by_name = true);

-- A grouping value as text ('(none)' when absent).
CREATE OR REPLACE MACRO dim_text(x) AS coalesce(CAST(x AS VARCHAR), '(none)');
-- The reported model with how the registry judged it.
CREATE OR REPLACE MACRO model_text(model, status) AS
    dim_text(model) || ' [' || dim_text(status) || ']';

-- Every row of events, refusals and gaps that names a device: a device-week counts
-- when the device left any row in it, so a group whose messages were all refused (a
-- lot with a bad key has no events) still has exposure and can stand out.
CREATE OR REPLACE VIEW exposure AS
SELECT device, week, fw, model, model_status, lot, region, hardware_model,
       count(*) FILTER (WHERE kind = 'vitals') AS readings
FROM (
    SELECT device, week, fw, model, model_status, lot, region, hardware_model, kind
    FROM events
    UNION ALL
    SELECT device, week, fw, NULL, NULL, lot, region, hardware_model, NULL
    FROM refusals
    UNION ALL
    SELECT device, week, fw, NULL, NULL, lot, region, hardware_model, NULL
    FROM gaps
)
WHERE device IS NOT NULL
GROUP BY ALL;

CREATE OR REPLACE VIEW dropped_increases AS
SELECT device, week, fw, model, model_status, lot, region, hardware_model,
       CASE WHEN epoch IS NOT NULL THEN greatest(dropped - coalesce(highest, 0), 0)
            WHEN previous IS NULL OR dropped < previous THEN dropped
            ELSE dropped - previous END AS increase
FROM (
    SELECT *,
           max(dropped) OVER (PARTITION BY device, epoch ORDER BY observed_at, event_id
                              ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS highest,
           lag(dropped) OVER (PARTITION BY device, epoch ORDER BY observed_at, event_id)
               AS previous
    FROM events
    WHERE kind = 'status' AND dropped IS NOT NULL
);

CREATE OR REPLACE VIEW occurrences AS
SELECT 'alerts' AS measure, device, week, fw, model, model_status, lot, region,
       hardware_model, count(DISTINCT alert_id) AS n
FROM alerts
WHERE state = 'open' AND coalesce(role, 'live') <> 'shadow'
  AND coalesce(source, '') <> 'ops'
GROUP BY ALL
UNION ALL
SELECT 'device_alarms', device, week, fw, model, model_status, lot, region,
       hardware_model, count(*)
FROM events
WHERE kind = 'alarm' AND alarm_active
GROUP BY ALL
UNION ALL
SELECT 'gaps', device, week, fw, NULL, NULL, lot, region, hardware_model, count(*)
FROM gaps
GROUP BY ALL
UNION ALL
SELECT 'refusals', device, week, fw, NULL, NULL, lot, region, hardware_model, count(*)
FROM refusals
GROUP BY ALL
UNION ALL
SELECT 'dropped', device, week, fw, model, model_status, lot, region, hardware_model,
       sum(increase)
FROM dropped_increases
GROUP BY ALL;

-- Both sides in long form: one row per (dimension, value) a row belongs to.
CREATE OR REPLACE VIEW exposure_long AS
UNPIVOT (
    SELECT device, week AS week_key, readings,
           dim_text(fw) AS firmware, model_text(model, model_status) AS model,
           dim_text(model_status) AS model_status, dim_text(lot) AS lot,
           dim_text(region) AS region, dim_text(hardware_model) AS hardware_model,
           dim_text(week) AS week
    FROM exposure
) ON firmware, model, model_status, lot, region, hardware_model, week
INTO NAME dimension VALUE value;

CREATE OR REPLACE VIEW occurrences_long AS
UNPIVOT (
    SELECT measure, n,
           dim_text(fw) AS firmware, model_text(model, model_status) AS model,
           dim_text(model_status) AS model_status, dim_text(lot) AS lot,
           dim_text(region) AS region, dim_text(hardware_model) AS hardware_model,
           dim_text(week) AS week
    FROM occurrences
) ON firmware, model, model_status, lot, region, hardware_model, week
INTO NAME dimension VALUE value;

CREATE OR REPLACE VIEW measures AS
SELECT * FROM (VALUES ('alerts'), ('device_alarms'), ('gaps'), ('refusals'), ('dropped'))
    AS m(measure);

CREATE OR REPLACE VIEW rates AS
WITH exp AS (
    SELECT dimension, value, count(DISTINCT (device, week_key)) AS device_weeks,
           sum(readings) AS readings
    FROM exposure_long
    GROUP BY ALL
), occ AS (
    SELECT measure, dimension, value, sum(n) AS n
    FROM occurrences_long
    GROUP BY ALL
), grid AS (
    SELECT m.measure, exp.dimension, exp.value FROM measures m CROSS JOIN exp
    UNION
    SELECT measure, dimension, value FROM occ
)
SELECT g.measure, g.dimension, g.value,
       coalesce(exp.device_weeks, 0) AS device_weeks,
       coalesce(exp.readings, 0) AS readings,
       coalesce(occ.n, 0) AS n,
       CASE WHEN exp.device_weeks > 0 THEN coalesce(occ.n, 0) / exp.device_weeks END
           AS per_device_week,
       CASE WHEN exp.readings > 0 THEN 1000.0 * coalesce(occ.n, 0) / exp.readings END
           AS per_1000_readings
FROM grid g
LEFT JOIN exp USING (dimension, value)
LEFT JOIN occ USING (measure, dimension, value);

-- Fleet totals per measure (each device-week once).
CREATE OR REPLACE VIEW fleet_rates AS
WITH exp AS (
    SELECT count(DISTINCT (device, week)) AS device_weeks, sum(readings) AS readings
    FROM exposure
)
SELECT m.measure, exp.device_weeks, exp.readings,
       coalesce((SELECT sum(n) FROM occurrences o WHERE o.measure = m.measure), 0) AS n
FROM measures m CROSS JOIN exp;

-- Fixed bins of the vital signs for the population stability index: the NEWS2
-- (RCP 2017) bands of each parameter (SpO2 scale 1), so a shift between bins is a
-- shift between clinical bands; dbp, which NEWS2 does not score, by the blood
-- pressure categories (<60, 60-79, 80-89, 90-99, >=100). A value v is in the bin
-- with lo <= v < hi (NULL = unbounded).
CREATE OR REPLACE VIEW vital_bins AS
SELECT * FROM (VALUES
    ('spo2', 1, NULL, 92.0), ('spo2', 2, 92.0, 94.0), ('spo2', 3, 94.0, 96.0),
    ('spo2', 4, 96.0, NULL),
    ('resp', 1, NULL, 9.0), ('resp', 2, 9.0, 12.0), ('resp', 3, 12.0, 21.0),
    ('resp', 4, 21.0, 25.0), ('resp', 5, 25.0, NULL),
    ('pulse', 1, NULL, 41.0), ('pulse', 2, 41.0, 51.0), ('pulse', 3, 51.0, 91.0),
    ('pulse', 4, 91.0, 111.0), ('pulse', 5, 111.0, 131.0), ('pulse', 6, 131.0, NULL),
    ('temp', 1, NULL, 35.05), ('temp', 2, 35.05, 36.05), ('temp', 3, 36.05, 38.05),
    ('temp', 4, 38.05, 39.05), ('temp', 5, 39.05, NULL),
    ('sbp', 1, NULL, 91.0), ('sbp', 2, 91.0, 101.0), ('sbp', 3, 101.0, 111.0),
    ('sbp', 4, 111.0, 220.0), ('sbp', 5, 220.0, NULL),
    ('dbp', 1, NULL, 60.0), ('dbp', 2, 60.0, 80.0), ('dbp', 3, 80.0, 90.0),
    ('dbp', 4, 90.0, 100.0), ('dbp', 5, 100.0, NULL)
) AS b(metric, bin, lo, hi);

-- The share of an empty bin in a PSI (instead of 0, whose logarithm is undefined).
CREATE OR REPLACE MACRO psi_epsilon() AS 0.0001;
