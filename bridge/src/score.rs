//! Server-side scores (issue 21, part 3): NEWS2 computed per patient from the latest
//! valid readings, with every configured score table version, stored as clinical-plane
//! `scores` rows in the transaction of the reading that triggered them, and raising
//! clinical alerts for the live version only.
//!
//! - [`state`]: [`PatientScoreState`], per patient (the `patient_ref` of the assignment a
//!   reading was attributed to, across all its devices): the latest value of each metric
//!   a table reads, with its event id and observed time, and the open score alert of
//!   each version. Staged and adopted like the per-device alert state: written in the
//!   same commit as the readings (`patient_score_state`), made current only after it.
//! - [`config`]: [`Scoring`], the tables in force with their roles and the cohorts on
//!   SpO2 scale 2.
//! - [`row`]: [`NewScore`], one `scores` row and its payload (`vitalmq-score/v1`).
//! - [`alert`]: which alert rule a score proves (`news2-medium`, `news2-high`) and the
//!   transitions of a version's score alert episode.
//! - [`engine`]: one reading in, score rows and alert changes out. Pure.

pub mod alert;
pub mod config;
pub mod engine;
pub mod row;
pub mod state;

pub use config::{ScoreModel, Scoring};
pub use engine::{on_expiry, on_rollout, on_vitals};
pub use row::NewScore;
pub use state::PatientScoreState;
