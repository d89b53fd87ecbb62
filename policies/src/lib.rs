//! The vitalmq policy model: plain data loaded from files, validated into typed values.
//!
//! Architecture invariant: policies are data, not code paths. Loading either yields a
//! complete, validated value or a [`PolicyErrors`] naming file, line and field for every
//! problem found; it never yields half a policy.
#![forbid(unsafe_code)]

mod acl;
mod admin_roles;
mod assignment;
mod consent;
mod error;
mod hold;
mod identity;
mod models;
mod pseudonym;
mod registry;
mod retention;
mod rules;
mod score;

pub use acl::{
    AclPolicy, Decision, DeniedPublishV311, RetainedTelemetry, RoleLimits, is_telemetry_topic,
};
pub use admin_roles::{AdminAction, AdminRole, AdminRoles, Grantee, Scope};
pub use assignment::{Assignment, AssignmentError, History, Period, UnixMillis, Use};
pub use consent::{Consent, ConsentError, Grant, Purpose, UnknownPurpose};
pub use error::{PolicyError, PolicyErrors};
pub use hold::{
    Disposition, Hold, HoldError, HoldRequest, LegalHolds, LiftedHold, RecordMeta, disposition,
    is_patient_ref,
};
pub use identity::{IdentityError, PrincipalId, Role, SpiffeId, TrustDomain};
pub use models::{
    Approval, ApprovedFor, Canary, DeviceFacts, ModelEntry, ModelKind, ModelRegistry, ModelRole,
    ModelStatus, Rollout, UnapprovedAlarms,
};
pub use pseudonym::{CARE_PURPOSE, PSEUDONYM_PREFIX, PseudonymError, Pseudonymiser, is_pseudonym};
pub use registry::{
    DeviceEntry, DeviceRegistry, RegistryChangeError, SiteBound, SiteId, TimeError, format_rfc3339,
    parse_rfc3339,
};
pub use retention::{Action, AuditLog, Plane, RetentionClass, RetentionPolicy, UnknownPlane};
pub use rules::{
    AlertRule, Alerting, BatteryPolicy, ChangeDirection, ClockPolicy, Compare, CompareOp,
    DeviationSide, Escalation, MAX_SECONDS, Measure, Persist, Plausibility, PlausibleRange,
    QualityPolicy, RuleKind, RuleParams, RuleSet, Severity, SilencePolicy,
};
pub use score::{
    Acvpu, AirOrOxygen, Assessment, Inputs, Parameter, Risk, Score, ScoreTable, Spo2Scale,
    UnknownParameter, score,
};
