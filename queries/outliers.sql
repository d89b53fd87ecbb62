-- Question: which group stands out from the fleet?
--
-- Variables (optional; unset = all): measure, dimension (as in rates_by.sql).
-- Columns out: measure, dimension, value, device_weeks, n, expected, ratio, z,
--   stands_out
-- How to read it: expected is what the group would show at the fleet's rate per
-- device-week (fleet n / fleet device-weeks, each device-week once); ratio = n /
-- expected; z = (n - expected) / sqrt(expected), the Poisson score of the excess.
-- Rows come most surprising first. stands_out marks z >= 3 with ratio >= 1.5 (both:
-- a large fleet makes small excesses "significant", a small group makes large ratios
-- noise). Counts of dropped messages are overdispersed (a device drops in bursts),
-- so read z as a ranking, not as a p-value.
WITH dw AS MATERIALIZED (
    SELECT * FROM device_weeks
), fleet AS (
    SELECT measure, n::DOUBLE / device_weeks AS rate
    FROM fleet_rates_of('dw')
    WHERE device_weeks > 0
), scored AS (
    SELECT r.measure, r.dimension, r.value, r.device_weeks, r.n,
           f.rate * r.device_weeks AS expected
    FROM rates_of('dw') r JOIN fleet f USING (measure)
    WHERE r.device_weeks > 0
      AND r.measure = coalesce(getvariable('measure'), r.measure)
      AND r.dimension = coalesce(getvariable('dimension'), r.dimension)
)
SELECT measure, dimension, value, device_weeks, n,
       round(expected, 3) AS expected,
       CASE WHEN expected > 0 THEN round(n / expected, 3) END AS ratio,
       CASE WHEN expected > 0 THEN round((n - expected) / sqrt(expected), 3) END AS z,
       coalesce(expected > 0 AND (n - expected) / sqrt(expected) >= 3
                AND n / expected >= 1.5, false) AS stands_out
FROM scored
ORDER BY z DESC NULLS LAST, measure, dimension, value;
