//! Rollout transitions (issue 21, part 4): what a reload of the models file changed in
//! which version of a score or rule set runs where, as one audit record per
//! `(model, version, scope)` whose role changed, besides the file's `policy_reloaded`.
//!
//! A scope is where a rollout can give a version a role: `*` (every site and cohort no
//! canary names), `site:<id>` or `cohort:<name>` (one a canary names). The role of a
//! version in a scope is what [`ModelRegistry::role`] gives a device there: a canary
//! is `canary` in its scopes and the live version `shadow` there; elsewhere live is
//! `live`; shadows are `shadow` everywhere; otherwise the version does not run there
//! (`none`). Each record's `reason` says what the transition stands for ([`Change`]):
//! `rollback` (a canary taken back, `canary -> shadow|none`, or the version live before
//! taking a scope back, `shadow -> live`), `promotion` (another version becomes live)
//! or `rollout_changed`.

use std::collections::{BTreeMap, BTreeSet};

use vitalmq_audit::{AuditRecord, Component, Decision, Event};
use vitalmq_policies::{ModelRegistry, ModelRole, Rollout};

/// Where a role applies (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    Everywhere,
    Site(String),
    Cohort(String),
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Everywhere => f.write_str("*"),
            Self::Site(s) => write!(f, "site:{s}"),
            Self::Cohort(c) => write!(f, "cohort:{c}"),
        }
    }
}

/// The scopes a rollout distinguishes.
fn scopes(r: &Rollout) -> BTreeSet<Scope> {
    let mut out = BTreeSet::from([Scope::Everywhere]);
    for c in &r.canary {
        out.extend(c.sites.iter().map(|s| Scope::Site(s.as_str().to_owned())));
        out.extend(c.cohorts.iter().cloned().map(Scope::Cohort));
    }
    out
}

/// The role of `version` in `scope` under `r` (the rule of [`ModelRegistry::role`]).
fn role_in(r: &Rollout, version: &str, scope: &Scope) -> Option<ModelRole> {
    let canary = r.canary.iter().find(|c| match scope {
        Scope::Everywhere => false,
        Scope::Site(s) => c.sites.iter().any(|x| x.as_str() == s),
        Scope::Cohort(n) => c.cohorts.contains(n),
    });
    match canary {
        Some(c) if c.version == version => return Some(ModelRole::Canary),
        Some(_) if r.live == version => return Some(ModelRole::Shadow),
        None if r.live == version => return Some(ModelRole::Live),
        _ => {}
    }
    r.shadow
        .iter()
        .any(|v| v == version)
        .then_some(ModelRole::Shadow)
}

fn versions(r: &Rollout) -> BTreeSet<&str> {
    let mut out = BTreeSet::from([r.live.as_str()]);
    out.extend(r.shadow.iter().map(String::as_str));
    out.extend(r.canary.iter().map(|c| c.version.as_str()));
    out
}

/// Every `(model, version, scope)` with a role in `models`, and the role.
pub fn roles(models: &ModelRegistry) -> BTreeMap<(String, String, Scope), ModelRole> {
    let mut out = BTreeMap::new();
    for r in models.rollouts() {
        for scope in scopes(r) {
            for v in versions(r) {
                if let Some(role) = role_in(r, v, &scope) {
                    out.insert((r.model.clone(), v.to_owned(), scope.clone()), role);
                }
            }
        }
    }
    out
}

/// One changed role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub model: String,
    pub version: String,
    pub scope: Scope,
    pub old: Option<ModelRole>,
    pub new: Option<ModelRole>,
    /// The model's live version before the reload (`None`: no rollout then).
    pub old_live: Option<String>,
}

/// What a transition stands for, the audit record's `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A canary taken back (`canary -> shadow|none`), or the live version taking a
    /// scope back from a canary (`shadow -> live` of the version live before).
    Rollback,
    /// Another version becomes live where it was not (`* -> live` of a version that
    /// was not the live one): a new version goes live.
    Promotion,
    /// Anything else (a canary or shadow started, a live version demoted by a
    /// promotion or a canary).
    RolloutChanged,
}

impl Change {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Rollback => "rollback",
            Self::Promotion => "promotion",
            Self::RolloutChanged => "rollout_changed",
        }
    }
}

impl Transition {
    pub fn change(&self) -> Change {
        let was_live = self.old_live.as_deref() == Some(self.version.as_str());
        match (self.old, self.new) {
            (Some(ModelRole::Canary), Some(ModelRole::Shadow) | None) => Change::Rollback,
            (Some(ModelRole::Shadow), Some(ModelRole::Live)) if was_live => Change::Rollback,
            (old, Some(ModelRole::Live)) if old != Some(ModelRole::Live) => Change::Promotion,
            _ => Change::RolloutChanged,
        }
    }

    pub fn is_rollback(&self) -> bool {
        self.change() == Change::Rollback
    }
}

fn role_str(r: Option<ModelRole>) -> &'static str {
    r.map_or("none", ModelRole::as_str)
}

/// The role changes from `old` to `new`, in (model, version, scope) order. A scope one
/// side does not name is compared with that side's role there, so a canary added for a
/// site reads `shadow -> canary` for the candidate and `live -> shadow` for the live
/// version, not `none -> ...`.
pub fn transitions(old: &ModelRegistry, new: &ModelRegistry) -> Vec<Transition> {
    let models: BTreeSet<&str> = old
        .rollouts()
        .chain(new.rollouts())
        .map(|r| r.model.as_str())
        .collect();
    let mut out = Vec::new();
    for model in models {
        let (a, b) = (old.rollout(model), new.rollout(model));
        let mut all_scopes = BTreeSet::new();
        let mut all_versions = BTreeSet::new();
        for r in [a, b].into_iter().flatten() {
            all_scopes.extend(scopes(r));
            all_versions.extend(versions(r));
        }
        for scope in &all_scopes {
            for v in &all_versions {
                let was = a.and_then(|r| role_in(r, v, scope));
                let now = b.and_then(|r| role_in(r, v, scope));
                if was != now {
                    out.push(Transition {
                        model: model.to_owned(),
                        version: (*v).to_owned(),
                        scope: scope.clone(),
                        old: was,
                        new: now,
                        old_live: a.map(|r| r.live.clone()),
                    });
                }
            }
        }
    }
    out
}

/// Why the `[scoring] tables` and a models file cannot run together: the bridge
/// refuses to start, and a models reload that would bring this about is refused
/// (`policy_rejected`, reason `models_tables_mismatch`; the registry in force stays).
/// Otherwise an edited table would run under an approved version's name, a table
/// would get no role without a word, or a live or canary version nobody loaded would
/// stop the score.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TablesError {
    #[error("score table {path} ({model}/{version}) is not in the model registry")]
    NotRegistered {
        path: String,
        model: String,
        version: String,
    },
    #[error(
        "score table {path} ({model}/{version}) has SHA-256 {table_sha256}, the model registry's artifact_sha256 is {registry_sha256}"
    )]
    Digest {
        path: String,
        model: String,
        version: String,
        table_sha256: String,
        registry_sha256: String,
    },
    #[error(
        "score table {path} ({model}/{version}): the model registry has no [[rollout]] for {model}"
    )]
    NoRollout {
        path: String,
        model: String,
        version: String,
    },
    #[error("the [[rollout]] of {model} makes {version} {role}, but no [scoring] table has it")]
    NotLoaded {
        model: String,
        version: String,
        role: &'static str,
    },
}

/// Checks the loaded score tables against `models` (see [`TablesError`]): every table
/// is a registry entry of its model and version with the table's digest, its model has
/// a `[[rollout]]`, and that rollout's live and canary versions are loaded tables (a
/// shadow version not loaded is not computed: it delivers nothing either way, and is
/// logged at start by `table_loaded_record`'s roles).
pub fn check_tables(
    tables: &[crate::score::ScoreModel],
    models: &ModelRegistry,
) -> Result<(), TablesError> {
    for t in tables {
        let (model, version) = (t.table.model(), t.table.version());
        let named = || (t.path.clone(), model.to_owned(), version.to_owned());
        let Some(entry) = models.entry(model, version) else {
            let (path, model, version) = named();
            return Err(TablesError::NotRegistered {
                path,
                model,
                version,
            });
        };
        if !entry.artifact_sha256.eq_ignore_ascii_case(t.table.sha256()) {
            let (path, model, version) = named();
            return Err(TablesError::Digest {
                path,
                model,
                version,
                table_sha256: t.table.sha256().to_owned(),
                registry_sha256: entry.artifact_sha256.clone(),
            });
        }
        let Some(rollout) = models.rollout(model) else {
            let (path, model, version) = named();
            return Err(TablesError::NoRollout {
                path,
                model,
                version,
            });
        };
        let loaded = |v: &str| {
            tables
                .iter()
                .any(|x| x.table.model() == model && x.table.version() == v)
        };
        let needed = std::iter::once((rollout.live.as_str(), "live")).chain(
            rollout
                .canary
                .iter()
                .map(|c| (c.version.as_str(), "canary")),
        );
        for (v, role) in needed {
            if !loaded(v) {
                return Err(TablesError::NotLoaded {
                    model: model.to_owned(),
                    version: v.to_owned(),
                    role,
                });
            }
        }
    }
    Ok(())
}

/// Why `[alerts] rules` and `[alerts] candidates` cannot run with a models file: the
/// bridge refuses to start, and a models (or rules) reload that would bring this about
/// is refused (`policy_rejected`, reason `models_rule_sets_mismatch`; what is in force
/// stays). The rule of [`TablesError`], for rule sets: an edited file would run under
/// an approved version's name, or a live or canary version nobody loaded would leave
/// its devices without clinical alerting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleSetsError {
    #[error(
        "rule set {path} (version {version}, SHA-256 {sha256}) is not a kind = \"rules\" entry of the model registry"
    )]
    NotRegistered {
        path: String,
        version: String,
        sha256: String,
    },
    #[error(
        "rule set {path} says version {file_version}; the model registry's entry with its digest is {model}/{registry_version}"
    )]
    Version {
        path: String,
        model: String,
        file_version: String,
        registry_version: String,
    },
    #[error(
        "rule set {path} is registered as {model}, the base rule set as {base_model}: candidates are versions of the base's model"
    )]
    OtherModel {
        path: String,
        model: String,
        base_model: String,
    },
    #[error(
        "the rule sets are registered as {model}; the bridge started with them as {was} (a rename needs a restart)"
    )]
    Renamed { model: String, was: String },
    #[error("rule sets {path} and {other} are both version {version}")]
    Duplicate {
        path: String,
        other: String,
        version: String,
    },
    #[error("the model registry has no [[rollout]] for the rule set {model}")]
    NoRollout { model: String },
    #[error("the [[rollout]] of {model} makes {version} {role}, but no loaded rule set has it")]
    NotLoaded {
        model: String,
        version: String,
        role: &'static str,
    },
}

/// Checks the base rule set and the candidates (`(path, rule set)`, base first)
/// against `models` (see [`RuleSetsError`]): each is the registry's `kind = "rules"`
/// entry with its digest and its own `version`, all of one model, no version twice;
/// that model has a `[[rollout]]` whose live and canary versions are loaded (a shadow
/// not loaded computes nothing and delivers nothing: allowed, like a score table's).
/// Returns the rule set's model name. Only with candidates: without them nothing is
/// checked (as before issue 21's candidates).
pub fn check_rule_sets(
    sets: &[(&str, &vitalmq_policies::RuleSet)],
    models: &ModelRegistry,
) -> Result<String, RuleSetsError> {
    let mut model: Option<String> = None;
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    for (path, set) in sets {
        let Some(entry) = rule_set_entry(models, set) else {
            return Err(RuleSetsError::NotRegistered {
                path: (*path).to_owned(),
                version: set.version().to_owned(),
                sha256: set.sha256().to_owned(),
            });
        };
        if entry.version != set.version() {
            return Err(RuleSetsError::Version {
                path: (*path).to_owned(),
                model: entry.name.clone(),
                file_version: set.version().to_owned(),
                registry_version: entry.version.clone(),
            });
        }
        match &model {
            Some(m) if *m != entry.name => {
                return Err(RuleSetsError::OtherModel {
                    path: (*path).to_owned(),
                    model: entry.name.clone(),
                    base_model: m.clone(),
                });
            }
            Some(_) => {}
            None => model = Some(entry.name.clone()),
        }
        if let Some(other) = seen.insert(set.version(), path) {
            return Err(RuleSetsError::Duplicate {
                path: (*path).to_owned(),
                other: other.to_owned(),
                version: set.version().to_owned(),
            });
        }
    }
    let model = model.unwrap_or_default();
    let Some(rollout) = models.rollout(&model) else {
        return Err(RuleSetsError::NoRollout { model });
    };
    let needed = std::iter::once((rollout.live.as_str(), "live")).chain(
        rollout
            .canary
            .iter()
            .map(|c| (c.version.as_str(), "canary")),
    );
    for (v, role) in needed {
        if !seen.contains_key(v) {
            return Err(RuleSetsError::NotLoaded {
                model,
                version: v.to_owned(),
                role,
            });
        }
    }
    Ok(model)
}

/// The registry entry of a rule set: kind `rules` with the file's digest, the one
/// naming the file's own version when the same file is registered under several
/// versions (else the first, whose version the check then reports as not the file's).
pub fn rule_set_entry<'m>(
    models: &'m ModelRegistry,
    set: &vitalmq_policies::RuleSet,
) -> Option<&'m vitalmq_policies::ModelEntry> {
    let mut matching = models.entries().iter().filter(|e| {
        e.kind == vitalmq_policies::ModelKind::Rules
            && e.artifact_sha256.eq_ignore_ascii_case(set.sha256())
    });
    matching
        .clone()
        .find(|e| e.version == set.version())
        .or_else(|| matching.next())
}

/// The audit record of a start (or reload) refused because the rule sets do not fit
/// the models file (`models_sha256`).
pub fn rule_sets_refused_record(e: &RuleSetsError, models_sha256: &str) -> AuditRecord {
    AuditRecord::new(Component::Bridge, Event::PolicyRejected)
        .action("rule_sets_checked")
        .decision(Decision::Deny)
        .policy_sha256(models_sha256.to_owned())
        .reason("models_rule_sets_mismatch")
        .detail("error", e.to_string())
}

/// The audit record of a start refused because the score tables do not fit the
/// models file (`models_sha256`).
pub fn tables_refused_record(e: &TablesError, models_sha256: &str) -> AuditRecord {
    AuditRecord::new(Component::Bridge, Event::PolicyRejected)
        .action("score_tables_checked")
        .decision(Decision::Deny)
        .policy_sha256(models_sha256.to_owned())
        .reason("models_tables_mismatch")
        .detail("error", e.to_string())
}

/// The audit record of one transition, naming both models file digests.
pub fn audit_record(t: &Transition, old_sha256: &str, new_sha256: &str) -> AuditRecord {
    AuditRecord::new(Component::Bridge, Event::PolicyReloaded)
        .action("rollout_transition")
        .resource(format!("{}/{}", t.model, t.version))
        .decision(Decision::Allow)
        .policy_sha256(new_sha256.to_owned())
        .reason(t.change().as_str())
        .detail("model", t.model.clone())
        .detail("version", t.version.clone())
        .detail("scope", t.scope.to_string())
        .detail("old_live", t.old_live.clone().unwrap_or_default())
        .detail("old_role", role_str(t.old))
        .detail("new_role", role_str(t.new))
        .detail("old_sha256", old_sha256.to_owned())
        .detail("new_sha256", new_sha256.to_owned())
}

/// The audit record of a rule set taken into force at start with candidates
/// (`rule_set_loaded`): what its alerts and shadow alerts name (`version`,
/// `policy_sha256`), traceable to the file and its roles in the rollout (by scope).
pub fn rule_set_loaded_record(
    model: &str,
    set: &vitalmq_policies::RuleSet,
    path: &str,
    candidate: bool,
    models: &ModelRegistry,
) -> AuditRecord {
    table_loaded_record(model, set.version(), set.sha256(), path, Some(models))
        .action("rule_set_loaded")
        .detail("candidate", candidate)
}

/// The audit record of a score table taken into force at start: what every score row
/// names (`model`, `version`, `config_sha256`), traceable to the file and to its role
/// in the rollout in force at start (`roles`, by scope; empty without a models file).
pub fn table_loaded_record(
    model: &str,
    version: &str,
    sha256: &str,
    path: &str,
    models: Option<&ModelRegistry>,
) -> AuditRecord {
    let roles: serde_json::Map<String, serde_json::Value> = models
        .map(roles)
        .unwrap_or_default()
        .into_iter()
        .filter(|((m, v, _), _)| m == model && v == version)
        .map(|((_, _, scope), role)| (scope.to_string(), role.as_str().into()))
        .collect();
    AuditRecord::new(Component::Bridge, Event::ComponentStarted)
        .action("score_table_loaded")
        .resource(path.to_owned())
        .policy_sha256(sha256.to_owned())
        .detail("model", model.to_owned())
        .detail("version", version.to_owned())
        .detail("config_sha256", sha256.to_owned())
        .detail("roles", serde_json::Value::Object(roles))
        .detail(
            "models_sha256",
            models.map(|m| m.sha256().to_owned()).unwrap_or_default(),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(rollout: &str) -> ModelRegistry {
        let text = include_str!("../../policies/examples/models.toml").replace(
            "[[rollout]]\nmodel = \"news2\"\nlive = \"rcp-2017.1\"",
            &format!(
                "[[models]]\nname = \"news2\"\nversion = \"cand-2\"\nkind = \"score\"\n\
                 artifact_sha256 = \"{}\"\nlineage = \"t\"\nfeature_pipeline = \"f\"\n\
                 intended_use = \"t\"\nstatus = \"approved\"\napproved_by = \"board\"\n\
                 approved_at = \"2025-06-01T09:00:00Z\"\n\n\
                 [[rollout]]\nmodel = \"news2\"\nlive = \"rcp-2017.1\"\n{rollout}",
                "0".repeat(64)
            ),
        );
        ModelRegistry::parse(&text, std::path::Path::new("models.toml")).expect("models")
    }

    fn seen(ts: &[Transition]) -> Vec<(String, String, &'static str, &'static str)> {
        ts.iter()
            .map(|t| {
                (
                    t.version.clone(),
                    t.scope.to_string(),
                    role_str(t.old),
                    role_str(t.new),
                )
            })
            .collect()
    }

    fn t(
        v: &str,
        s: &str,
        a: &'static str,
        b: &'static str,
    ) -> (String, String, &'static str, &'static str) {
        (v.into(), s.into(), a, b)
    }

    #[test]
    fn shadow_to_canary_and_back_is_one_transition_per_version_and_scope() {
        let shadow = registry("shadow = [\"cand-2\"]");
        let canary = registry("canary = [{ version = \"cand-2\", sites = [\"site-b\"] }]");
        assert!(transitions(&shadow, &shadow).is_empty());
        let on = transitions(&shadow, &canary);
        assert_eq!(
            seen(&on),
            [
                t("cand-2", "*", "shadow", "none"),
                t("cand-2", "site:site-b", "shadow", "canary"),
                t("rcp-2017.1", "site:site-b", "live", "shadow"),
            ]
        );
        assert!(on.iter().all(|t| !t.is_rollback()));
        let back = transitions(&canary, &shadow);
        assert_eq!(
            seen(&back),
            [
                t("cand-2", "*", "none", "shadow"),
                t("cand-2", "site:site-b", "canary", "shadow"),
                t("rcp-2017.1", "site:site-b", "shadow", "live"),
            ]
        );
        assert_eq!(back.iter().filter(|t| t.is_rollback()).count(), 2);
        let r = audit_record(&back[1], canary.sha256(), shadow.sha256());
        let line: serde_json::Value = serde_json::to_value(&r).expect("json");
        assert_eq!(line["action"], "rollout_transition");
        assert_eq!(line["reason"], "rollback");
        assert_eq!(line["details"]["old_role"], "canary");
        assert_eq!(line["details"]["new_role"], "shadow");
        assert_eq!(line["details"]["old_sha256"], canary.sha256());
        assert_eq!(line["details"]["new_sha256"], shadow.sha256());
        assert_eq!(line["policy_sha256"], shadow.sha256());
    }

    /// Promoting the shadow version to live is a promotion, not a rollback; the
    /// demoted live version's transition is a rollout change.
    #[test]
    fn a_promotion_is_audited_as_one() {
        let before = registry("shadow = [\"cand-2\"]");
        let text = include_str!("../../policies/examples/models.toml");
        let promoted = ModelRegistry::parse(
            &text.replace(
                "[[rollout]]\nmodel = \"news2\"\nlive = \"rcp-2017.1\"",
                &format!(
                    "[[models]]\nname = \"news2\"\nversion = \"cand-2\"\nkind = \"score\"\n\
                     artifact_sha256 = \"{}\"\nlineage = \"t\"\nfeature_pipeline = \"f\"\n\
                     intended_use = \"t\"\nstatus = \"approved\"\napproved_by = \"board\"\n\
                     approved_at = \"2025-06-01T09:00:00Z\"\n\n\
                     [[rollout]]\nmodel = \"news2\"\nlive = \"cand-2\"\nshadow = [\"rcp-2017.1\"]",
                    "0".repeat(64)
                ),
            ),
            std::path::Path::new("models.toml"),
        )
        .expect("models");
        let ts = transitions(&before, &promoted);
        let reasons: Vec<_> = ts
            .iter()
            .map(|t| (t.version.as_str(), t.change().as_str()))
            .collect();
        assert_eq!(
            reasons,
            [("cand-2", "promotion"), ("rcp-2017.1", "rollout_changed")]
        );
        let r = serde_json::to_value(audit_record(&ts[0], before.sha256(), promoted.sha256()))
            .expect("json");
        assert_eq!(r["reason"], "promotion");
        assert_eq!(r["details"]["old_sha256"], before.sha256());
        assert_eq!(r["details"]["new_sha256"], promoted.sha256());
        // And back: two files alone cannot tell the return of a version live before
        // from a first promotion; it is audited a promotion, naming the live version
        // it replaces (`old_live`).
        let back = transitions(&promoted, &before);
        assert!(
            back.iter()
                .any(|t| t.version == "rcp-2017.1" && t.change() == Change::Promotion)
        );
    }

    fn table(text: &str) -> crate::score::ScoreModel {
        let t = vitalmq_policies::ScoreTable::parse(text, std::path::Path::new("t.toml"))
            .expect("table");
        crate::score::ScoreModel {
            table: std::sync::Arc::new(t),
            path: "t.toml".into(),
        }
    }

    const NEWS2: &str = include_str!("../../policies/examples/news2.toml");

    #[test]
    fn score_tables_must_be_the_registrys_and_its_rollouts_loaded() {
        let live = table(NEWS2);
        let shipped = registry("");
        assert_eq!(check_tables(std::slice::from_ref(&live), &shipped), Ok(()));

        // An edited chart under the approved version's name.
        let edited = table(&format!("{NEWS2}\n# edited after approval\n"));
        assert_ne!(edited.table.sha256(), live.table.sha256());
        match check_tables(std::slice::from_ref(&edited), &shipped) {
            Err(TablesError::Digest {
                table_sha256,
                registry_sha256,
                ..
            }) => {
                assert_eq!(table_sha256, edited.table.sha256());
                assert_eq!(registry_sha256, live.table.sha256());
            }
            other => panic!("{other:?}"),
        }

        // A version the registry does not know.
        let unknown = table(&NEWS2.replace("version = \"rcp-2017.1\"", "version = \"x-9\""));
        assert!(matches!(
            check_tables(&[live.clone(), unknown], &shipped),
            Err(TablesError::NotRegistered { version, .. }) if version == "x-9"
        ));

        // No rollout for the table's model.
        let text = include_str!("../../policies/examples/models.toml")
            .replace("[[rollout]]\nmodel = \"news2\"\nlive = \"rcp-2017.1\"", "");
        let none = ModelRegistry::parse(&text, std::path::Path::new("m.toml")).expect("models");
        assert!(matches!(
            check_tables(std::slice::from_ref(&live), &none),
            Err(TablesError::NoRollout { .. })
        ));

        // A canary nobody loaded would leave its sites without a score.
        let canary = registry("canary = [{ version = \"cand-2\", sites = [\"site-b\"] }]");
        assert!(matches!(
            check_tables(std::slice::from_ref(&live), &canary),
            Err(TablesError::NotLoaded { version, role: "canary", .. }) if version == "cand-2"
        ));
        // A shadow nobody loaded delivers nothing: allowed.
        let shadow = registry("shadow = [\"cand-2\"]");
        assert_eq!(check_tables(std::slice::from_ref(&live), &shadow), Ok(()));
    }

    const RULES: &str = include_str!("../../policies/examples/rules.toml");

    fn rule_set(text: &str) -> vitalmq_policies::RuleSet {
        vitalmq_policies::RuleSet::parse(text, std::path::Path::new("r.toml")).expect("rules")
    }

    fn candidate_rules() -> vitalmq_policies::RuleSet {
        rule_set(&RULES.replacen(
            "version = \"2025-06-01.1\"",
            "version = \"2025-07-01.1\"",
            1,
        ))
    }

    /// The shipped registry with the candidate rule set registered (`entry_sha256`,
    /// `entry_version`) and `rollout` for the rule set (none when empty).
    fn with_rules(entry_version: &str, entry_sha256: &str, rollout: &str) -> ModelRegistry {
        let text = format!(
            "{}\n[[models]]\nname = \"rules\"\nversion = \"{entry_version}\"\nkind = \"rules\"\n\
             artifact_sha256 = \"{entry_sha256}\"\nlineage = \"t\"\nfeature_pipeline = \"f\"\n\
             intended_use = \"t\"\nstatus = \"approved\"\napproved_by = \"board\"\napproved_at = \"2025-07-01T09:00:00Z\"\n\n{rollout}",
            include_str!("../../policies/examples/models.toml")
        );
        ModelRegistry::parse(&text, std::path::Path::new("models.toml")).expect("models")
    }

    #[test]
    fn rule_sets_must_be_the_registrys_and_its_rollouts_loaded() {
        let base = rule_set(RULES);
        let cand = candidate_rules();
        let shadow = "[[rollout]]\nmodel = \"rules\"\nlive = \"2025-06-01.1\"\nshadow = [\"2025-07-01.1\"]\n";
        let models = with_rules("2025-07-01.1", cand.sha256(), shadow);
        let sets = [("rules.toml", &base), ("cand.toml", &cand)];
        assert_eq!(check_rule_sets(&sets, &models), Ok("rules".to_owned()));

        // An edited candidate under the registered digest.
        let edited = rule_set(&format!("{}\n# edited\n", cand_text()));
        assert!(matches!(
            check_rule_sets(&[("rules.toml", &base), ("cand.toml", &edited)], &models),
            Err(RuleSetsError::NotRegistered { path, .. }) if path == "cand.toml"
        ));
        // The file says another version than its registry entry.
        let misnamed = with_rules(
            "2025-08-01.1",
            cand.sha256(),
            &shadow.replace("2025-07-01.1", "2025-08-01.1"),
        );
        assert!(matches!(
            check_rule_sets(&sets, &misnamed),
            Err(RuleSetsError::Version { file_version, registry_version, .. })
                if file_version == "2025-07-01.1" && registry_version == "2025-08-01.1"
        ));
        // The same file registered under two versions (an earlier entry first): the
        // entry naming the file's version is the file's, not the first match.
        let twice = {
            let text = include_str!("../../policies/examples/models.toml");
            let entry = |v: &str| {
                format!(
                    "[[models]]\nname = \"rules\"\nversion = \"{v}\"\nkind = \"rules\"\n\
                     artifact_sha256 = \"{}\"\nlineage = \"t\"\nfeature_pipeline = \"f\"\n\
                     intended_use = \"t\"\nstatus = \"approved\"\napproved_by = \"board\"\n\
                     approved_at = \"2025-06-30T09:00:00Z\"\n\n",
                    cand.sha256()
                )
            };
            let text = format!(
                "{text}\n{}{}{shadow}",
                entry("2025-06-30.9"),
                entry("2025-07-01.1")
            );
            ModelRegistry::parse(&text, std::path::Path::new("m.toml")).expect("models")
        };
        assert_eq!(
            rule_set_entry(&twice, &cand).map(|e| e.version.as_str()),
            Some("2025-07-01.1")
        );
        assert_eq!(check_rule_sets(&sets, &twice), Ok("rules".to_owned()));
        // The same file twice.
        assert!(matches!(
            check_rule_sets(&[("rules.toml", &base), ("again.toml", &base)], &models),
            Err(RuleSetsError::Duplicate { .. })
        ));
        // No rollout for the rule set.
        let none = with_rules("2025-07-01.1", cand.sha256(), "");
        assert_eq!(
            check_rule_sets(&sets, &none),
            Err(RuleSetsError::NoRollout {
                model: "rules".into()
            })
        );
        // A canary (or live version) nobody loaded.
        let canary = with_rules(
            "2025-07-01.1",
            cand.sha256(),
            "[[rollout]]\nmodel = \"rules\"\nlive = \"2025-06-01.1\"\ncanary = [{ version = \"2025-07-01.1\", sites = [\"site-b\"] }]\n",
        );
        assert_eq!(check_rule_sets(&sets, &canary), Ok("rules".to_owned()));
        assert!(matches!(
            check_rule_sets(&sets[..1], &canary),
            Err(RuleSetsError::NotLoaded { version, role: "canary", .. }) if version == "2025-07-01.1"
        ));
        let promoted = with_rules(
            "2025-07-01.1",
            cand.sha256(),
            "[[rollout]]\nmodel = \"rules\"\nlive = \"2025-07-01.1\"\n",
        );
        assert!(matches!(
            check_rule_sets(&sets[..1], &promoted),
            Err(RuleSetsError::NotLoaded { role: "live", .. })
        ));
        // A shadow not loaded: allowed (it computes nothing).
        assert_eq!(check_rule_sets(&sets[..1], &models), Ok("rules".to_owned()));
        // A candidate registered under another model name.
        let text = format!(
            "{}\n[[models]]\nname = \"other\"\nversion = \"2025-07-01.1\"\nkind = \"rules\"\n\
             artifact_sha256 = \"{}\"\nlineage = \"t\"\nfeature_pipeline = \"f\"\n\
             intended_use = \"t\"\nstatus = \"approved\"\napproved_by = \"board\"\napproved_at = \"2025-07-01T09:00:00Z\"\n\n[[rollout]]\nmodel = \"rules\"\nlive = \"2025-06-01.1\"\n",
            include_str!("../../policies/examples/models.toml"),
            cand.sha256()
        );
        let other = ModelRegistry::parse(&text, std::path::Path::new("m.toml")).expect("models");
        assert!(matches!(
            check_rule_sets(&sets, &other),
            Err(RuleSetsError::OtherModel { model, .. }) if model == "other"
        ));
        let line = serde_json::to_value(rule_sets_refused_record(
            &RuleSetsError::NoRollout {
                model: "rules".into(),
            },
            models.sha256(),
        ))
        .expect("json");
        assert_eq!(line["reason"], "models_rule_sets_mismatch");
        assert_eq!(line["decision"], "deny");

        // The rules model's transitions are audited like a score's.
        let canaried = transitions(&models, &canary);
        assert!(canaried.iter().any(|t| t.model == "rules"
            && t.version == "2025-07-01.1"
            && t.new == Some(ModelRole::Canary)));
        let back = transitions(&canary, &models);
        assert!(
            back.iter()
                .any(|t| t.model == "rules" && t.change() == Change::Rollback)
        );
        let loaded = serde_json::to_value(rule_set_loaded_record(
            "rules",
            &cand,
            "cand.toml",
            true,
            &canary,
        ))
        .expect("json");
        assert_eq!(loaded["action"], "rule_set_loaded");
        assert_eq!(loaded["details"]["roles"]["site:site-b"], "canary");
        assert_eq!(loaded["details"]["roles"]["*"], serde_json::Value::Null);
    }

    fn cand_text() -> String {
        RULES.replacen(
            "version = \"2025-06-01.1\"",
            "version = \"2025-07-01.1\"",
            1,
        )
    }

    #[test]
    fn a_cohort_canary_is_its_own_scope() {
        let live = registry("");
        let canary = registry("canary = [{ version = \"cand-2\", cohorts = [\"copd\"] }]");
        assert_eq!(
            seen(&transitions(&live, &canary)),
            [
                t("cand-2", "cohort:copd", "none", "canary"),
                t("rcp-2017.1", "cohort:copd", "live", "shadow"),
            ]
        );
        let roles = roles(&canary);
        assert_eq!(
            roles.get(&("news2".into(), "rcp-2017.1".into(), Scope::Everywhere)),
            Some(&ModelRole::Live)
        );
    }
}
