//! NEWS2 against the published chart (RCP 2017, chart 1), and the loader's refusals.

use super::*;
use proptest::prelude::*;

const EXAMPLE: &str = include_str!("../../examples/news2.toml");

fn table() -> ScoreTable {
    ScoreTable::parse(EXAMPLE, Path::new("news2.toml")).expect("the shipped chart loads")
}

/// A complete, all-normal patient on scale 1, breathing air.
fn normal() -> Inputs {
    Inputs {
        respiration_rate: Some(16.0),
        spo2: Some(98.0),
        spo2_scale: Spo2Scale::Scale1,
        air_or_oxygen: Some(AirOrOxygen::Air),
        systolic_bp: Some(120.0),
        pulse: Some(70.0),
        consciousness: Some(Acvpu::Alert),
        temperature: Some(37.0),
    }
}

fn sub(t: &ScoreTable, inputs: Inputs, p: Parameter) -> u8 {
    let s = score(t, &inputs);
    assert!(s.complete, "{s:?}");
    s.sub_scores[&p]
}

#[test]
fn the_chart_loads_with_its_identity() {
    let t = table();
    assert_eq!(t.model(), "news2");
    assert_eq!(t.version(), "rcp-2017.1");
    assert_eq!(t.sha256(), hex::encode(Sha256::digest(EXAMPLE.as_bytes())));
    assert_eq!(t.metric(Parameter::Pulse), "pulse");
    assert_eq!(t.metric(Parameter::Spo2Scale2), "spo2");
    assert_eq!(t.unit(Parameter::Temperature), Some("°C"));
    assert_eq!(t.unit(Parameter::Consciousness), None);
    assert_eq!(t.risk_min(Risk::Medium), Some(5));
    assert_eq!(t.risk_min(Risk::High), Some(7));
    assert_eq!(t.risk_min(Risk::LowMedium), None);
    assert_eq!(t.red_score(), 3);
    assert!(
        t.source()
            .is_some_and(|s| s.contains("Royal College of Physicians"))
    );
    let s = score(&t, &normal());
    assert_eq!(s.aggregate, 0);
    assert_eq!(s.assessment, Assessment::Exact(Risk::Low));
    assert!(s.missing.is_empty() && s.red.is_empty());
}

/// Every band edge of every numeric parameter, both sides: `(value, sub-score)`.
#[test]
fn every_band_edge_scores_as_the_chart_prints() {
    let t = table();
    let cases: [(Parameter, &[(f64, u8)]); 5] = [
        (
            Parameter::RespirationRate,
            &[
                (8.0, 3),
                (9.0, 1),
                (11.0, 1),
                (12.0, 0),
                (20.0, 0),
                (21.0, 2),
                (24.0, 2),
                (25.0, 3),
            ],
        ),
        (
            Parameter::Spo2Scale1,
            &[
                (91.0, 3),
                (92.0, 2),
                (93.0, 2),
                (94.0, 1),
                (95.0, 1),
                (96.0, 0),
                (100.0, 0),
            ],
        ),
        (
            Parameter::SystolicBp,
            &[
                (90.0, 3),
                (91.0, 2),
                (100.0, 2),
                (101.0, 1),
                (110.0, 1),
                (111.0, 0),
                (219.0, 0),
                (220.0, 3),
            ],
        ),
        (
            Parameter::Pulse,
            &[
                (40.0, 3),
                (41.0, 1),
                (50.0, 1),
                (51.0, 0),
                (90.0, 0),
                (91.0, 1),
                (110.0, 1),
                (111.0, 2),
                (130.0, 2),
                (131.0, 3),
            ],
        ),
        (
            Parameter::Temperature,
            &[
                (35.0, 3),
                (35.1, 1),
                (36.0, 1),
                (36.1, 0),
                (38.0, 0),
                (38.1, 1),
                (39.0, 1),
                (39.1, 2),
            ],
        ),
    ];
    for (p, edges) in cases {
        for &(v, want) in edges {
            let mut i = normal();
            match p {
                Parameter::RespirationRate => i.respiration_rate = Some(v),
                Parameter::Spo2Scale1 => i.spo2 = Some(v),
                Parameter::SystolicBp => i.systolic_bp = Some(v),
                Parameter::Pulse => i.pulse = Some(v),
                Parameter::Temperature => i.temperature = Some(v),
                _ => unreachable!(),
            }
            assert_eq!(sub(&t, i, p), want, "{p} = {v}");
        }
    }
}

#[test]
fn readings_are_rounded_to_the_charts_resolution() {
    let t = table();
    let temp = |v| {
        sub(
            &t,
            Inputs {
                temperature: Some(v),
                ..normal()
            },
            Parameter::Temperature,
        )
    };
    assert_eq!(temp(38.04), 0); // 38.0
    assert_eq!(temp(38.06), 1); // 38.1
    assert_eq!(temp(35.04), 3); // 35.0
    let pulse = |v| {
        sub(
            &t,
            Inputs {
                pulse: Some(v),
                ..normal()
            },
            Parameter::Pulse,
        )
    };
    assert_eq!(pulse(130.4), 2);
    assert_eq!(pulse(130.5), 3);
}

#[test]
fn spo2_scale2_depends_on_air_or_oxygen_above_92() {
    let t = table();
    let on = |v: f64, a: Option<AirOrOxygen>| {
        score(
            &t,
            &Inputs {
                spo2: Some(v),
                spo2_scale: Spo2Scale::Scale2,
                air_or_oxygen: a,
                ..normal()
            },
        )
    };
    let s2 = |v, a| on(v, Some(a)).sub_scores[&Parameter::Spo2Scale2];
    use AirOrOxygen::{Air, Oxygen};
    for (v, want) in [
        (83.0, 3),
        (84.0, 2),
        (85.0, 2),
        (86.0, 1),
        (87.0, 1),
        (88.0, 0),
        (92.0, 0),
    ] {
        assert_eq!(s2(v, Air), want, "{v} on air");
        assert_eq!(s2(v, Oxygen), want, "{v} on oxygen");
    }
    for v in [93.0, 95.0, 97.0, 100.0] {
        assert_eq!(s2(v, Air), 0, "{v} on air");
    }
    for (v, want) in [
        (93.0, 1),
        (94.0, 1),
        (95.0, 2),
        (96.0, 2),
        (97.0, 3),
        (100.0, 3),
    ] {
        assert_eq!(s2(v, Oxygen), want, "{v} on oxygen");
    }
    // Scored on scale 2, SpO2 shows under scale 2 only; oxygen adds its own 2.
    let s = on(97.0, Some(Oxygen));
    assert!(!s.sub_scores.contains_key(&Parameter::Spo2Scale1));
    assert_eq!(s.sub_scores[&Parameter::AirOrOxygen], 2);
    assert_eq!(s.aggregate, 5);
    assert_eq!(s.red, vec![Parameter::Spo2Scale2]);
    // Air/oxygen unknown: at 90 both agree (0) and SpO2 scores; at 95 it cannot.
    let s = on(90.0, None);
    assert_eq!(s.sub_scores[&Parameter::Spo2Scale2], 0);
    assert_eq!(s.missing, vec![Parameter::AirOrOxygen]);
    let s = on(95.0, None);
    assert_eq!(
        s.missing,
        vec![Parameter::Spo2Scale2, Parameter::AirOrOxygen]
    );
    // Scale 1 ignores air/oxygen for SpO2.
    let s = score(
        &t,
        &Inputs {
            spo2: Some(95.0),
            air_or_oxygen: None,
            ..normal()
        },
    );
    assert_eq!(s.sub_scores[&Parameter::Spo2Scale1], 1);
    assert_eq!(s.missing, vec![Parameter::AirOrOxygen]);
}

#[test]
fn consciousness_other_than_alert_scores_3_and_oxygen_2() {
    let t = table();
    for (c, want) in [
        (Acvpu::Alert, 0),
        (Acvpu::Confusion, 3),
        (Acvpu::Voice, 3),
        (Acvpu::Pain, 3),
        (Acvpu::Unresponsive, 3),
    ] {
        let i = Inputs {
            consciousness: Some(c),
            ..normal()
        };
        assert_eq!(sub(&t, i, Parameter::Consciousness), want, "{c:?}");
    }
    let i = Inputs {
        air_or_oxygen: Some(AirOrOxygen::Oxygen),
        ..normal()
    };
    assert_eq!(sub(&t, i, Parameter::AirOrOxygen), 2);
}

#[test]
fn a_single_red_parameter_raises_a_low_aggregate_to_low_medium() {
    let t = table();
    let pulse = |v| {
        score(
            &t,
            &Inputs {
                pulse: Some(v),
                ..normal()
            },
        )
    };
    let s = pulse(130.0);
    assert_eq!((s.aggregate, s.any_red()), (2, false));
    assert_eq!(s.assessment, Assessment::Exact(Risk::Low));
    let s = pulse(131.0);
    assert_eq!((s.aggregate, s.red.clone()), (3, vec![Parameter::Pulse]));
    assert_eq!(s.assessment, Assessment::Exact(Risk::LowMedium));
    // New confusion alone is red too.
    let s = score(
        &t,
        &Inputs {
            consciousness: Some(Acvpu::Confusion),
            ..normal()
        },
    );
    assert_eq!(s.assessment, Assessment::Exact(Risk::LowMedium));
    // A red score does not lower a medium or high aggregate.
    let s = score(
        &t,
        &Inputs {
            pulse: Some(131.0),
            temperature: Some(39.5),
            ..normal()
        },
    );
    assert_eq!(s.aggregate, 5);
    assert_eq!(s.assessment, Assessment::Exact(Risk::Medium));
}

#[test]
fn aggregates_4_5_7_are_low_medium_high() {
    let t = table();
    // 4: pulse 111 (2) + resp 21 (2); 5: + temp 38.5 (1); 7: + sbp 100 (2).
    let four = Inputs {
        pulse: Some(111.0),
        respiration_rate: Some(21.0),
        ..normal()
    };
    let five = Inputs {
        temperature: Some(38.5),
        ..four
    };
    let six = Inputs {
        systolic_bp: Some(105.0),
        ..five
    };
    let seven = Inputs {
        systolic_bp: Some(100.0),
        ..five
    };
    for (i, agg, risk) in [
        (four, 4, Risk::Low),
        (five, 5, Risk::Medium),
        (six, 6, Risk::Medium),
        (seven, 7, Risk::High),
    ] {
        let s = score(&t, &i);
        assert_eq!(s.aggregate, agg);
        assert!(s.red.is_empty());
        assert_eq!(s.assessment, Assessment::Exact(risk), "aggregate {agg}");
    }
}

#[test]
fn missing_parameters_are_reported_never_scored_as_normal() {
    let t = table();
    let s = score(&t, &Inputs::default());
    assert_eq!(s.missing.len(), 7);
    assert_eq!(s.missing[1], Parameter::Spo2Scale1);
    assert!(s.sub_scores.is_empty() && !s.complete);
    assert_eq!(s.assessment, Assessment::Incomplete);
    assert_eq!(s.assessment.risk(), None);

    // One parameter missing, the rest normal: partial 0, no risk stated.
    let s = score(
        &t,
        &Inputs {
            systolic_bp: None,
            ..normal()
        },
    );
    assert_eq!(s.missing, vec![Parameter::SystolicBp]);
    assert_eq!((s.aggregate, s.complete), (0, false));
    assert!(!s.sub_scores.contains_key(&Parameter::SystolicBp));
    assert_eq!(s.assessment, Assessment::Incomplete);

    // Missing but already red, medium or high: the known part is a lower bound.
    let red = Inputs {
        temperature: None,
        pulse: Some(131.0),
        ..normal()
    };
    assert_eq!(
        score(&t, &red).assessment,
        Assessment::AtLeast(Risk::LowMedium)
    );
    let medium = Inputs {
        temperature: None,
        pulse: Some(111.0),
        respiration_rate: Some(21.0),
        air_or_oxygen: Some(AirOrOxygen::Oxygen),
        ..normal()
    };
    let s = score(&t, &medium);
    assert_eq!(
        (s.aggregate, s.assessment),
        (6, Assessment::AtLeast(Risk::Medium))
    );
    let high = Inputs {
        systolic_bp: Some(95.0),
        ..medium
    };
    assert_eq!(score(&t, &high).assessment, Assessment::AtLeast(Risk::High));

    // A reading that is not a number is missing, not normal.
    let s = score(
        &t,
        &Inputs {
            pulse: Some(f64::NAN),
            ..normal()
        },
    );
    assert_eq!(s.missing, vec![Parameter::Pulse]);
}

#[test]
fn inputs_are_read_from_the_metrics_the_table_names() {
    let t = table();
    let m: BTreeMap<&str, f64> = [
        ("resp", 22.0),
        ("spo2", 95.0),
        ("o2", 1.0),
        ("sbp", 120.0),
        ("pulse", 70.0),
        ("acvpu", 0.0),
        ("temp", 37.2),
    ]
    .into();
    let i = t.inputs(|k| m.get(k).copied(), Spo2Scale::Scale2);
    assert_eq!(i.respiration_rate, Some(22.0));
    assert_eq!(i.spo2, Some(95.0));
    assert_eq!(i.air_or_oxygen, Some(AirOrOxygen::Oxygen));
    assert_eq!(i.consciousness, Some(Acvpu::Alert));
    let s = score(&t, &i);
    // resp 2 + SpO2 scale 2 on oxygen 95 (2) + oxygen 2.
    assert_eq!((s.aggregate, s.complete), (6, true));
    // A code no category has is missing.
    let i = t.inputs(
        |k| {
            if k == "acvpu" {
                Some(9.0)
            } else {
                m.get(k).copied()
            }
        },
        Spo2Scale::Scale1,
    );
    assert_eq!(i.consciousness, None);
}

fn refused(text: &str) -> String {
    ScoreTable::parse(text, Path::new("s.toml"))
        .expect_err("refused")
        .to_string()
}

fn assert_has(shown: &str, wants: &[&str]) {
    for want in wants {
        assert!(shown.contains(want), "want `{want}` in:\n{shown}");
    }
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .expect("needle in text")
        + 1
}

#[test]
fn a_gap_between_bands_is_refused_at_its_line() {
    let text = EXAMPLE.replace(
        "{ min = 41, max = 50, score = 1 }",
        "{ min = 42, max = 50, score = 1 }",
    );
    let line = line_of(&text, "min = 42, max = 50");
    assert_has(
        &refused(&text),
        &[&format!(
            "s.toml:{line}: parameters.pulse.bands: gap: 41 to 41 are in no band"
        )],
    );
    let text = EXAMPLE.replace(
        "{ min = 36.1, max = 38.0, score = 0 }",
        "{ min = 36.2, max = 38.0, score = 0 }",
    );
    let line = line_of(&text, "min = 36.2");
    assert_has(
        &refused(&text),
        &[&format!(
            "s.toml:{line}: parameters.temperature.bands: gap: 36.1 to 36.1"
        )],
    );
    // The open ends are part of coverage.
    let text = EXAMPLE.replace(
        "{ min = 131, score = 3 }",
        "{ min = 131, max = 250, score = 3 }",
    );
    assert_has(
        &refused(&text),
        &["pulse.bands: gap: values above 250 are in no band"],
    );
    // Scale 2 on oxygen without its top band.
    let text = EXAMPLE.replace("  { min = 97, on = \"oxygen\", score = 3 },\n", "");
    assert_has(
        &refused(&text),
        &["spo2_scale2.bands: gap (on oxygen): values above 96 are in no band"],
    );
    // A category not scored.
    let text = EXAMPLE.replace("  { value = \"P\", code = 3, score = 3 },\n", "");
    assert_has(
        &refused(&text),
        &["consciousness.categories: gap: category `P` is not scored"],
    );
}

#[test]
fn overlapping_bands_are_refused_at_their_line() {
    let text = EXAMPLE.replace(
        "{ min = 51, max = 90, score = 0 }",
        "{ min = 50, max = 90, score = 0 }",
    );
    let line = line_of(&text, "min = 50, max = 90");
    assert_has(
        &refused(&text),
        &[&format!(
            "s.toml:{line}: parameters.pulse.bands: overlap: 50 to 50 are in two bands"
        )],
    );
    // An unconditional band over the air-only one overlaps on air.
    let text = EXAMPLE.replace(
        "{ min = 88, max = 92, score = 0 }",
        "{ min = 88, max = 93, score = 0 }",
    );
    assert_has(
        &refused(&text),
        &["spo2_scale2.bands: overlap (on air): 93 to 93"],
    );
    let text = EXAMPLE.replace(
        "{ min = 12, max = 20, score = 0 }",
        "{ max = 20, score = 0 }",
    );
    assert_has(&refused(&text), &["respiration_rate.bands: overlap"]);
    let text = EXAMPLE.replace("{ value = \"V\", code = 2,", "{ value = \"C\", code = 2,");
    let line = line_of(&text, "value = \"C\", code = 2");
    assert_has(
        &refused(&text),
        &[
            &format!(
                "s.toml:{line}: parameters.consciousness.categories[2].value: overlap: category `C` is scored twice"
            ),
            "gap: category `V` is not scored",
        ],
    );
}

#[test]
fn unknown_and_missing_parameters_and_bad_fields_are_refused() {
    let text = EXAMPLE.replace("[parameters.pulse]", "[parameters.heart_rate]");
    let line = line_of(&text, "[parameters.heart_rate]");
    assert_has(
        &refused(&text),
        &[
            &format!("s.toml:{line}: parameters.heart_rate: unknown parameter `heart_rate`"),
            "parameters.pulse: missing",
        ],
    );
    let text = EXAMPLE.replace("{ min = 35.1, max = 36.0,", "{ min = 35.15, max = 36.0,");
    let line = line_of(&text, "35.15");
    assert_has(
        &refused(&text),
        &[&format!(
            "s.toml:{line}: parameters.temperature.bands[1].min: 35.15 has more than 1 decimal"
        )],
    );
    let text = EXAMPLE.replace("on = \"air\"", "on = \"nasal\"");
    assert_has(
        &refused(&text),
        &["spo2_scale2.bands[4].on: unknown `nasal`"],
    );
    let text = EXAMPLE.replace(
        "{ min = 5, max = 6, risk = \"medium\" }",
        "{ min = 6, max = 6, risk = \"amber\" }",
    );
    let line = line_of(&text, "amber");
    assert_has(
        &refused(&text),
        &[&format!(
            "s.toml:{line}: aggregate.bands[1].risk: unknown risk `amber`"
        )],
    );
    let text = EXAMPLE.replace(
        "{ min = 5, max = 6, risk = \"medium\" }",
        "{ min = 6, max = 6, risk = \"medium\" }",
    );
    assert_has(
        &refused(&text),
        &["aggregate.bands: gap: 5 to 5 are in no band"],
    );
    let text = EXAMPLE.replace("model = \"news2\"", "model = \"mews\"");
    let line = line_of(&text, "model = \"mews\"");
    assert_has(
        &refused(&text),
        &[&format!("s.toml:{line}: model: unknown model")],
    );
    let text = EXAMPLE.replace(
        "[parameters.pulse]\n",
        "[parameters.pulse]\ncolour = \"red\"\n",
    );
    assert_has(&refused(&text), &["unknown field `colour`"]);
}

#[test]
fn load_reads_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("news2.toml");
    std::fs::write(&path, EXAMPLE).expect("write");
    assert_eq!(ScoreTable::load(&path).expect("loads"), table());
}

proptest! {
    /// Any reading falls in exactly one band of every numeric parameter, on air and on
    /// oxygen, and any complete input scores complete with every parameter once.
    #[test]
    fn every_value_is_in_exactly_one_band(
        v in -1000.0f64..1000.0,
        fine in -50i64..450,
        scale2 in any::<bool>(),
        oxygen in any::<bool>(),
        c in 0usize..5,
    ) {
        let t = table();
        for p in [Parameter::RespirationRate, Parameter::Spo2Scale1, Parameter::Spo2Scale2,
                  Parameter::SystolicBp, Parameter::Pulse, Parameter::Temperature] {
            for on in [AirOrOxygen::Air, AirOrOxygen::Oxygen] {
                prop_assert_eq!(t.bands_holding(p, v, on), 1, "{} = {}", p, v);
                let tenth = fine as f64 / 10.0;
                prop_assert_eq!(t.bands_holding(p, tenth, on), 1, "{} = {}", p, tenth);
            }
        }
        let acvpu = [Acvpu::Alert, Acvpu::Confusion, Acvpu::Voice, Acvpu::Pain, Acvpu::Unresponsive][c];
        let i = Inputs {
            respiration_rate: Some(v),
            spo2: Some(v),
            spo2_scale: if scale2 { Spo2Scale::Scale2 } else { Spo2Scale::Scale1 },
            air_or_oxygen: Some(if oxygen { AirOrOxygen::Oxygen } else { AirOrOxygen::Air }),
            systolic_bp: Some(v),
            pulse: Some(v),
            consciousness: Some(acvpu),
            temperature: Some(fine as f64 / 10.0),
        };
        let s = score(&t, &i);
        prop_assert!(s.complete);
        prop_assert_eq!(s.sub_scores.len(), 7);
        prop_assert_eq!(s.aggregate, s.sub_scores.values().map(|&x| u32::from(x)).sum::<u32>());
        prop_assert!(matches!(s.assessment, Assessment::Exact(_)));
    }
}

#[test]
fn a_reading_older_than_its_valid_for_is_missing() {
    let t = table();
    assert_eq!(
        t.valid_for(Parameter::Pulse),
        std::time::Duration::from_secs(15 * 60)
    );
    assert_eq!(
        t.valid_for(Parameter::Temperature),
        std::time::Duration::from_secs(4 * 3600)
    );
    let at = 10 * 3_600_000u64;
    // Pulse observed 15 min ago is still valid; 15 min + 1 ms ago it is missing.
    let obs = |pulse_at: u64| {
        move |k: &str| match k {
            "pulse" => Some((131.0, pulse_at)),
            "temp" => Some((37.0, at - 3_600_000)),
            _ => None,
        }
    };
    let i = t.inputs_at(obs(at - 15 * 60_000), at, Spo2Scale::Scale1);
    assert_eq!((i.pulse, i.temperature), (Some(131.0), Some(37.0)));
    let s = score(&t, &i);
    assert_eq!(s.assessment, Assessment::AtLeast(Risk::LowMedium));
    let i = t.inputs_at(obs(at - 15 * 60_000 - 1), at, Spo2Scale::Scale1);
    assert_eq!(i.pulse, None);
    let s = score(&t, &i);
    assert!(s.missing.contains(&Parameter::Pulse));
    assert_eq!(s.assessment, Assessment::Incomplete);
    // A reading from the future (of the scoring time) is not valid yet.
    assert_eq!(t.inputs_at(obs(at + 1), at, Spo2Scale::Scale1).pulse, None);
}

#[test]
fn valid_for_is_required_and_must_be_a_duration() {
    let shown = refused(&EXAMPLE.replacen("valid_for = \"15m\"\n", "", 1));
    assert_has(&shown, &["parameters.spo2_scale1.valid_for", "missing"]);
    let shown = refused(&EXAMPLE.replacen("valid_for = \"15m\"", "valid_for = \"soon\"", 1));
    assert_has(
        &shown,
        &["parameters.spo2_scale1.valid_for", "not a duration"],
    );
    let shown = refused(&EXAMPLE.replacen("valid_for = \"15m\"", "valid_for = \"0s\"", 1));
    assert_has(&shown, &["valid_for", "longer than 0"]);
}
