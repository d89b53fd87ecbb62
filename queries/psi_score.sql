-- Question: does a candidate version of a score model score the population
-- differently from the reference version?
--
-- Variables: score_model (default 'news2'); reference_version, compare_version
--   (required); from_week, to_week (optional ISO weeks 'YYYY-Www', inclusive).
-- Columns out: model, reference_version, compare_version, reference_n, compare_n,
--   psi, bins (list of bin, reference_share, compare_share).
-- How to read it: the population stability index of the aggregate score over 21
-- fixed bins, one per aggregate value 0..20 (NEWS2's whole range; a value outside
-- it is clamped into the end bin), each version's share of its scores, an empty
-- bin's share taken as psi_epsilon() (0.0001). Only complete scores are compared
-- (a score with missing parameters is not the same population). Shadow and live
-- outputs alike: a shadow version is computed over the same readings as the live
-- one, which is what makes the comparison fair. Below 0.1: stable; above 0.25: the
-- versions disagree enough to look at `vitalmq models compare`.
WITH s AS (
    SELECT version, least(greatest(aggregate, 0), 20) AS bin
    FROM scores
    WHERE model = coalesce(getvariable('score_model'), 'news2')
      AND complete
      AND version IN (getvariable('reference_version'), getvariable('compare_version'))
      AND week BETWEEN coalesce(getvariable('from_week'), week)
                   AND coalesce(getvariable('to_week'), week)
), counted AS (
    SELECT b.bin,
           count(s.bin) FILTER (WHERE s.version = getvariable('reference_version')) AS r,
           count(s.bin) FILTER (WHERE s.version = getvariable('compare_version')) AS c
    FROM range(0, 21) AS b(bin)
    LEFT JOIN s ON s.bin = b.bin
    GROUP BY ALL
), shares AS (
    SELECT *, greatest(r / nullif(sum(r) OVER (), 0), psi_epsilon()) AS rs,
              greatest(c / nullif(sum(c) OVER (), 0), psi_epsilon()) AS cs
    FROM counted
)
SELECT coalesce(getvariable('score_model'), 'news2') AS model,
       getvariable('reference_version') AS reference_version,
       getvariable('compare_version') AS compare_version,
       sum(r) AS reference_n, sum(c) AS compare_n,
       round(sum((cs - rs) * ln(cs / rs)), 6) AS psi,
       list({'bin': bin, 'reference_share': round(rs, 6),
             'compare_share': round(cs, 6)} ORDER BY bin) AS bins
FROM shares;
