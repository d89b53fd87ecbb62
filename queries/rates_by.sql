-- Question: how often does each measure occur per device-week (and per 1000
-- readings), by firmware, model, model_status, lot, region, hardware_model and week?
--
-- Variables (optional; unset = all):
--   measure    alerts | device_alarms | gaps | refusals | dropped
--   dimension  firmware | model | model_status | lot | region | hardware_model | week
-- Columns out: measure, dimension, value, device_weeks, readings, n,
--   per_device_week, per_1000_readings
-- How to read it: a row is one group (e.g. dimension 'lot', value 'LOT-C'); n is how
-- many occurrences its rows hold (definitions in views.sql), device_weeks how many
-- distinct (device, ISO week) pairs reported any event in it, readings its vitals
-- events. Compare per_device_week between the values of one dimension; a group with
-- few device_weeks has a noisy rate (outliers.sql weighs that). A device-week whose
-- firmware or model changed within the week counts in both groups.
SELECT measure, dimension, value, device_weeks, readings, n,
       round(per_device_week, 4) AS per_device_week,
       round(per_1000_readings, 4) AS per_1000_readings
FROM rates
WHERE measure = coalesce(getvariable('measure'), measure)
  AND dimension = coalesce(getvariable('dimension'), dimension)
ORDER BY measure, dimension, value;
