//! The routes of the admin API (JSON in and out). Every call states a purpose
//! (`X-Vitalmq-Purpose` header or `?purpose=`); every call, allowed or refused, is
//! audited before its answer leaves.
//!
//! | method | path | action |
//! |---|---|---|
//! | GET | `/v1/events[?device=D]` | `events.read` |
//! | GET | `/v1/alerts[?device=D]` | `alerts.read` |
//! | GET | `/v1/quarantine[?device=D]` | `quarantine.read` |
//! | GET | `/v1/trace/{id}` | `trace.read` |
//! | POST | `/v1/registry/{device}` (body `{"change": "assign", ...}`) | `registry.<change>` |
//! | POST | `/v1/reid/lookup` (body `{"pseudonym": "pt-..."}`) | `reid.lookup` |
//! | GET | `/v1/holds` | `holds.read` |
//! | POST | `/v1/holds` (body `{"id", "reason", "patient_ref"?, "device"?, "from"?, "to"?}`) | `hold.place` |
//! | POST | `/v1/holds/{id}/lift` (body `{"reason"}`) | `hold.lift` |
//! | POST | `/v1/patients/{patient_ref}/erase` (body `{"reason"}`) | `patient.erase` |
//! | POST | `/v1/patients/{patient_ref}/export` (body `{"purpose"?}`) | `patient.export` |
//!
//! Scope: a site-scoped role reads only records of its sites. A listing without
//! `device` leaves the others out (and says how many); a read naming a device, or a
//! trace, that reaches outside the scope is refused (403) unless the call gives a
//! break-glass reason (`X-Vitalmq-Break-Glass` or `?break_glass=`): then it is answered
//! in full, audited as `break_glass` with the reason, and an operational alert is
//! written to the break-glass outbox first. Changes never break glass: a site-scoped
//! role changes only a device that served at least one site and only sites of its
//! scope, and assigns it only to a site of its scope. Legal holds span sites: only a
//! role of scope `all` reads, places or lifts them (a site-scoped role is refused, 403
//! `outside_scope`); without a holds file configured they answer 501 `not_configured`.
//! Erasure and export of a patient also need a role of scope `all` (a patient's data
//! spans the sites of every device they had); `patient_ref` must be a care pseudonym
//! (`pt-...`), anything else is refused (400) without being recorded. Both are audited
//! as changes are (`allowed`, then the outcome: `succeeded`, `conflict` (409: under a
//! legal hold, a device still assigned, an erased patient), `failed`), with the
//! resource `patient/<patient_ref>` and counts and hashes, never the patient's data.
//!
//! Every answer is audited, including those no handler makes: a wrong method (405), a
//! query, path or body the extractors reject (400, 413): [`audit_unaudited`] records
//! any answer whose handler did not, before it leaves.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Extension, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use vitalmq_audit::Decision;
use vitalmq_policies::{AdminAction, Grantee, Scope, SiteId};

use crate::access::{BREAK_GLASS_HEADER, Caller, PURPOSE_HEADER, RolesFile, statement};
use crate::audit::{AdminAudit, Entry};
use crate::backend::{Acting, Backend, BackendError, Record, Rows, ScopeCheck};
use crate::ops_alert::{BreakGlass, OpsOutbox};

/// What the routes share.
pub struct App {
    pub roles: RolesFile,
    pub audit: AdminAudit,
    pub outbox: OpsOutbox,
    pub backend: Arc<dyn Backend>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("roles", &self.roles)
            .field("audit", &self.audit)
            .finish_non_exhaustive()
    }
}

/// Largest request body accepted (a change or a lookup is a few hundred bytes).
pub const MAX_BODY: usize = 64 * 1024;
/// Time a client has to send its request body once its head is read.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The routes; the server adds the [`Caller`] of each connection as an extension.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route(
            "/v1/events",
            get(listing(Rows::Events, AdminAction::EventsRead)),
        )
        .route(
            "/v1/alerts",
            get(listing(Rows::Alerts, AdminAction::AlertsRead)),
        )
        .route(
            "/v1/quarantine",
            get(listing(Rows::Quarantine, AdminAction::QuarantineRead)),
        )
        .route("/v1/trace/:id", get(trace))
        .route("/v1/registry/:device", post(change))
        .route("/v1/reid/lookup", post(reid_lookup))
        .route("/v1/holds", get(list_holds).post(place_hold))
        .route("/v1/holds/:id/lift", post(lift_hold))
        .route(
            "/v1/patients/:patient_ref/erase",
            post(patient(AdminAction::PatientErase)),
        )
        .route(
            "/v1/patients/:patient_ref/export",
            post(patient(AdminAction::PatientExport)),
        )
        .fallback(unknown)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn(read_body))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&app),
            audit_unaudited,
        ))
        .with_state(app)
}

/// Reads the whole body (at most [`MAX_BODY`], within [`BODY_READ_TIMEOUT`]) before
/// any handler runs, so a peer that stops sending cannot hold a handler; a body too
/// large (413) or too slow (408) is answered here and audited by [`audit_unaudited`].
async fn read_body(request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    match tokio::time::timeout(BODY_READ_TIMEOUT, axum::body::to_bytes(body, MAX_BODY)).await {
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
                .await
        }
        Ok(Err(e))
            if std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>()) =>
        {
            (
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is larger than {MAX_BODY} bytes"),
            )
                .into_response()
        }
        Ok(Err(_)) => (StatusCode::BAD_REQUEST, "the body was cut off").into_response(),
        Err(_) => (
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the body was not sent within {} s",
                BODY_READ_TIMEOUT.as_secs()
            ),
        )
            .into_response(),
    }
}

/// Marks an answer whose call its handler audited.
#[derive(Debug, Clone, Copy)]
struct Audited;

/// Audits an answer no handler audited (axum's own 405, an extractor's rejection) as a
/// refused `request`, and answers it as the handlers do (JSON `error` and `reason`).
async fn audit_unaudited(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let caller = request.extensions().get::<Arc<Caller>>().cloned();
    let method = request.method().clone();
    let path: String = request.uri().path().chars().take(200).collect();
    let response = next.run(request).await;
    if response.extensions().get::<Audited>().is_some() {
        return response;
    }
    let status = response.status();
    let entry = Entry::new("request", Some(path)).detail("method", method.as_str());
    if status.is_success() || status.is_redirection() {
        // No handler answers so; should one ever, it is still audited.
        let mut entry = entry.detail("status", status.as_u16());
        entry.decision = Decision::Allow;
        entry.reason = "answered".into();
        if let Err(e) = app.audit.record(caller.as_deref(), &entry).await {
            return audit_down(&e);
        }
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("refused").to_owned()
    } else {
        text
    };
    let mut answer = refuse_as(
        &app,
        caller.as_deref(),
        entry,
        status,
        rejection_reason(status),
        message,
    )
    .await;
    if let Some(allow) = parts.headers.get(header::ALLOW) {
        answer.headers_mut().insert(header::ALLOW, allow.clone());
    }
    answer
}

/// The audited reason of a rejection by its status.
fn rejection_reason(status: StatusCode) -> &'static str {
    match status {
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
        StatusCode::REQUEST_TIMEOUT => "body_timeout",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::NOT_FOUND => "no_such_endpoint",
        s if s.is_client_error() => "bad_request",
        _ => "server_error",
    }
}

type Q = Query<HashMap<String, String>>;

/// Anything else: refused (404) and audited like every call.
async fn unknown(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Arc<Caller>>,
    uri: axum::http::Uri,
) -> Response {
    refuse(
        &app,
        &caller,
        Entry::new("unknown", Some(uri.path().chars().take(200).collect())),
        StatusCode::NOT_FOUND,
        "no_such_endpoint",
        "no such endpoint".into(),
    )
    .await
}

/// A JSON answer of a call its handler audited.
fn reply(status: StatusCode, body: Value) -> Response {
    let mut response = (status, axum::Json(body)).into_response();
    response.extensions_mut().insert(Audited);
    response
}

/// A call that was decided: who, under which role and purpose.
struct Decided {
    grantee: Grantee,
    identity: String,
    purpose: String,
    entry: Entry,
}

impl Decided {
    fn acting(&self) -> Acting {
        Acting {
            identity: self.identity.clone(),
            role: self.grantee.role.name.clone(),
            purpose: self.purpose.clone(),
        }
    }
}

/// Writes `entry` (refused: `why`, answered with `status`) and the answer to send.
async fn refuse(
    app: &App,
    caller: &Caller,
    entry: Entry,
    status: StatusCode,
    why: &str,
    message: String,
) -> Response {
    refuse_as(app, Some(caller), entry, status, why, message).await
}

async fn refuse_as(
    app: &App,
    caller: Option<&Caller>,
    mut entry: Entry,
    status: StatusCode,
    why: &str,
    message: String,
) -> Response {
    entry.decision = Decision::Deny;
    entry.reason = format!("refused:{why}");
    entry = entry.detail("status", status.as_u16());
    if let Err(e) = app.audit.record(caller, &entry).await {
        return audit_down(&e);
    }
    reply(status, json!({"error": message, "reason": why}))
}

fn audit_down(e: &dyn std::error::Error) -> Response {
    tracing::error!(error = %e, "the admin audit log cannot be written; answering 503");
    reply(
        StatusCode::SERVICE_UNAVAILABLE,
        json!({"error": "the audit log cannot be written, so nothing is served", "reason": "audit_unavailable"}),
    )
}

/// Who the caller is, its role and purpose; a refusal is audited and returned.
async fn decide(
    app: &App,
    caller: &Caller,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    action: AdminAction,
    resource: Option<String>,
) -> Result<Decided, Response> {
    let mut entry = Entry::new(action.as_str(), resource);
    let Some(operator) = caller.operator().cloned() else {
        let who = caller
            .identity
            .as_ref()
            .map_or("no SPIFFE id".to_owned(), |i| format!("role {}", i.role));
        return Err(refuse(
            app,
            caller,
            entry,
            StatusCode::FORBIDDEN,
            "not_an_operator",
            format!("only operator certificates may use the admin API ({who})"),
        )
        .await);
    };
    let purpose = match statement(headers, PURPOSE_HEADER, query.get("purpose")) {
        Ok(Some(p)) => p,
        Ok(None) => {
            return Err(refuse(
                app,
                caller,
                entry,
                StatusCode::BAD_REQUEST,
                "no_purpose",
                format!("state the purpose of the call ({PURPOSE_HEADER} or ?purpose=)"),
            )
            .await);
        }
        Err(why) => {
            return Err(refuse(
                app,
                caller,
                entry,
                StatusCode::BAD_REQUEST,
                "bad_purpose",
                format!("purpose {why}"),
            )
            .await);
        }
    };
    entry.purpose = Some(purpose.clone());
    let roles = app.roles.current();
    entry.policy_sha256 = Some(roles.sha256().to_owned());
    let Some(grantee) = roles.grantee(&operator).cloned() else {
        return Err(refuse(
            app,
            caller,
            entry,
            StatusCode::FORBIDDEN,
            "no_role",
            format!("operator `{operator}` has no role in the admin roles policy"),
        )
        .await);
    };
    entry.role = Some(grantee.role.name.clone());
    if !grantee.may(action) {
        return Err(refuse(
            app,
            caller,
            entry,
            StatusCode::FORBIDDEN,
            "action_not_in_role",
            format!("role `{}` may not {action}", grantee.role.name),
        )
        .await);
    }
    Ok(Decided {
        grantee,
        identity: caller
            .identity
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        purpose,
        entry,
    })
}

fn in_scope(grantee: &Grantee, site: Option<&str>) -> bool {
    grantee.role.scope == Scope::All
        || site
            .and_then(|s| SiteId::new(s).ok())
            .is_some_and(|s| grantee.reaches(&s))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BackendError> + Send + 'static,
) -> Result<T, BackendError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(BackendError::Failed(format!("backend task failed: {e}"))))
}

/// A backend error: audited as the call's outcome, answered with its status.
async fn failed(app: &App, caller: &Caller, mut entry: Entry, e: BackendError) -> Response {
    let (status, reason) = match &e {
        BackendError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
        BackendError::Refused(_) => (StatusCode::UNPROCESSABLE_ENTITY, "failed"),
        BackendError::OutsideScope(_) => (StatusCode::FORBIDDEN, "outside_scope"),
        BackendError::Busy(_) => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
        BackendError::Failed(_) => (StatusCode::INTERNAL_SERVER_ERROR, "failed"),
        BackendError::NotConfigured(_) => (StatusCode::NOT_IMPLEMENTED, "not_configured"),
        BackendError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
    };
    entry.reason = reason.to_owned();
    entry = entry
        .detail("status", status.as_u16())
        .detail("error", e.to_string());
    if let Err(e) = app.audit.record(Some(caller), &entry).await {
        return audit_down(&e);
    }
    reply(status, json!({"error": e.to_string(), "reason": reason}))
}

/// The answer of a handler made by a function (see [`listing`]).
type Answering = std::pin::Pin<Box<dyn std::future::Future<Output = Response> + Send>>;

/// The handler of a listing endpoint: `rows` under `action`.
fn listing(
    rows: Rows,
    action: AdminAction,
) -> impl Fn(State<Arc<App>>, Extension<Arc<Caller>>, HeaderMap, Q) -> Answering
+ Clone
+ Send
+ Sync
+ 'static {
    move |State(app), Extension(caller), headers, Query(q)| {
        Box::pin(async move { read(&app, &caller, &headers, &q, rows, action).await })
    }
}

async fn trace(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Arc<Caller>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Q,
) -> Response {
    let decided = match decide(
        &app,
        &caller,
        &headers,
        &q,
        AdminAction::TraceRead,
        Some(id.clone()),
    )
    .await
    {
        Ok(d) => d,
        Err(refused) => return refused,
    };
    let backend = Arc::clone(&app.backend);
    match blocking(move || backend.trace(&id)).await {
        Ok(record) => {
            answer(
                &app,
                &caller,
                &headers,
                &q,
                decided,
                vec![record],
                true,
                |rows| rows.into_iter().next().unwrap_or(Value::Null),
            )
            .await
        }
        Err(e) => failed(&app, &caller, decided.entry, e).await,
    }
}

async fn read(
    app: &App,
    caller: &Caller,
    headers: &HeaderMap,
    q: &HashMap<String, String>,
    rows: Rows,
    action: AdminAction,
) -> Response {
    let device = q.get("device").cloned();
    let resource = Some(
        device
            .as_ref()
            .map_or("all".to_owned(), |d| format!("device/{d}")),
    );
    let decided = match decide(app, caller, headers, q, action, resource).await {
        Ok(d) => d,
        Err(refused) => return refused,
    };
    let backend = Arc::clone(&app.backend);
    let named = device.is_some();
    match blocking(move || backend.rows(rows, device.as_deref())).await {
        Ok(records) => {
            answer(
                app,
                caller,
                headers,
                q,
                decided,
                records,
                named,
                |rows| json!({ "rows": rows }),
            )
            .await
        }
        Err(e) => failed(app, caller, decided.entry, e).await,
    }
}

/// Applies the caller's scope to what was read, breaks glass when asked, audits and
/// answers. `named`: the call asked for one device or record, so reaching outside the
/// scope is refused rather than filtered.
#[allow(clippy::too_many_arguments)]
async fn answer(
    app: &App,
    caller: &Caller,
    headers: &HeaderMap,
    q: &HashMap<String, String>,
    decided: Decided,
    records: Vec<Record>,
    named: bool,
    shape: impl FnOnce(Vec<Value>) -> Value,
) -> Response {
    let Decided {
        grantee,
        identity,
        entry,
        ..
    } = decided;
    let mut entry = entry;
    let break_glass = match statement(headers, BREAK_GLASS_HEADER, q.get("break_glass")) {
        Ok(b) => b,
        Err(why) => {
            return refuse(
                app,
                caller,
                entry,
                StatusCode::BAD_REQUEST,
                "bad_break_glass",
                format!("break-glass reason {why}"),
            )
            .await;
        }
    };
    let (inside, outside): (Vec<Record>, Vec<Record>) = records
        .into_iter()
        .partition(|r| in_scope(&grantee, r.site.as_deref()));
    let outside_sites: BTreeSet<String> = outside
        .iter()
        .map(|r| r.site.clone().unwrap_or_else(|| "unknown".to_owned()))
        .collect();
    let mut body_rows: Vec<Value> = inside.into_iter().map(|r| r.body).collect();
    let mut glass = false;
    let mut withheld = 0usize;
    if !outside.is_empty() {
        match &break_glass {
            Some(reason) => {
                glass = true;
                let sites: Vec<String> = outside_sites.iter().cloned().collect();
                let device = q.get("device").map(String::as_str);
                let audit_log = app.audit.path().display().to_string();
                let alert = OpsOutbox::alert(
                    &BreakGlass {
                        identity: &identity,
                        role: &grantee.role.name,
                        action: &entry.action,
                        resource: entry.resource.as_deref(),
                        device,
                        sites: &sites,
                        audit_log: &audit_log,
                    },
                    &now_rfc3339(),
                    &nonce(),
                );
                if let Err(e) = app.outbox.raise(&alert).await {
                    tracing::error!(error = %e, "the break-glass alert cannot be written; refusing the read");
                    return refuse(
                        app,
                        caller,
                        entry,
                        StatusCode::SERVICE_UNAVAILABLE,
                        "alert_unavailable",
                        "the break-glass alert cannot be raised, so the read is refused".into(),
                    )
                    .await;
                }
                entry = entry
                    .detail("break_glass_reason", reason.as_str())
                    .detail("outside_sites", sites)
                    .detail("alert_id", alert["alert_id"].clone());
                body_rows.extend(outside.into_iter().map(|r| r.body));
            }
            None if named => {
                return refuse(
                    app,
                    caller,
                    entry.detail("outside_sites", outside_sites.into_iter().collect::<Vec<_>>()),
                    StatusCode::FORBIDDEN,
                    "outside_scope",
                    format!(
                        "outside the sites of role `{}`; state a break-glass reason ({BREAK_GLASS_HEADER}) to read it anyway",
                        grantee.role.name
                    ),
                )
                .await;
            }
            None => withheld = outside.len(),
        }
    }
    entry.decision = Decision::Allow;
    entry.reason = if glass { "break_glass" } else { "allowed" }.to_owned();
    entry = entry.detail("status", 200).detail("rows", body_rows.len());
    if withheld > 0 {
        entry = entry.detail("withheld_outside_scope", withheld);
    }
    if let Err(e) = app.audit.record(Some(caller), &entry).await {
        return audit_down(&e);
    }
    let mut body = shape(body_rows);
    if let Value::Object(map) = &mut body {
        map.insert("break_glass".into(), glass.into());
        if withheld > 0 {
            map.insert("withheld_outside_scope".into(), withheld.into());
        }
    }
    reply(StatusCode::OK, body)
}

/// The registry action of a change body's `change` tag.
fn change_action(body: &Value) -> Option<AdminAction> {
    Some(match body.get("change")?.as_str()? {
        "assign" => AdminAction::RegistryAssign,
        "unassign" => AdminAction::RegistryUnassign,
        "retire" => AdminAction::RegistryRetire,
        "consent-grant" => AdminAction::ConsentGrant,
        "consent-withdraw" => AdminAction::ConsentWithdraw,
        _ => return None,
    })
}

/// The `site` an `assign` body moves the device to.
fn assign_target(body: &Value) -> Option<&str> {
    body.get("site")?.as_str()
}

/// Why a site-scoped role may not make this change, if it may not: every site the
/// device ever served (`sites`; `None` when the registry does not know it) must be in
/// its scope and there must be at least one, and an assignment's `target` site must be
/// in its scope too. Changes never break glass.
fn change_outside_scope(
    grantee: &Grantee,
    action: AdminAction,
    target: Option<&str>,
    sites: Option<&[String]>,
) -> Option<&'static str> {
    if grantee.role.scope == Scope::All {
        return None;
    }
    let Some(sites) = sites.filter(|s| !s.is_empty()) else {
        return Some("the device was never assigned to a site of the role's scope");
    };
    if sites.iter().any(|s| !in_scope(grantee, Some(s))) {
        return Some("the device served sites outside the role's scope");
    }
    if action == AdminAction::RegistryAssign && !in_scope(grantee, target) {
        return Some("the assignment's site is outside the role's scope");
    }
    None
}

async fn change(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Arc<Caller>>,
    headers: HeaderMap,
    Path(device): Path<String>,
    Query(q): Q,
    body: Bytes,
) -> Response {
    let resource = Some(format!("device/{device}"));
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    let Some(action) = parsed.as_ref().and_then(change_action) else {
        return refuse(
            &app,
            &caller,
            Entry::new("registry.change", resource),
            StatusCode::BAD_REQUEST,
            "bad_request",
            "the body must be JSON with \"change\": assign, unassign, retire, consent-grant or consent-withdraw".into(),
        )
        .await;
    };
    let decided = match decide(&app, &caller, &headers, &q, action, resource).await {
        Ok(d) => d,
        Err(refused) => return refused,
    };
    // The scope is checked twice: here, so a change outside it is refused before its
    // `allowed` record, and by the backend on the registry it reads under its lock,
    // so a change made meanwhile cannot move the device out of scope unnoticed.
    let scope: Option<Box<ScopeCheck>> = (decided.grantee.role.scope == Scope::Sites).then(|| {
        let grantee = decided.grantee.clone();
        let target = parsed.as_ref().and_then(assign_target).map(str::to_owned);
        Box::new(move |sites: Option<&[String]>| {
            change_outside_scope(&grantee, action, target.as_deref(), sites).map(str::to_owned)
        }) as Box<ScopeCheck>
    });
    if decided.grantee.role.scope == Scope::Sites {
        let target = parsed.as_ref().and_then(assign_target);
        let backend = Arc::clone(&app.backend);
        let d = device.clone();
        let sites = match blocking(move || backend.device_sites(&d)).await {
            Ok(s) => Some(s),
            // A device the registry does not know is in no site's scope.
            Err(BackendError::NotFound(_)) => None,
            Err(e) => return failed(&app, &caller, decided.entry, e).await,
        };
        if let Some(why) = change_outside_scope(&decided.grantee, action, target, sites.as_deref())
        {
            return refuse(
                &app,
                &caller,
                decided.entry,
                StatusCode::FORBIDDEN,
                "outside_scope",
                why.into(),
            )
            .await;
        }
    }
    let acting = decided.acting();
    let started = match record_allowed(&app, &caller, &decided.entry).await {
        Ok(entry) => entry,
        Err(down) => return down,
    };
    let backend = Arc::clone(&app.backend);
    let body = parsed.unwrap_or(Value::Null);
    let result = blocking(move || backend.change(&device, body, &acting, scope.as_deref())).await;
    finish(&app, &caller, started, result).await
}

/// Audits the outcome of an allowed change or lookup and answers with it.
async fn finish(
    app: &App,
    caller: &Caller,
    mut entry: Entry,
    result: Result<Value, BackendError>,
) -> Response {
    match result {
        Ok(value) => {
            entry.reason = "succeeded".into();
            entry = entry.detail("status", 200);
            if let Err(e) = app.audit.record(Some(caller), &entry).await {
                return audit_down(&e);
            }
            reply(StatusCode::OK, value)
        }
        Err(e) => failed(app, caller, entry, e).await,
    }
}

async fn reid_lookup(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Arc<Caller>>,
    headers: HeaderMap,
    Query(q): Q,
    body: Bytes,
) -> Response {
    let pseudonym = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("pseudonym")?.as_str().map(str::to_owned));
    let Some(pseudonym) = pseudonym else {
        return refuse(
            &app,
            &caller,
            Entry::new(AdminAction::ReidLookup.as_str(), None),
            StatusCode::BAD_REQUEST,
            "bad_request",
            "the body must be JSON with \"pseudonym\"".into(),
        )
        .await;
    };
    let decided = match decide(
        &app,
        &caller,
        &headers,
        &q,
        AdminAction::ReidLookup,
        Some(pseudonym.clone()),
    )
    .await
    {
        Ok(d) => d,
        Err(refused) => return refused,
    };
    let acting = decided.acting();
    let started = match record_allowed(&app, &caller, &decided.entry).await {
        Ok(entry) => entry,
        Err(down) => return down,
    };
    let backend = Arc::clone(&app.backend);
    let result = blocking(move || backend.reid_lookup(&pseudonym, &acting)).await;
    finish(&app, &caller, started, result).await
}

/// Legal holds span sites: only a role of every site reads or changes them.
async fn holds_in_scope(app: &App, caller: &Caller, decided: Decided) -> Result<Decided, Response> {
    all_sites_only(
        app,
        caller,
        decided,
        "legal holds span sites: only a role of scope \"all\" reads or changes them",
    )
    .await
}

/// Refuses (403 `outside_scope`, audited) a call of a site-scoped role.
async fn all_sites_only(
    app: &App,
    caller: &Caller,
    decided: Decided,
    why: &str,
) -> Result<Decided, Response> {
    if decided.grantee.role.scope == Scope::Sites {
        return Err(refuse(
            app,
            caller,
            decided.entry,
            StatusCode::FORBIDDEN,
            "outside_scope",
            why.to_owned(),
        )
        .await);
    }
    Ok(decided)
}

async fn list_holds(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Arc<Caller>>,
    headers: HeaderMap,
    Query(q): Q,
) -> Response {
    let decided = match decide(
        &app,
        &caller,
        &headers,
        &q,
        AdminAction::HoldsRead,
        Some("holds".into()),
    )
    .await
    {
        Ok(d) => d,
        Err(refused) => return refused,
    };
    let decided = match holds_in_scope(&app, &caller, decided).await {
        Ok(d) => d,
        Err(refused) => return refused,
    };
    let backend = Arc::clone(&app.backend);
    match blocking(move || backend.holds()).await {
        Ok(holds) => {
            let records = holds
                .into_iter()
                .map(|body| Record { site: None, body })
                .collect();
            answer(
                &app,
                &caller,
                &headers,
                &q,
                decided,
                records,
                false,
                |rows| json!({ "rows": rows }),
            )
            .await
        }
        Err(e) => failed(&app, &caller, decided.entry, e).await,
    }
}

/// The audited resource of a hold: `hold/<id>` (cut to a bounded length).
fn hold_resource(id: &str) -> String {
    format!("hold/{}", id.chars().take(80).collect::<String>())
}

async fn place_hold(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Arc<Caller>>,
    headers: HeaderMap,
    Query(q): Q,
    body: Bytes,
) -> Response {
    let parsed = serde_json::from_slice::<Value>(&body)
        .ok()
        .filter(|v| v.get("id").is_some_and(Value::is_string));
    let Some(hold) = parsed else {
        return refuse(
            &app,
            &caller,
            Entry::new(AdminAction::HoldPlace.as_str(), None),
            StatusCode::BAD_REQUEST,
            "bad_request",
            "the body must be JSON with \"id\", \"reason\" and a patient_ref, device, from or to"
                .into(),
        )
        .await;
    };
    let id = hold["id"].as_str().unwrap_or_default().to_owned();
    let decided = match decide(
        &app,
        &caller,
        &headers,
        &q,
        AdminAction::HoldPlace,
        Some(hold_resource(&id)),
    )
    .await
    {
        Ok(d) => d,
        Err(refused) => return refused,
    };
    let decided = match holds_in_scope(&app, &caller, decided).await {
        Ok(d) => d,
        Err(refused) => return refused,
    };
    let acting = decided.acting();
    let started = match record_allowed(&app, &caller, &decided.entry).await {
        Ok(entry) => entry,
        Err(down) => return down,
    };
    let backend = Arc::clone(&app.backend);
    let result = blocking(move || backend.place_hold(hold, &acting)).await;
    finish(&app, &caller, started, result).await
}

async fn lift_hold(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Arc<Caller>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Q,
    body: Bytes,
) -> Response {
    let resource = Some(hold_resource(&id));
    let parsed = serde_json::from_slice::<Value>(&body)
        .ok()
        .filter(|v| v.get("reason").is_some_and(Value::is_string));
    let Some(lift) = parsed else {
        return refuse(
            &app,
            &caller,
            Entry::new(AdminAction::HoldLift.as_str(), resource),
            StatusCode::BAD_REQUEST,
            "bad_request",
            "the body must be JSON with \"reason\"".into(),
        )
        .await;
    };
    let decided = match decide(&app, &caller, &headers, &q, AdminAction::HoldLift, resource).await {
        Ok(d) => d,
        Err(refused) => return refused,
    };
    let decided = match holds_in_scope(&app, &caller, decided).await {
        Ok(d) => d,
        Err(refused) => return refused,
    };
    let acting = decided.acting();
    let started = match record_allowed(&app, &caller, &decided.entry).await {
        Ok(entry) => entry,
        Err(down) => return down,
    };
    let backend = Arc::clone(&app.backend);
    let result = blocking(move || backend.lift_hold(&id, lift, &acting)).await;
    finish(&app, &caller, started, result).await
}

/// A care pseudonym as the registry accepts one (`vitalmq_policies::is_patient_ref`, the
/// one rule of holds, export and erasure); anything else (it might be a name) is refused
/// unrecorded.
fn is_patient_ref(p: &str) -> bool {
    vitalmq_policies::is_patient_ref(p)
}

/// What the body of a patient action must hold: erasure a non-blank `reason`; export
/// nothing or an optional `purpose` string (an empty body is `{}`).
fn patient_body(action: AdminAction, body: &[u8]) -> Result<Value, &'static str> {
    let blank = |v: &Value, key: &str| {
        v.get(key)
            .and_then(Value::as_str)
            .is_none_or(|s| s.trim().is_empty())
    };
    if action == AdminAction::PatientExport {
        let value = if body.iter().all(u8::is_ascii_whitespace) {
            json!({})
        } else {
            serde_json::from_slice::<Value>(body).map_err(|_| "the body must be a JSON object")?
        };
        return match value.get("purpose") {
            _ if !value.is_object() => Err("the body must be a JSON object"),
            Some(p) if !p.is_string() || blank(&value, "purpose") => {
                Err("\"purpose\" must be a non-blank string")
            }
            _ => Ok(value),
        };
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(v) if !blank(&v, "reason") => Ok(v),
        _ => Err("the body must be JSON with a non-blank \"reason\""),
    }
}

/// The handler of a patient action (erasure, export): one shape, its `action`.
#[expect(
    clippy::type_complexity,
    reason = "the extractor list axum calls the handler with; spelled once, here"
)]
fn patient(
    action: AdminAction,
) -> impl Fn(State<Arc<App>>, Extension<Arc<Caller>>, HeaderMap, Path<String>, Q, Bytes) -> Answering
+ Clone
+ Send
+ Sync
+ 'static {
    move |State(app), Extension(caller), headers, Path(patient_ref), Query(q), body| {
        Box::pin(async move {
            patient_action(&app, &caller, &headers, &q, patient_ref, &body, action).await
        })
    }
}

/// Erasure or export of one patient: checked, allowed by a role of every site,
/// recorded as allowed, run, and its outcome recorded with what it did (counts,
/// hashes; never the patient's data).
async fn patient_action(
    app: &App,
    caller: &Caller,
    headers: &HeaderMap,
    q: &HashMap<String, String>,
    patient_ref: String,
    body: &[u8],
    action: AdminAction,
) -> Response {
    if !is_patient_ref(&patient_ref) {
        return refuse(
            app,
            caller,
            Entry::new(action.as_str(), None),
            StatusCode::BAD_REQUEST,
            "bad_request",
            "the path must name a patient pseudonym (pt-...)".into(),
        )
        .await;
    }
    let resource = Some(format!("patient/{patient_ref}"));
    let request = match patient_body(action, body) {
        Ok(v) => v,
        Err(why) => {
            return refuse(
                app,
                caller,
                Entry::new(action.as_str(), resource),
                StatusCode::BAD_REQUEST,
                "bad_request",
                why.into(),
            )
            .await;
        }
    };
    let decided = match decide(app, caller, headers, q, action, resource).await {
        Ok(d) => d,
        Err(refused) => return refused,
    };
    let decided = match all_sites_only(
        app,
        caller,
        decided,
        "a patient's data spans the sites of every device they had: only a role of scope \"all\" erases or exports it",
    )
    .await
    {
        Ok(d) => d,
        Err(refused) => return refused,
    };
    let acting = decided.acting();
    let mut started = match record_allowed(app, caller, &decided.entry).await {
        Ok(entry) => entry,
        Err(down) => return down,
    };
    let backend = Arc::clone(&app.backend);
    let result = blocking(move || {
        if action == AdminAction::PatientErase {
            backend.erase_patient(&patient_ref, request, &acting)
        } else {
            backend.export_patient(&patient_ref, request, &acting)
        }
    })
    .await;
    if let Ok(done) = &result {
        // What was done, for the auditor: counts, key and manifest facts.
        for key in [
            "keys_destroyed",
            "already_erased",
            "unreadable_rows",
            "legacy_scrubbed",
            "manifest_sha256",
            "events",
            "alerts",
            "dir",
        ] {
            if let Some(v) = done.get(key) {
                started = started.detail(key, v.clone());
            }
        }
    }
    finish(app, caller, started, result).await
}

/// Records that a change or re-identification is allowed, before it runs (its outcome
/// is recorded after); the entry to finish with, or the 503 when the log is down.
async fn record_allowed(app: &App, caller: &Caller, entry: &Entry) -> Result<Entry, Response> {
    let mut started = entry.clone();
    started.decision = Decision::Allow;
    started.reason = "allowed".into();
    match app.audit.record(Some(caller), &started).await {
        Ok(()) => Ok(started),
        Err(e) => Err(audit_down(&e)),
    }
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// A short unique suffix for an alert id: time and a process-wide counter.
fn nonce() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!("{t}-{}-{n}", std::process::id())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::json;
    use vitalmq_policies::{AdminRole, Grantee, Scope, SiteId};

    use super::*;

    fn clinician_of(site: &str) -> Grantee {
        Grantee {
            role: AdminRole {
                name: "clinician".into(),
                actions: BTreeSet::from([AdminAction::EventsRead]),
                scope: Scope::Sites,
            },
            sites: BTreeSet::from([SiteId::new(site).expect("site")]),
        }
    }

    #[test]
    fn a_site_scoped_role_reaches_only_its_sites_and_never_an_unknown_one() {
        let g = clinician_of("site-01");
        assert!(in_scope(&g, Some("site-01")));
        assert!(!in_scope(&g, Some("site-02")));
        assert!(!in_scope(&g, None), "a record without a site is outside");
        assert!(!in_scope(&g, Some("not a site!")));
        let all = Grantee {
            role: AdminRole {
                scope: Scope::All,
                ..g.role.clone()
            },
            sites: BTreeSet::new(),
        };
        assert!(in_scope(&all, None) && in_scope(&all, Some("site-99")));
    }

    #[test]
    fn each_change_names_its_action_and_nothing_else_does() {
        for (tag, action) in [
            ("assign", AdminAction::RegistryAssign),
            ("unassign", AdminAction::RegistryUnassign),
            ("retire", AdminAction::RegistryRetire),
            ("consent-grant", AdminAction::ConsentGrant),
            ("consent-withdraw", AdminAction::ConsentWithdraw),
        ] {
            assert_eq!(change_action(&json!({ "change": tag })), Some(action));
        }
        assert_eq!(change_action(&json!({ "change": "erase" })), None);
        assert_eq!(change_action(&json!({ "assign": true })), None);
        assert_eq!(change_action(&json!("assign")), None);
    }

    /// A backend of two devices: `dev-a` served site-01 only, `dev-b` site-01 then
    /// site-02, `dev-new` was never assigned; it counts the changes that reach it.
    #[derive(Default)]
    struct Fake {
        changes: std::sync::Mutex<Vec<String>>,
    }

    impl Backend for Fake {
        fn rows(&self, _: Rows, _: Option<&str>) -> Result<Vec<Record>, BackendError> {
            Ok(vec![])
        }
        fn trace(&self, id: &str) -> Result<Record, BackendError> {
            Err(BackendError::NotFound(id.to_owned()))
        }
        fn device_sites(&self, device: &str) -> Result<Vec<String>, BackendError> {
            match device {
                "dev-a" => Ok(vec!["site-01".into()]),
                "dev-b" => Ok(vec!["site-01".into(), "site-02".into()]),
                "dev-new" => Ok(vec![]),
                "dev-moved" | "dev-locked" => Ok(vec!["site-01".into()]),
                _ => Err(BackendError::NotFound(format!("device {device}"))),
            }
        }
        fn change(
            &self,
            device: &str,
            _: Value,
            _: &Acting,
            scope: Option<&ScopeCheck>,
        ) -> Result<Value, BackendError> {
            // `dev-moved` was moved to site-02 between the API's scope check and the
            // change: the registry read under the lock says so.
            let sites = match device {
                "dev-moved" => Ok(vec!["site-01".into(), "site-02".into()]),
                _ => self.device_sites(device),
            };
            if let Some(why) = scope.and_then(|check| check(sites.ok().as_deref())) {
                return Err(BackendError::OutsideScope(why));
            }
            if device == "dev-locked" {
                return Err(BackendError::Busy("the registry stayed locked".into()));
            }
            self.changes
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(device.to_owned());
            Ok(json!({"changes": []}))
        }
        fn reid_lookup(&self, _: &str, _: &Acting) -> Result<Value, BackendError> {
            Err(BackendError::Refused("no".into()))
        }
        fn erase_patient(
            &self,
            patient_ref: &str,
            request: Value,
            acting: &Acting,
        ) -> Result<Value, BackendError> {
            if patient_ref == "pt-held0000" {
                return Err(BackendError::Conflict(
                    "refused: legal hold h1 covers this patient".into(),
                ));
            }
            self.changes
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(format!("erase {patient_ref} by {}", acting.identity));
            Ok(json!({"patient_ref": patient_ref, "keys_destroyed": 2,
                "already_erased": false, "reason": request["reason"]}))
        }
    }

    const ROLES: &str = r#"format = "vitalmq-admin-roles/v1"
[roles.site-admin]
actions = ["registry.assign", "registry.unassign", "events.read", "holds.read", "patient.erase"]
scope = "sites"
[roles.admin]
actions = ["registry.assign", "holds.read", "hold.place", "patient.erase", "patient.export"]
scope = "all"
[[operators]]
id = "sam"
role = "site-admin"
sites = ["site-01"]
[[operators]]
id = "adam"
role = "admin"
"#;

    struct Rig {
        _dir: tempfile::TempDir,
        app: Arc<App>,
        fake: Arc<Fake>,
    }

    impl Rig {
        fn new() -> Self {
            let dir = tempfile::tempdir().expect("temp dir");
            let roles = dir.path().join("roles.toml");
            std::fs::write(&roles, ROLES).expect("roles");
            let fake = Arc::new(Fake::default());
            let app = Arc::new(App {
                roles: RolesFile::load(roles).expect("roles load"),
                audit: AdminAudit::new(dir.path().join("audit/admin.jsonl")),
                outbox: OpsOutbox::new(dir.path().join("audit/ops.jsonl"), None),
                backend: Arc::clone(&fake) as Arc<dyn Backend>,
            });
            Self {
                _dir: dir,
                app,
                fake,
            }
        }

        /// Sends `request` as operator `id`; the status and the JSON answer.
        async fn call(
            &self,
            id: &str,
            request: axum::http::Request<axum::body::Body>,
        ) -> (StatusCode, Value) {
            use hyper::service::Service as _;
            let caller = Caller {
                identity: Some(
                    format!("spiffe://demo.vitalmq/operator/{id}")
                        .parse()
                        .expect("id"),
                ),
                cert_sha256: None,
                cert_serial: None,
                addr: "127.0.0.1:1".parse().expect("addr"),
            };
            let service = hyper_util::service::TowerToHyperService::new(
                router(Arc::clone(&self.app)).layer(Extension(Arc::new(caller))),
            );
            let response = service.call(request).await.expect("infallible");
            let status = response.status();
            let body = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .expect("body");
            (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
        }

        async fn change(&self, id: &str, device: &str, body: Value) -> (StatusCode, Value) {
            let request = axum::http::Request::post(format!("/v1/registry/{device}"))
                .header(PURPOSE_HEADER, "governance")
                .header(BREAK_GLASS_HEADER, "urgent")
                .body(axum::body::Body::from(body.to_string()))
                .expect("request");
            self.call(id, request).await
        }

        fn changed(&self) -> Vec<String> {
            self.fake
                .changes
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
        }

        /// The audit records written, as JSON.
        fn audit(&self) -> Vec<Value> {
            std::fs::read_to_string(self.app.audit.path())
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter(|r| r["event"] == "admin_request")
                .collect()
        }
    }

    fn assign(site: &str) -> Value {
        json!({"change": "assign", "patient_ref": "pt-x", "site": site})
    }

    #[tokio::test]
    async fn a_site_scoped_role_changes_only_devices_and_targets_of_its_sites() {
        let rig = Rig::new();
        // Allowed: a device of its site, assigned within its site; an unassignment.
        assert_eq!(
            rig.change("sam", "dev-a", assign("site-01")).await.0,
            StatusCode::OK
        );
        assert_eq!(
            rig.change("sam", "dev-a", json!({"change": "unassign"}))
                .await
                .0,
            StatusCode::OK
        );
        // Refused, break-glass reason or not: another site as the target, a device that
        // served another site, a device never assigned, one the registry does not know,
        // an assignment without a site.
        for (device, body) in [
            ("dev-a", assign("site-02")),
            ("dev-b", assign("site-01")),
            ("dev-b", json!({"change": "unassign"})),
            ("dev-new", assign("site-01")),
            ("dev-new", json!({"change": "unassign"})),
            ("dev-unknown", assign("site-01")),
            ("dev-a", json!({"change": "assign", "patient_ref": "pt-x"})),
        ] {
            let (status, answer) = rig.change("sam", device, body.clone()).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{device} {body}: {answer}");
            assert_eq!(answer["reason"], "outside_scope", "{device} {body}");
        }
        assert_eq!(
            rig.changed(),
            ["dev-a", "dev-a"],
            "no refused change reached the backend"
        );
        // A role of all sites assigns anywhere, a new device too.
        assert_eq!(
            rig.change("adam", "dev-new", assign("site-02")).await.0,
            StatusCode::OK
        );
        let refused = rig
            .audit()
            .iter()
            .filter(|r| r["reason"] == "refused:outside_scope")
            .count();
        assert_eq!(refused, 7, "each refusal audited");
    }

    #[tokio::test]
    async fn the_scope_is_checked_again_on_what_the_backend_reads_under_its_lock() {
        let rig = Rig::new();
        // dev-moved served only site-01 when the API looked, site-02 too by the time
        // the backend holds the lock: refused, not changed.
        let (status, answer) = rig
            .change("sam", "dev-moved", json!({"change": "unassign"}))
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
        assert_eq!(answer["reason"], "outside_scope");
        assert!(rig.changed().is_empty());
        // A role of all sites has no scope to check.
        assert_eq!(
            rig.change("adam", "dev-moved", assign("site-02")).await.0,
            StatusCode::OK
        );
        let outcomes: Vec<_> = rig
            .audit()
            .iter()
            .map(|r| r["reason"].as_str().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(
            outcomes,
            ["allowed", "outside_scope", "allowed", "succeeded"],
            "the refusal is the audited outcome of the allowed call"
        );
    }

    #[tokio::test]
    async fn holds_need_a_role_of_every_site_and_a_configured_file() {
        let rig = Rig::new();
        let get = |id: &'static str| {
            let request = axum::http::Request::get("/v1/holds")
                .header(PURPOSE_HEADER, "audit")
                .body(axum::body::Body::empty())
                .expect("request");
            rig.call(id, request)
        };
        let (status, answer) = get("sam").await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
        assert_eq!(answer["reason"], "outside_scope", "holds span sites");
        // The fake backend has no holds file: 501, audited as the outcome.
        let (status, answer) = get("adam").await;
        assert_eq!(status, StatusCode::NOT_IMPLEMENTED, "{answer}");
        assert_eq!(answer["reason"], "not_configured");
        let post = |body: Value| {
            let request = axum::http::Request::post("/v1/holds")
                .header(PURPOSE_HEADER, "legal")
                .body(axum::body::Body::from(body.to_string()))
                .expect("request");
            rig.call("adam", request)
        };
        let (status, answer) = post(json!({"reason": "no id"})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
        let (status, _) = post(json!({"id": "h1", "reason": "r", "device": "dev-a"})).await;
        assert_eq!(status, StatusCode::NOT_IMPLEMENTED);
        let outcomes: Vec<_> = rig
            .audit()
            .iter()
            .map(|r| {
                format!(
                    "{} {}",
                    r["action"].as_str().unwrap_or_default(),
                    r["reason"].as_str().unwrap_or_default()
                )
            })
            .collect();
        assert_eq!(
            outcomes,
            [
                "holds.read refused:outside_scope",
                "holds.read not_configured",
                "hold.place refused:bad_request",
                "hold.place allowed",
                "hold.place not_configured",
            ]
        );
    }

    #[tokio::test]
    async fn erasure_and_export_need_a_pseudonym_a_role_of_every_site_and_are_audited() {
        let rig = Rig::new();
        let post = |id: &'static str, path: &str, body: &str| {
            let request = axum::http::Request::post(path)
                .header(PURPOSE_HEADER, "gdpr")
                .body(axum::body::Body::from(body.to_owned()))
                .expect("request");
            rig.call(id, request)
        };
        let erase = |p: &str| format!("/v1/patients/{p}/erase");
        let reason = r#"{"reason": "art. 17, ticket 9"}"#;
        // Not a pseudonym (it might be a name): refused, and not recorded.
        let (status, answer) = post("adam", &erase("Jane%20Doe"), reason).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
        // No reason, a blank one, no JSON.
        for body in ["{}", r#"{"reason": " "}"#, "erase"] {
            let (status, answer) = post("adam", &erase("pt-a1a1a1a1"), body).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
        }
        // A site-scoped role may not, whatever its actions.
        let (status, answer) = post("sam", &erase("pt-a1a1a1a1"), reason).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
        assert_eq!(answer["reason"], "outside_scope");
        // Under a hold: 409, the refusal is the audited outcome.
        let (status, answer) = post("adam", &erase("pt-held0000"), reason).await;
        assert_eq!(status, StatusCode::CONFLICT, "{answer}");
        assert_eq!(answer["reason"], "conflict");
        let (status, answer) = post("adam", &erase("pt-a1a1a1a1"), reason).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer["keys_destroyed"], 2);
        assert_eq!(
            rig.changed(),
            ["erase pt-a1a1a1a1 by spiffe://demo.vitalmq/operator/adam"]
        );
        // Export: a bad purpose is refused; without an exports directory, 501.
        let export = "/v1/patients/pt-a1a1a1a1/export";
        let (status, _) = post("adam", export, r#"{"purpose": 7}"#).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let (status, answer) = post("adam", export, "").await;
        assert_eq!(status, StatusCode::NOT_IMPLEMENTED, "{answer}");
        let records = rig.audit();
        let outcomes: Vec<_> = records
            .iter()
            .map(|r| {
                format!(
                    "{} {} {}",
                    r["action"].as_str().unwrap_or_default(),
                    r["resource"].as_str().unwrap_or("-"),
                    r["reason"].as_str().unwrap_or_default()
                )
            })
            .collect();
        assert_eq!(
            outcomes,
            [
                "patient.erase - refused:bad_request",
                "patient.erase patient/pt-a1a1a1a1 refused:bad_request",
                "patient.erase patient/pt-a1a1a1a1 refused:bad_request",
                "patient.erase patient/pt-a1a1a1a1 refused:bad_request",
                "patient.erase patient/pt-a1a1a1a1 refused:outside_scope",
                "patient.erase patient/pt-held0000 allowed",
                "patient.erase patient/pt-held0000 conflict",
                "patient.erase patient/pt-a1a1a1a1 allowed",
                "patient.erase patient/pt-a1a1a1a1 succeeded",
                "patient.export patient/pt-a1a1a1a1 refused:bad_request",
                "patient.export patient/pt-a1a1a1a1 allowed",
                "patient.export patient/pt-a1a1a1a1 not_configured",
            ]
        );
        let done = &records[8];
        assert_eq!(done["details"]["keys_destroyed"], 2, "{done}");
        assert_eq!(done["details"]["status"], 200, "{done}");
        let log = std::fs::read_to_string(rig.app.audit.path()).expect("log");
        assert!(
            !log.contains("Jane") && !log.contains("ticket 9"),
            "neither a name in the path nor the request's text is recorded"
        );
    }

    #[test]
    fn a_patient_ref_is_a_pseudonym() {
        assert!(is_patient_ref("pt-a1b2c3d4-e5"));
        for p in [
            "",
            "pt-",
            "a1",
            "Jane Doe",
            "pt-Jane.Doe",
            "pt-a1b2.c_d-e",
            "pt-a/b",
            &format!("pt-{}", "a".repeat(70)),
        ] {
            assert!(!is_patient_ref(p), "{p}");
        }
    }

    #[tokio::test]
    async fn a_registry_locked_past_its_deadline_answers_503_audited() {
        let rig = Rig::new();
        let (status, answer) = rig.change("adam", "dev-locked", assign("site-01")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
        assert_eq!(answer["reason"], "busy");
        let audit = rig.audit();
        let last = audit.last().expect("records");
        assert_eq!(last["reason"], "busy", "{audit:?}");
        assert_eq!(last["details"]["status"], 503, "{last}");
    }

    #[tokio::test]
    async fn answers_no_handler_makes_are_audited_too() {
        let rig = Rig::new();
        let request = |method: &str, uri: &str, body: Vec<u8>| {
            axum::http::Request::builder()
                .method(method)
                .uri(uri)
                .header(PURPOSE_HEADER, "governance")
                .body(axum::body::Body::from(body))
                .expect("request")
        };
        let cases = [
            (
                request("DELETE", "/v1/events", vec![]),
                StatusCode::METHOD_NOT_ALLOWED,
                "refused:method_not_allowed",
                "/v1/events",
            ),
            (
                request("GET", "/v1/trace/%ff", vec![]),
                StatusCode::BAD_REQUEST,
                "refused:bad_request",
                "/v1/trace/%ff",
            ),
            (
                request("POST", "/v1/registry/dev-a", vec![b' '; MAX_BODY + 1]),
                StatusCode::PAYLOAD_TOO_LARGE,
                "refused:body_too_large",
                "/v1/registry/dev-a",
            ),
        ];
        for (n, (request, status, reason, path)) in cases.into_iter().enumerate() {
            let (got, answer) = rig.call("adam", request).await;
            assert_eq!(got, status, "{path}: {answer}");
            assert_eq!(
                format!("refused:{}", answer["reason"].as_str().unwrap_or("")),
                reason
            );
            let audit = rig.audit();
            assert_eq!(audit.len(), n + 1, "one record per answer: {audit:?}");
            let record = &audit[n];
            assert_eq!(record["reason"], reason, "{record}");
            assert_eq!(record["decision"], "deny", "{record}");
            assert_eq!(record["resource"], path, "{record}");
            assert_eq!(record["details"]["status"], status.as_u16(), "{record}");
            assert_eq!(
                record["actor"]["identity"], "spiffe://demo.vitalmq/operator/adam",
                "{record}"
            );
        }
        assert!(rig.changed().is_empty());
        // A handler's own answer is audited once, not twice.
        let (status, _) = rig
            .call("adam", request("GET", "/v1/nowhere", vec![]))
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(rig.audit().len(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_not_sent_in_time_is_answered_408_and_audited() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let rig = Rig::new();
        let caller = Caller {
            identity: Some("spiffe://demo.vitalmq/operator/adam".parse().expect("id")),
            cert_sha256: None,
            cert_serial: None,
            addr: "127.0.0.1:1".parse().expect("addr"),
        };
        let service = hyper_util::service::TowerToHyperService::new(
            router(Arc::clone(&rig.app)).layer(Extension(Arc::new(caller))),
        );
        let (mut client, server) = tokio::io::duplex(4096);
        let served = tokio::spawn(crate::server::http(server, service));
        let started = tokio::time::Instant::now();
        client
            .write_all(
                b"POST /v1/registry/dev-a HTTP/1.1\r\nhost: admin\r\n\
                  x-vitalmq-purpose: governance\r\ncontent-length: 40\r\n\r\n{\"change\"",
            )
            .await
            .expect("write");
        let mut answer = String::new();
        tokio::time::timeout(BODY_READ_TIMEOUT * 3, client.read_to_string(&mut answer))
            .await
            .expect("the server answers a stalled body instead of waiting for it")
            .expect("read");
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(started.elapsed() >= BODY_READ_TIMEOUT);
        let _ = served.await;
        let audit = rig.audit();
        assert_eq!(audit.len(), 1, "{audit:?}");
        assert_eq!(audit[0]["reason"], "refused:body_timeout");
        assert!(rig.changed().is_empty());
    }
}
