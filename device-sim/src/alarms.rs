//! Scripted device alarms (SPEC 3.1 and 5.1): a device's on-device model raises an alarm
//! (`active` true) at a device time and clears it (`active` false) after a duration, as
//! `alarm` messages on the telemetry topic.
//!
//! Like the vitals episodes, the script reads no clock: [`AlarmScript::due`] is asked, at
//! each vitals tick, which alarm messages fall due by device time `t`, and hands each out
//! once. An alarm message is a message of the device like any other: it takes the next
//! `seq` and waits in the outbox for its receipt.

use std::str::FromStr;
use std::time::Duration;

use vitalmq_envelope::{Alarm, AlarmCode, AlarmLevel, DeviceId};

use crate::duration::{DurationError, parse_duration};

/// When an alarm is raised if `at=` is not given (device time after the start).
pub const DEFAULT_ALARM_START: Duration = Duration::from_secs(10);
/// How long an alarm stays raised if `for=` is not given.
pub const DEFAULT_ALARM_FOR: Duration = Duration::from_secs(60);
/// The on-device model the alarms name in `model` if `model=` is not given.
pub const DEFAULT_ALARM_MODEL: &str = "arrhythmia-net/2.1.0";

/// Why an `--alarm-episode` value does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AlarmSpecError {
    #[error(
        "alarm episode `{0}`: expected DEVICE:CODE:LEVEL[:at=START][:for=DURATION|never][:model=NAME]"
    )]
    Syntax(String),
    #[error("alarm episode `{0}`: `{1}` is not a device id")]
    NotADevice(String, String),
    #[error("alarm episode `{0}`: {1}")]
    Code(String, vitalmq_envelope::InvalidAlarmCode),
    #[error("alarm episode `{0}`: {1}")]
    Level(String, vitalmq_envelope::InvalidAlarmLevel),
    #[error("alarm episode `{0}`: {1}")]
    Time(String, DurationError),
}

/// `DEVICE:CODE:LEVEL[:at=START][:for=DURATION|never][:model=NAME]` from the command
/// line, e.g. `dev-00001:arrhythmia:urgent:at=20s:for=30s`. START is device time after
/// the simulation starts (like the vitals episodes); `for=never` never clears it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlarmEpisodeSpec {
    pub device: String,
    pub code: AlarmCode,
    pub level: AlarmLevel,
    pub start: Duration,
    /// `None`: raised and never cleared.
    pub duration: Option<Duration>,
    pub model: String,
}

impl FromStr for AlarmEpisodeSpec {
    type Err = AlarmSpecError;
    fn from_str(s: &str) -> Result<Self, AlarmSpecError> {
        use AlarmSpecError as E;
        let mut parts = s.split(':');
        let (Some(device), Some(code), Some(level)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(E::Syntax(s.to_owned()));
        };
        DeviceId::new(device).map_err(|_| E::NotADevice(s.to_owned(), device.to_owned()))?;
        let mut spec = Self {
            device: device.to_owned(),
            code: code.parse().map_err(|e| E::Code(s.to_owned(), e))?,
            level: level.parse().map_err(|e| E::Level(s.to_owned(), e))?,
            start: DEFAULT_ALARM_START,
            duration: Some(DEFAULT_ALARM_FOR),
            model: DEFAULT_ALARM_MODEL.to_owned(),
        };
        let time = |t: &str| parse_duration(t).map_err(|e| E::Time(s.to_owned(), e));
        for part in parts {
            match part.split_once('=') {
                Some(("at", t)) => spec.start = time(t)?,
                Some(("for", "never")) => spec.duration = None,
                Some(("for", t)) => spec.duration = Some(time(t)?),
                Some(("model", m)) if !m.is_empty() => spec.model = m.to_owned(),
                _ => return Err(E::Syntax(s.to_owned())),
            }
        }
        Ok(spec)
    }
}

/// One alarm message the device is to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlarmEvent {
    /// Device time it falls due.
    pub at: Duration,
    pub alarm: Alarm,
    pub model: String,
}

/// A device's alarm messages in device-time order; see the module documentation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AlarmScript {
    events: Vec<AlarmEvent>,
    /// Events before this index were handed out.
    next: usize,
}

impl AlarmScript {
    /// The raise and clear messages of `episodes` (all of one device).
    pub fn new<'a>(episodes: impl IntoIterator<Item = &'a AlarmEpisodeSpec>) -> Self {
        // (due, episode, 0 raise / 1 clear): a raise goes before its own clear even when
        // both fall due at once, episodes of the same instant keep their given order.
        let mut keyed = Vec::new();
        for (i, e) in episodes.into_iter().enumerate() {
            let raise = Alarm {
                code: e.code.clone(),
                level: e.level,
                active: true,
                detail: Some(format!("simulated {} episode", e.code)),
            };
            if let Some(d) = e.duration {
                let clear = Alarm {
                    active: false,
                    detail: None,
                    ..raise.clone()
                };
                let at = e.start.saturating_add(d);
                keyed.push((
                    at,
                    i,
                    1u8,
                    AlarmEvent {
                        at,
                        alarm: clear,
                        model: e.model.clone(),
                    },
                ));
            }
            keyed.push((
                e.start,
                i,
                0,
                AlarmEvent {
                    at: e.start,
                    alarm: raise,
                    model: e.model.clone(),
                },
            ));
        }
        keyed.sort_by_key(|(at, i, phase, _)| (*at, *i, *phase));
        Self {
            events: keyed.into_iter().map(|(.., e)| e).collect(),
            next: 0,
        }
    }

    /// The messages due by device time `t` not handed out yet, oldest first.
    pub fn due(&mut self, t: Duration) -> &[AlarmEvent] {
        let from = self.next;
        while self.events.get(self.next).is_some_and(|e| e.at <= t) {
            self.next += 1;
        }
        &self.events[from..self.next]
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> AlarmEpisodeSpec {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn specs_parse_with_defaults_and_options() {
        let s = spec("dev-00001:arrhythmia:urgent");
        assert_eq!(s.device, "dev-00001");
        assert_eq!(s.code.as_str(), "arrhythmia");
        assert_eq!(s.level, AlarmLevel::Urgent);
        assert_eq!(s.start, DEFAULT_ALARM_START);
        assert_eq!(s.duration, Some(DEFAULT_ALARM_FOR));
        assert_eq!(s.model, DEFAULT_ALARM_MODEL);
        let s = spec("dev-00002:lead_off:info:at=20s:for=30s:model=ecg/1.0");
        assert_eq!(
            (s.start, s.duration, s.model.as_str()),
            (
                Duration::from_secs(20),
                Some(Duration::from_secs(30)),
                "ecg/1.0"
            )
        );
        assert_eq!(spec("dev-00002:fall:review:for=never").duration, None);
        for bad in [
            "dev-00001",
            "dev-00001:arrhythmia",
            "dev 1:arrhythmia:urgent",
            "dev-00001:AFib:urgent",
            "dev-00001:arrhythmia:critical",
            "dev-00001:arrhythmia:urgent:at=soon",
            "dev-00001:arrhythmia:urgent:when=1s",
            "dev-00001:arrhythmia:urgent:model=",
        ] {
            assert!(bad.parse::<AlarmEpisodeSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_script_raises_then_clears_each_once_in_time_order() {
        let episodes = [
            spec("dev-00001:arrhythmia:urgent:at=10s:for=30s"),
            spec("dev-00001:lead_off:info:at=20s:for=never"),
        ];
        let mut script = AlarmScript::new(&episodes);
        assert!(script.due(Duration::from_secs(9)).is_empty());
        let due: Vec<_> = script
            .due(Duration::from_secs(25))
            .iter()
            .map(|e| (e.alarm.code.to_string(), e.alarm.active, e.at.as_secs()))
            .collect();
        assert_eq!(
            due,
            [
                ("arrhythmia".into(), true, 10),
                ("lead_off".into(), true, 20)
            ]
        );
        assert!(script.due(Duration::from_secs(25)).is_empty(), "each once");
        let cleared = script.due(Duration::from_secs(3600));
        assert_eq!(cleared.len(), 1, "lead_off is never cleared");
        assert_eq!(cleared[0].alarm.code.as_str(), "arrhythmia");
        assert!(!cleared[0].alarm.active);
        assert_eq!(
            cleared[0].alarm.level,
            AlarmLevel::Urgent,
            "a clear keeps the level"
        );
        assert!(script.due(Duration::MAX).is_empty());
    }

    #[test]
    fn a_late_tick_hands_out_raise_and_clear_in_order() {
        let mut script = AlarmScript::new(&[spec("dev-00001:fall:review:at=1s:for=0s")]);
        let due: Vec<bool> = script
            .due(Duration::from_secs(5))
            .iter()
            .map(|e| e.alarm.active)
            .collect();
        assert_eq!(due, [true, false], "raised before cleared");
    }
}
