-- Question: has the distribution of a vital sign shifted between two periods?
--
-- Variables: metric (spo2 | pulse | resp | temp | sbp | dbp; required);
--   reference_from, reference_to, compare_from, compare_to: ISO weeks 'YYYY-Www',
--   inclusive (required).
-- Columns out: metric, reference_n, compare_n, psi, bins (one row), and per bin in
--   `bins`: bin, lo, hi, reference_share, compare_share.
-- How to read it: the population stability index over the fixed bins of
-- vital_bins (views.sql: the NEWS2 bands): sum over bins of
-- (c - r) * ln(c / r), r and c each bin's share of the vitals readings of the
-- metric in the reference and compare periods, an empty bin's share taken as
-- psi_epsilon() (0.0001). Below 0.1: stable; 0.1 to 0.25: moderate shift;
-- above 0.25: a shift worth a look. Readings flagged implausible are left out.
WITH readings AS (
    SELECT week,
           CASE getvariable('metric')
               WHEN 'spo2' THEN spo2 WHEN 'pulse' THEN pulse WHEN 'resp' THEN resp
               WHEN 'temp' THEN temp WHEN 'sbp' THEN sbp WHEN 'dbp' THEN dbp
           END AS v
    FROM events
    WHERE kind = 'vitals' AND NOT coalesce(implausible, false)
), periods AS (
    SELECT 'reference' AS period, v FROM readings
    WHERE week BETWEEN getvariable('reference_from') AND getvariable('reference_to')
    UNION ALL
    SELECT 'compare', v FROM readings
    WHERE week BETWEEN getvariable('compare_from') AND getvariable('compare_to')
), counted AS (
    SELECT b.bin, b.lo, b.hi,
           count(p.v) FILTER (WHERE p.period = 'reference') AS r,
           count(p.v) FILTER (WHERE p.period = 'compare') AS c
    FROM (SELECT * FROM vital_bins WHERE metric = getvariable('metric')) b
    LEFT JOIN periods p
      ON p.v IS NOT NULL AND (b.lo IS NULL OR p.v >= b.lo) AND (b.hi IS NULL OR p.v < b.hi)
    GROUP BY ALL
), shares AS (
    SELECT *, greatest(r / nullif(sum(r) OVER (), 0), psi_epsilon()) AS rs,
              greatest(c / nullif(sum(c) OVER (), 0), psi_epsilon()) AS cs
    FROM counted
)
SELECT getvariable('metric') AS metric, sum(r) AS reference_n, sum(c) AS compare_n,
       round(sum((cs - rs) * ln(cs / rs)), 6) AS psi,
       list({'bin': bin, 'lo': lo, 'hi': hi, 'reference_share': round(rs, 6),
             'compare_share': round(cs, 6)} ORDER BY bin) AS bins
FROM shares;
