//! `vitalmq envelope ...`: verify, inspect and sign signed telemetry, for integrators
//! debugging their devices. Output is one JSON object on stdout.
//!
//! Exit codes: 0 accepted (or inspected/signed), 1 refused, 2 usage or I/O error.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use serde_json::{Value as Json, json};
use vitalmq_bridge::plausible::Assessment;
use vitalmq_envelope::{
    Alarm, AlarmCode, AlarmLevel, Algorithm, AnyKid, DeviceId, MessageType, Number, SigningKey,
    StatusReport, Telemetry, VerifyingKey, inspect, sign, verify,
};
use vitalmq_policies::DeviceRegistry;

#[derive(Debug, clap::Subcommand)]
pub enum EnvelopeCommand {
    /// Verify one message as the bridge would and print the verdict as JSON.
    Verify(VerifyArgs),
    /// Decode one message without a key and print headers and payload as JSON.
    Inspect {
        /// File with the raw COSE bytes; `-` reads stdin.
        file: PathBuf,
    },
    /// Sign one telemetry payload with a device's COSE key (PKCS#8 PEM).
    Sign(SignArgs),
}

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// Algorithm of `--pubkey-hex`.
    #[arg(long, requires = "pubkey_hex")]
    alg: Option<Algorithm>,
    /// The device's public key: 32 bytes (EdDSA) or the uncompressed SEC1 point (ES256).
    #[arg(long, requires = "alg", conflicts_with = "registry")]
    pubkey_hex: Option<String>,
    /// A device registry file; the key is looked up by the message's kid, as the bridge does.
    #[arg(long, required_unless_present = "pubkey_hex")]
    registry: Option<PathBuf>,
    /// The device the message must belong to (what the topic's id is for the bridge).
    #[arg(long)]
    kid: Option<DeviceId>,
    /// The bridge's rule file (`vitalmq-rules/v1`): report what the bridge would mark
    /// (`implausible` values, `clock_skew` against now) with its limits instead of the
    /// defaults.
    #[arg(long)]
    rules: Option<PathBuf>,
    /// File with the raw COSE bytes; `-` reads stdin.
    file: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct SignArgs {
    /// The device's COSE private key (PKCS#8 PEM, as `vitalmq certs init` writes it).
    #[arg(long)]
    key: PathBuf,
    /// Device id; also the kid.
    #[arg(long)]
    dev: DeviceId,
    #[arg(long, default_value_t = 1)]
    epoch: u64,
    #[arg(long)]
    seq: u64,
    /// Device clock in ms since the Unix epoch; defaults to now.
    #[arg(long)]
    ts: Option<u64>,
    #[arg(long, default_value = "1.0.0")]
    fw: String,
    #[arg(long = "type", value_parser = parse_type, default_value = "vitals")]
    kind: MessageType,
    /// A measurement, `name=value`; repeat for more.
    #[arg(long = "m", value_parser = parse_measurement)]
    measurements: Vec<(String, Number)>,
    #[arg(long)]
    q: Option<f64>,
    #[arg(long)]
    model: Option<String>,
    /// `--type alarm` (SPEC 3.1): the alarm code, `[a-z0-9_-]{1,32}`.
    #[arg(long, requires = "level")]
    alarm: Option<AlarmCode>,
    /// `--type alarm`: the device's level, `info`, `review` or `urgent`.
    #[arg(long, requires = "alarm")]
    level: Option<AlarmLevel>,
    /// `--type alarm`: `true` raises the alarm, `false` clears it.
    #[arg(long, requires = "alarm", default_value_t = true, action = clap::ArgAction::Set)]
    active: bool,
    /// `--type alarm`: free text for the clinician, at most 256 bytes.
    #[arg(long, requires = "alarm")]
    detail: Option<String>,
    /// `--type status`: remaining charge, 0..1.
    #[arg(long)]
    battery: Option<f64>,
    /// `--type status`: messages dropped from the device's buffer this boot.
    #[arg(long)]
    dropped: Option<u64>,
    /// `--type status`: the reporting interval the device runs with, in seconds.
    #[arg(long)]
    interval_s: Option<u64>,
    /// `--type status`: on external power.
    #[arg(long, action = clap::ArgAction::Set)]
    charging: Option<bool>,
    /// Where to write the COSE bytes; `-` writes stdout.
    #[arg(long, short)]
    output: PathBuf,
}

fn parse_type(s: &str) -> anyhow::Result<MessageType> {
    match s {
        "vitals" => Ok(MessageType::Vitals),
        "status" => Ok(MessageType::Status),
        "alarm" => Ok(MessageType::Alarm),
        _ => bail!("expected vitals, status or alarm"),
    }
}

fn parse_measurement(s: &str) -> anyhow::Result<(String, Number)> {
    let (name, value) = s.split_once('=').context("expected name=value")?;
    let number = match value.parse::<i64>() {
        Ok(i) => Number::Int(i.into()),
        Err(_) => Number::Float(
            value
                .parse::<f64>()
                .with_context(|| format!("`{value}` is not a number"))?,
        ),
    };
    Ok((name.to_owned(), number))
}

impl EnvelopeCommand {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        match self {
            Self::Verify(args) => run_verify(args),
            Self::Inspect { file } => {
                let message = read_input(&file)?;
                let out = match inspect(&message) {
                    Ok(decoded) => serde_json::to_value(decoded)?,
                    Err(refusal) => json!({
                        "reason": refusal.reason,
                        "detail": refusal.detail,
                    }),
                };
                println!("{}", serde_json::to_string_pretty(&out)?);
                Ok(ExitCode::SUCCESS)
            }
            Self::Sign(args) => run_sign(args),
        }
    }
}

fn run_verify(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let message = read_input(&args.file)?;
    let verdict = match (&args.registry, &args.alg, &args.pubkey_hex) {
        (Some(path), _, _) => {
            let registry = DeviceRegistry::load(path)?;
            verify(&message, &registry, args.kid.as_ref())
        }
        (None, Some(alg), Some(hex_key)) => {
            let key = VerifyingKey::from_hex(*alg, hex_key).context("--pubkey-hex")?;
            verify(&message, &AnyKid(key), args.kid.as_ref())
        }
        _ => bail!("give --registry FILE, or --alg with --pubkey-hex"),
    };
    let rules = args
        .rules
        .as_deref()
        .map(vitalmq_policies::RuleSet::load)
        .transpose()?;
    let decoded = inspect(&message).ok();
    let headers = decoded
        .as_ref()
        .map(|d| serde_json::to_value(&d.headers))
        .transpose()?;
    // Written straight from the typed payload, as the bridge writes its normalized
    // event: a `serde_json::Value` cannot hold the integers beyond 64 bits that CBOR
    // (and so an accepted message) can carry, and converting to one made the CLI fail
    // with "number out of range" on messages the bridge accepted.
    let (out, code) = match verdict {
        Ok(verified) => {
            // The bridge's own judgement, as if it received the message now.
            let now = u64::try_from(SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis())?;
            let (plausibility, clock) = match &rules {
                Some(r) => (r.plausibility().clone(), *r.clock()),
                None => Default::default(),
            };
            let marks = Assessment::of(&verified, now, &plausibility, &clock).marks();
            (
                serde_json::to_string_pretty(&Accepted {
                    verdict: "accepted",
                    detail: format!(
                        "signature ({}), key binding and payload schema verified",
                        verified.algorithm()
                    ),
                    sha256: hex::encode(verified.message_sha256()),
                    headers,
                    payload: &verified,
                    marks,
                })?,
                ExitCode::SUCCESS,
            )
        }
        Err(refusal) => (
            serde_json::to_string_pretty(&json!({
                "verdict": "refused",
                "reason": refusal.reason,
                "detail": refusal.detail,
                "sha256": decoded.as_ref().map(|d| d.sha256.clone()),
                "headers": headers,
                "payload": decoded.map_or(Json::Null, |d| d.payload),
            }))?,
            ExitCode::from(1),
        ),
    };
    println!("{out}");
    Ok(code)
}

/// The verdict on an accepted message.
#[derive(serde::Serialize)]
struct Accepted<'a> {
    verdict: &'static str,
    detail: String,
    sha256: String,
    headers: Option<Json>,
    payload: &'a Telemetry,
    /// What the bridge would mark in the normalized event (`implausible`, `clock_skew`).
    marks: serde_json::Map<String, Json>,
}

fn run_sign(args: SignArgs) -> anyhow::Result<ExitCode> {
    let pem = std::fs::read_to_string(&args.key)
        .with_context(|| format!("reading {}", args.key.display()))?;
    let key =
        SigningKey::from_pkcs8_pem(&pem).with_context(|| format!("{}", args.key.display()))?;
    let ts = match args.ts {
        Some(ts) => ts,
        None => u64::try_from(SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis())?,
    };
    let measurements: BTreeMap<String, Number> = args.measurements.into_iter().collect();
    let mut extra = BTreeMap::new();
    match (args.kind, args.alarm, args.level) {
        (MessageType::Alarm, Some(code), Some(level)) => extra.extend(
            Alarm {
                code,
                level,
                active: args.active,
                detail: args.detail,
            }
            .to_fields(),
        ),
        (MessageType::Alarm, ..) => bail!("an alarm message needs --alarm and --level"),
        (_, Some(_), _) => bail!("--alarm needs --type alarm"),
        _ => {}
    }
    let status = StatusReport {
        battery: args.battery,
        dropped: args.dropped,
        interval_s: args.interval_s,
        charging: args.charging,
    };
    if status != StatusReport::default() && args.kind != MessageType::Status {
        bail!("--battery, --dropped, --interval-s and --charging need --type status");
    }
    extra.extend(status.to_fields());
    let telemetry = Telemetry {
        dev: args.dev,
        epoch: args.epoch,
        seq: args.seq,
        ts,
        fw: args.fw,
        kind: args.kind,
        m: (!measurements.is_empty()).then_some(measurements),
        q: args.q,
        model: args.model,
        schema: None,
        extra,
    };
    let message = sign(&telemetry, &key)?;
    write_output(&args.output, &message)?;
    eprintln!(
        "signed {} bytes for {} ({}) epoch {} seq {}",
        message.len(),
        telemetry.dev,
        key.algorithm(),
        telemetry.epoch,
        telemetry.seq
    );
    Ok(ExitCode::SUCCESS)
}

/// Reads at most one byte more than the profile allows, so an oversized message is
/// reported as `oversized` without reading an unbounded stream into memory.
fn read_input(path: &Path) -> anyhow::Result<Vec<u8>> {
    let limit = (vitalmq_envelope::MAX_MESSAGE_BYTES + 1) as u64;
    let mut buf = Vec::new();
    if path == Path::new("-") {
        std::io::stdin()
            .take(limit)
            .read_to_end(&mut buf)
            .context("reading stdin")?;
    } else {
        std::fs::File::open(path)
            .with_context(|| format!("opening {}", path.display()))?
            .take(limit)
            .read_to_end(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
    }
    Ok(buf)
}

fn write_output(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    if path == Path::new("-") {
        std::io::stdout().write_all(bytes).context("writing stdout")
    } else {
        std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
    }
}
