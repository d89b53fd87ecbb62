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
--   device_weeks one row per device, ISO week and group (firmware, model, lot, ...):
--                whether the device left any row of events, refusals or gaps in it,
--                its readings, and its count of each measure. Every rate question
--                reads only this, computed from the raw tables here, or read from the
--                rollup (rollup.sql) for the weeks it holds: the same rows either way.
--   exposure     the device-weeks (and groups) in which the device left any row
--                (events, refusals, gaps), with its readings (vitals events): the
--                denominators.
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

-- The weeks a rollup (rollup.sql) holds and this session reads from it; none here:
-- every question reads the raw tables. rollup.sql sets it (and redefines the two
-- `*_rolled` views below) after bringing the rollup up to date.
SET VARIABLE rolled_weeks = []::VARCHAR[];

-- Per (device, epoch), the counter to start each boot's increases from, as of the end
-- of the rolled-up weeks: the highest value (`dropped`) and, for rows without an epoch,
-- the last one. None without a rollup.
CREATE OR REPLACE VIEW dropped_seed AS
SELECT NULL::VARCHAR AS device, NULL::BIGINT AS epoch, NULL::BIGINT AS dropped
WHERE false;

-- The increases of the status rows of the weeks not rolled up (see `dropped` above),
-- each boot continuing from its seed.
CREATE OR REPLACE VIEW dropped_increases AS
SELECT device, week, fw, model, model_status, lot, region, hardware_model,
       CASE WHEN epoch IS NOT NULL THEN greatest(dropped - coalesce(highest, 0), 0)
            WHEN previous IS NULL OR dropped < previous THEN dropped
            ELSE dropped - previous END AS increase
FROM (
    SELECT *,
           max(dropped) OVER (PARTITION BY device, epoch
                              ORDER BY seed DESC, observed_at, event_id
                              ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS highest,
           lag(dropped) OVER (PARTITION BY device, epoch
                              ORDER BY seed DESC, observed_at, event_id) AS previous
    FROM (
        SELECT device, epoch, week, observed_at, event_id, dropped, fw, model,
               model_status, lot, region, hardware_model, false AS seed
        FROM events
        WHERE kind = 'status' AND dropped IS NOT NULL
          AND NOT list_contains(getvariable('rolled_weeks'), week)
        UNION ALL
        SELECT device, epoch, NULL, NULL, NULL, dropped, NULL, NULL, NULL, NULL, NULL,
               NULL, true
        FROM dropped_seed
    )
)
WHERE NOT seed;

-- One row per device, week and group (fw, model, model_status, lot, region,
-- hardware_model) of the weeks not rolled up: `exposed` when the device left any row
-- of events, refusals or gaps in it (a device-week counts when the device left any row,
-- so a group whose messages were all refused, a lot with a bad key, still has exposure
-- and can stand out), its readings (vitals events), and per measure its occurrences
-- (NULL: no row of that measure in the group).
CREATE OR REPLACE VIEW device_weeks_raw AS
SELECT device, week, fw, model, model_status, lot, region, hardware_model,
       bool_or(exposed) AS exposed, sum(readings)::BIGINT AS readings,
       sum(alerts)::BIGINT AS alerts, sum(device_alarms)::BIGINT AS device_alarms,
       sum(gaps)::BIGINT AS gaps, sum(refusals)::BIGINT AS refusals,
       sum(dropped)::BIGINT AS dropped
FROM (
    SELECT device, week, fw, model, model_status, lot, region, hardware_model,
           true AS exposed, count(*) FILTER (WHERE kind = 'vitals') AS readings,
           NULL::BIGINT AS alerts,
           nullif(count(*) FILTER (WHERE kind = 'alarm' AND alarm_active), 0)
               AS device_alarms,
           NULL::BIGINT AS gaps, NULL::BIGINT AS refusals, NULL::BIGINT AS dropped
    FROM events
    WHERE NOT list_contains(getvariable('rolled_weeks'), week)
    GROUP BY ALL
    UNION ALL
    SELECT device, week, fw, NULL, NULL, lot, region, hardware_model, true, 0, NULL,
           NULL, NULL, count(*), NULL
    FROM refusals
    WHERE NOT list_contains(getvariable('rolled_weeks'), week)
    GROUP BY ALL
    UNION ALL
    SELECT device, week, fw, NULL, NULL, lot, region, hardware_model, true, 0, NULL,
           NULL, count(*), NULL, NULL
    FROM gaps
    WHERE NOT list_contains(getvariable('rolled_weeks'), week)
    GROUP BY ALL
    UNION ALL
    SELECT device, week, fw, model, model_status, lot, region, hardware_model, false, 0,
           count(DISTINCT alert_id), NULL, NULL, NULL, NULL
    FROM alerts
    WHERE state = 'open' AND coalesce(role, 'live') <> 'shadow'
      AND coalesce(source, '') <> 'ops'
      AND NOT list_contains(getvariable('rolled_weeks'), week)
    GROUP BY ALL
    UNION ALL
    SELECT device, week, fw, model, model_status, lot, region, hardware_model, false, 0,
           NULL, NULL, NULL, NULL, sum(increase)
    FROM dropped_increases
    GROUP BY ALL
)
GROUP BY ALL;

-- The rolled-up weeks' rows (rollup.sql); none here.
CREATE OR REPLACE VIEW device_weeks_rolled AS
SELECT * FROM device_weeks_raw WHERE false;

CREATE OR REPLACE VIEW device_weeks AS
SELECT * FROM device_weeks_raw
UNION ALL BY NAME
SELECT * FROM device_weeks_rolled;

-- The questions below are table macros over a relation shaped like `device_weeks`,
-- named by a string (`query_table`), so `rates` and `fleet_rates` each compute
-- `device_weeks` once (a MATERIALIZED CTE) however many times they use it.

-- Denominators: the device-weeks (and groups) with exposure.
CREATE OR REPLACE MACRO exposure_of(rel) AS TABLE
SELECT device, week, fw, model, model_status, lot, region, hardware_model,
       coalesce(readings, 0) AS readings
FROM query_table(rel)
WHERE exposed AND device IS NOT NULL;

-- Numerators: one row per measure, device, week and group with rows of the measure.
CREATE OR REPLACE MACRO occurrences_of(rel) AS TABLE
UNPIVOT (
    SELECT device, week, fw, model, model_status, lot, region, hardware_model,
           alerts, device_alarms, gaps, refusals, dropped
    FROM query_table(rel)
) ON alerts, device_alarms, gaps, refusals, dropped
INTO NAME measure VALUE n;

-- A row's grouping values as text, one column per dimension.
CREATE OR REPLACE MACRO dims_of(rel) AS TABLE
SELECT *, dim_text(fw) AS d_firmware, model_text(model, model_status) AS d_model,
       dim_text(model_status) AS d_model_status, dim_text(lot) AS d_lot,
       dim_text(region) AS d_region, dim_text(hardware_model) AS d_hardware_model,
       dim_text(week) AS d_week
FROM query_table(rel);

-- Both sides in long form: one row per (dimension, value) a row belongs to.
CREATE OR REPLACE MACRO exposure_long_of(rel) AS TABLE
WITH e AS (SELECT * FROM exposure_of(rel)), d AS (SELECT * FROM dims_of('e'))
UNPIVOT (
    SELECT device, week AS week_key, readings, d_firmware AS firmware, d_model AS model,
           d_model_status AS model_status, d_lot AS lot, d_region AS region,
           d_hardware_model AS hardware_model, d_week AS week
    FROM d
) ON firmware, model, model_status, lot, region, hardware_model, week
INTO NAME dimension VALUE value;

CREATE OR REPLACE MACRO occurrences_long_of(rel) AS TABLE
WITH o AS (SELECT * FROM occurrences_of(rel)), d AS (SELECT * FROM dims_of('o'))
UNPIVOT (
    SELECT measure, n, d_firmware AS firmware, d_model AS model,
           d_model_status AS model_status, d_lot AS lot, d_region AS region,
           d_hardware_model AS hardware_model, d_week AS week
    FROM d
) ON firmware, model, model_status, lot, region, hardware_model, week
INTO NAME dimension VALUE value;

CREATE OR REPLACE VIEW measures AS
SELECT * FROM (VALUES ('alerts'), ('device_alarms'), ('gaps'), ('refusals'), ('dropped'))
    AS m(measure);

CREATE OR REPLACE MACRO rates_of(rel) AS TABLE
WITH exp AS (
    SELECT dimension, value, count(DISTINCT (device, week_key)) AS device_weeks,
           sum(readings) AS readings
    FROM exposure_long_of(rel)
    GROUP BY ALL
), occ AS (
    SELECT measure, dimension, value, sum(n) AS n
    FROM occurrences_long_of(rel)
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
CREATE OR REPLACE MACRO fleet_rates_of(rel) AS TABLE
WITH exp AS (
    SELECT count(DISTINCT (device, week)) AS device_weeks, sum(readings) AS readings
    FROM exposure_of(rel)
), occ AS (
    SELECT measure, sum(n) AS n FROM occurrences_of(rel) GROUP BY measure
)
SELECT m.measure, exp.device_weeks, exp.readings, coalesce(occ.n, 0) AS n
FROM measures m CROSS JOIN exp LEFT JOIN occ USING (measure);

CREATE OR REPLACE VIEW exposure AS SELECT * FROM exposure_of('device_weeks');
CREATE OR REPLACE VIEW occurrences AS SELECT * FROM occurrences_of('device_weeks');
CREATE OR REPLACE VIEW exposure_long AS SELECT * FROM exposure_long_of('device_weeks');
CREATE OR REPLACE VIEW occurrences_long AS
SELECT * FROM occurrences_long_of('device_weeks');
CREATE OR REPLACE VIEW rates AS
WITH dw AS MATERIALIZED (SELECT * FROM device_weeks)
SELECT * FROM rates_of('dw');
CREATE OR REPLACE VIEW fleet_rates AS
WITH dw AS MATERIALIZED (SELECT * FROM device_weeks)
SELECT * FROM fleet_rates_of('dw');

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
