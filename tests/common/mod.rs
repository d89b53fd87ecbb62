//! Helpers shared by the root package's integration tests: scratch directories and
//! running a command with a deadline.
#![allow(dead_code)]

pub mod conformance;
pub mod webhook;

use std::io::{Read as _, Write as _};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A scratch directory, removed on drop.
pub fn temp_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("create temp dir")
}

/// What a finished command did.
#[derive(Debug)]
pub struct Ran {
    pub success: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    /// stdout and stderr together, for assertions on tools that print to either.
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs `cmd` (stdin closed), killing it if it is still running after `timeout`.
pub fn run(cmd: &mut Command, timeout: Duration) -> Ran {
    run_with_input(cmd, None, timeout)
}

/// Runs `cmd` with `input` on stdin (closed after it), killing it after `timeout`.
pub fn run_with_input(cmd: &mut Command, input: Option<&[u8]>, timeout: Duration) -> Ran {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {shown}: {e}"));
    if let (Some(bytes), Some(mut stdin)) = (input, child.stdin.take()) {
        let bytes = bytes.to_vec();
        // A writer thread, so a child that does not read stdin cannot block us.
        std::thread::spawn(move || {
            let _ = stdin.write_all(&bytes);
        });
    }
    // Readers on threads so a chatty child cannot block on a full pipe.
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{shown} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ran {
        success: status.success(),
        code: status.code(),
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

/// A child process running in the background (a subscriber, a server), its stdout and
/// stderr collected line by line; killed on drop.
pub struct Spawned {
    child: std::process::Child,
    shown: String,
    stdout: std::sync::Arc<std::sync::Mutex<String>>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Spawned {
    /// Starts `cmd` (stdin closed) in the background.
    pub fn start(cmd: &mut Command) -> Self {
        let shown = format!("{cmd:?}");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {shown}: {e}"));
        let stdout = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let readers = vec![
            collect(child.stdout.take().expect("piped stdout"), &stdout),
            collect(child.stderr.take().expect("piped stderr"), &stderr),
        ];
        Self {
            child,
            shown,
            stdout,
            stderr,
            readers,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything printed on stdout so far.
    pub fn stdout(&self) -> String {
        self.stdout.lock().expect("stdout lock").clone()
    }

    /// Everything printed on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr lock").clone()
    }

    /// stdout and stderr so far, for failure messages.
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout(), self.stderr())
    }

    /// Waits until `found` holds for stdout + stderr; false after `timeout`.
    pub fn wait_output(&self, timeout: Duration, found: impl Fn(&str) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if found(&self.all()) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Waits up to `timeout` for the process to exit by itself; `None` if it did not
    /// (it keeps running; drop kills it).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<Ran> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                for reader in self.readers.drain(..) {
                    let _ = reader.join();
                }
                return Some(Ran {
                    success: status.success(),
                    code: status.code(),
                    stdout: self.stdout(),
                    stderr: self.stderr(),
                });
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `timeout` for the process to exit; panics if it is still running.
    pub fn finish(&mut self, timeout: Duration) -> Ran {
        match self.wait_exit(timeout) {
            Some(ran) => ran,
            None => panic!(
                "{} did not finish within {timeout:?}; output so far:\n{}",
                self.shown,
                self.all()
            ),
        }
    }

    /// `kill -9` and wait until the process is gone.
    pub fn kill9(&mut self) {
        self.signal("KILL");
        assert!(
            self.wait_exit(Duration::from_secs(10)).is_some(),
            "{} survived kill -9",
            self.shown
        );
    }

    /// Sends `signal` (e.g. "HUP") with the `kill` command.
    pub fn signal(&self, signal: &str) {
        let ran = run(
            Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(self.child.id().to_string()),
            Duration::from_secs(5),
        );
        assert!(
            ran.success,
            "kill -{signal} {}: {}",
            self.child.id(),
            ran.all()
        );
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn collect(
    mut from: impl std::io::Read + Send + 'static,
    into: &std::sync::Arc<std::sync::Mutex<String>>,
) -> std::thread::JoinHandle<()> {
    let into = std::sync::Arc::clone(into);
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => into
                    .lock()
                    .expect("output lock")
                    .push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
    })
}

/// Polls `done` every `every` until it holds; false once `within` has passed.
pub fn poll_until(within: Duration, every: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if done() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(every);
    }
}

/// Waits (polling every 50 ms) until `done` holds; panics naming `what` after `within`.
pub fn wait_until(within: Duration, what: &str, done: impl FnMut() -> bool) {
    assert!(
        poll_until(within, Duration::from_millis(50), done),
        "not within {within:?}: {what}"
    );
}

/// The address after `marker` in `text` (`ADDR` in "... {marker}ADDR ..."), e.g. the
/// real address a process bound for a configured port 0. Only complete lines count:
/// stderr is unbuffered, so a line can arrive in pieces (`eprintln!` writes each
/// formatted fragment on its own).
pub fn reported_addr(text: &str, marker: &str) -> Option<std::net::SocketAddr> {
    let complete = &text[..text.rfind('\n')?];
    complete.lines().find_map(|l| {
        let (_, rest) = l.split_once(marker)?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// `vitalmq broker` on 127.0.0.1; killed on drop. It binds port 0 and the port is the
/// one its ready line reports, so tests never race another process for a free port.
pub struct BrokerProcess {
    pub process: Spawned,
    pub port: u16,
    pub config: std::path::PathBuf,
    /// The configuration with `{listen}` still in it, for [`Self::restart`].
    template: String,
}

/// The broker's ready line, followed by the address it listens on.
const BROKER_READY: &str = "vitalmq broker listening on ";

impl BrokerProcess {
    /// Writes `config` to `dir/broker.toml` with `{listen}` replaced by `127.0.0.1:0`,
    /// starts `bin broker --config ...` and waits (up to `timeout`) for its ready line
    /// on stderr, which names the port it bound.
    pub fn start(
        bin: &std::path::Path,
        dir: &std::path::Path,
        config: &str,
        timeout: Duration,
    ) -> Self {
        Self::start_on(bin, dir, config, 0, timeout)
    }

    /// Like [`Self::start`], on a given port (a restart after `kill -9`).
    pub fn start_on(
        bin: &std::path::Path,
        dir: &std::path::Path,
        config: &str,
        port: u16,
        timeout: Duration,
    ) -> Self {
        let path = dir.join("broker.toml");
        std::fs::write(
            &path,
            config.replace("{listen}", &format!("127.0.0.1:{port}")),
        )
        .expect("write broker config");
        let mut process = Spawned::start(
            Command::new(bin)
                .env("NO_COLOR", "1")
                .arg("broker")
                .arg("--config")
                .arg(&path),
        );
        let ready = process.wait_output(timeout, |out| {
            reported_addr(out, BROKER_READY).is_some() || out.contains("Error")
        });
        let bound = reported_addr(&process.stderr(), BROKER_READY);
        match bound {
            Some(addr) if ready && process.running() => {
                assert!(port == 0 || addr.port() == port, "bound {addr}, not {port}");
                Self {
                    process,
                    port: addr.port(),
                    config: path,
                    template: config.to_owned(),
                }
            }
            _ => panic!("broker not ready within {timeout:?}:\n{}", process.all()),
        }
    }

    /// The port of the broker's /metrics endpoint (`metrics_listen`, which may be port
    /// 0), as its log reports it once the listener is bound.
    pub fn metrics_port(&self) -> u16 {
        let mut port = None;
        wait_until(
            Duration::from_secs(20),
            "the metrics listener reported",
            || {
                port = reported_addr(&self.stderr(), "metrics on /metrics addr=").map(|a| a.port());
                port.is_some()
            },
        );
        port.expect("reported")
    }

    /// Everything the broker logged so far.
    pub fn stderr(&self) -> String {
        self.process.stderr()
    }

    /// `kill -9`: no shutdown, no flush.
    pub fn kill9(&mut self) {
        self.process.kill9();
    }

    /// Starts the broker again with the same configuration, on the same port (bound
    /// before, so known to be this test's).
    pub fn restart(&mut self, bin: &std::path::Path, timeout: Duration) {
        let dir = self.config.parent().expect("config dir").to_path_buf();
        let template = std::mem::take(&mut self.template);
        *self = Self::start_on(bin, &dir, &template, self.port, timeout);
    }

    /// Asks the broker to reload policy, registry and CRLs.
    pub fn sighup(&self) {
        self.process.signal("HUP");
    }
}

/// A broker configuration for tests in `dir` (with `pki/` made by `certs init` and
/// `acl.toml` beside it); `{listen}` is filled in by [`BrokerProcess::start`].
pub fn broker_config(trust_domain: &str) -> String {
    format!(
        r#"listen = "{{listen}}"
connect_timeout_ms = 10000
[tls]
server_cert = "pki/broker/server.pem"
server_key = "pki/broker/server.key.pem"
client_ca = ["pki/ca/ca.pem"]
crls = ["pki/crl.pem"]
trust_domain = "{trust_domain}"
handshake_timeout_ms = 30000
per_ip_per_second = 0
[policy]
acl = "acl.toml"
registry = "pki/registry.toml"
watch = false
[audit]
path = "broker-audit.jsonl"
"#
    )
}

/// `vitalmq bridge` with a configuration written to `dir/bridge.toml`; killed on drop.
pub struct BridgeProcess {
    pub process: Spawned,
    pub config: std::path::PathBuf,
}

impl BridgeProcess {
    /// A bridge configuration: PKI at `dir/pki`, data in `dir/bridge-data`, `sinks` is
    /// TOML appended verbatim (`[[sinks]]` tables, may be empty).
    pub fn config(broker_port: u16, sinks: &str) -> String {
        Self::config_with(broker_port, "", sinks)
    }

    /// Like [`Self::config`], with extra `[pipeline]` keys (`pipeline`, TOML lines).
    pub fn config_with(broker_port: u16, pipeline: &str, sinks: &str) -> String {
        format!(
            r#"id = "bridge-01"
data_dir = "bridge-data"
registry = "pki/registry.toml"
[broker]
address = "127.0.0.1:{broker_port}"
ca = "pki/ca/ca.pem"
cert = "pki/identities/bridge/bridge-01.pem"
key = "pki/identities/bridge/bridge-01.key.pem"
[pipeline]
receipt_interval_ms = 100
{pipeline}
{sinks}
"#
        )
    }

    /// Starts `bin bridge` and waits for its ready line.
    pub fn start(
        bin: &std::path::Path,
        dir: &std::path::Path,
        config: &str,
        timeout: Duration,
    ) -> Self {
        Self::start_with_env(bin, dir, config, &[], timeout)
    }

    /// Like [`Self::start`], with extra environment variables (S3 credentials).
    pub fn start_with_env(
        bin: &std::path::Path,
        dir: &std::path::Path,
        config: &str,
        env: &[(&str, &str)],
        timeout: Duration,
    ) -> Self {
        let path = dir.join("bridge.toml");
        std::fs::write(&path, config).expect("write bridge config");
        let mut cmd = Command::new(bin);
        cmd.env("NO_COLOR", "1").env("RUST_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let process = Spawned::start(cmd.arg("bridge").arg("--config").arg(&path));
        let bridge = Self {
            process,
            config: path,
        };
        let ready = bridge.process.wait_output(timeout, |out| {
            out.contains("vitalmq bridge ready") || out.contains("error: ")
        });
        assert!(
            ready && bridge.process.all().contains("vitalmq bridge ready"),
            "bridge not ready within {timeout:?}:\n{}",
            bridge.process.all()
        );
        bridge
    }
}

/// `vitalmq store KIND --data DIR`: the JSON lines it prints.
pub fn store_rows(
    bin: &std::path::Path,
    kind: &str,
    data: &std::path::Path,
) -> Vec<serde_json::Value> {
    let ran = run(
        Command::new(bin).args(["store", kind, "--data"]).arg(data),
        Duration::from_secs(20),
    );
    assert!(ran.success, "vitalmq store {kind}: {}", ran.all());
    ran.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

/// moto's S3-compatible server (`python3 -m pip install 'moto[server]==5.*'`, which
/// `scripts/test` does) on 127.0.0.1 (port 0, or a given port), with one bucket; killed
/// on drop.
pub struct Moto {
    pub process: Spawned,
    pub port: u16,
}

/// What `tests/py/moto_server.py` prints, followed by the address it bound.
pub const MOTO_READY: &str = "moto listening on ";

impl Moto {
    pub fn start(bucket: &str, port: Option<u16>) -> Self {
        let probe = run(
            Command::new("python3").args(["-c", "import moto, boto3"]),
            Duration::from_secs(30),
        );
        assert!(
            probe.success,
            "moto is not installed (run scripts/test, which installs 'moto[server]==5.*'): {}",
            probe.all()
        );
        // Port 0 unless a restart must keep the port: the server reports what it bound.
        let process = Spawned::start(
            Command::new("python3")
                .arg(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/tests/py/moto_server.py"
                ))
                .arg(port.unwrap_or(0).to_string()),
        );
        assert!(
            process.wait_output(Duration::from_secs(30), |out| reported_addr(
                out, MOTO_READY
            )
            .is_some()
                || out.contains("Error")),
            "moto did not start: {}",
            process.all()
        );
        let port = reported_addr(&process.stdout(), MOTO_READY)
            .unwrap_or_else(|| panic!("moto did not start: {}", process.all()))
            .port();
        let moto = Self { process, port };
        moto.boto3(&format!("s3.create_bucket(Bucket={bucket:?})"));
        moto
    }

    /// Runs python `code` with `s3` a boto3 client of this server; returns stdout.
    pub fn boto3(&self, code: &str) -> String {
        let script = format!(
            "import boto3, json\ns3 = boto3.client('s3', endpoint_url='http://127.0.0.1:{}', \
             aws_access_key_id='testing', aws_secret_access_key='testing', region_name='us-east-1')\n{code}\n",
            self.port
        );
        let ran = run(
            Command::new("python3").args(["-c", &script]),
            Duration::from_secs(30),
        );
        assert!(ran.success, "boto3: {}", ran.all());
        ran.stdout
    }

    /// Every object of `bucket` as (key, body as text).
    pub fn objects(&self, bucket: &str) -> Vec<(String, Vec<u8>)> {
        let out = self.boto3(&format!(
            "out = []\nfor o in s3.list_objects_v2(Bucket={bucket:?}).get('Contents', []):\n    \
             out.append([o['Key'], s3.get_object(Bucket={bucket:?}, Key=o['Key'])['Body'].read().hex()])\n\
             print(json.dumps(out))"
        ));
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("boto3 listing");
        v.as_array()
            .expect("array")
            .iter()
            .map(|o| {
                (
                    o[0].as_str().expect("key").to_owned(),
                    hex::decode(o[1].as_str().expect("hex")).expect("hex"),
                )
            })
            .collect()
    }
}

/// The `vitalmq` binary of the package under test (root-package integration tests only).
#[macro_export]
macro_rules! vitalmq_bin {
    () => {
        std::path::Path::new(env!("CARGO_BIN_EXE_vitalmq"))
    };
}

/// Trust domain of every test PKI.
pub const TRUST_DOMAIN: &str = "demo.vitalmq";

/// Runs `bin args` (20 s deadline) and asserts it succeeded.
pub fn vitalmq_ok(bin: &std::path::Path, args: &[&str]) -> Ran {
    let ran = run(Command::new(bin).args(args), Duration::from_secs(20));
    assert!(ran.success, "vitalmq {args:?} failed:\n{}", ran.all());
    ran
}

/// A scratch directory with a PKI (`certs init`, `devices` devices on 2 sites), the
/// shipped ACL, and `vitalmq broker` running in front of them.
pub struct Rig {
    pub bin: std::path::PathBuf,
    pub tmp: tempfile::TempDir,
    pub broker: BrokerProcess,
}

impl Rig {
    /// `prepare` may change the PKI directory before the broker reads it.
    pub fn start(
        bin: &std::path::Path,
        name: &str,
        devices: u32,
        prepare: impl FnOnce(&std::path::Path),
    ) -> Self {
        let tmp = temp_dir(&format!("vitalmq-{name}"));
        let pki = tmp.path().join("pki");
        vitalmq_ok(
            bin,
            &[
                "certs",
                "init",
                "--dir",
                pki.to_str().expect("utf-8"),
                "--trust-domain",
                TRUST_DOMAIN,
                "--devices",
                &devices.to_string(),
                "--sites",
                "2",
            ],
        );
        std::fs::copy(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/examples/acl.toml"),
            tmp.path().join("acl.toml"),
        )
        .expect("copy the ACL");
        prepare(tmp.path());
        let broker = BrokerProcess::start(
            bin,
            tmp.path(),
            &broker_config(TRUST_DOMAIN),
            Duration::from_secs(30),
        );
        Self {
            bin: bin.to_path_buf(),
            tmp,
            broker,
        }
    }

    pub fn dir(&self) -> &std::path::Path {
        self.tmp.path()
    }

    pub fn pki(&self) -> std::path::PathBuf {
        self.dir().join("pki")
    }

    /// The bridge's data directory (as [`BridgeProcess::config`] sets it).
    pub fn data(&self) -> std::path::PathBuf {
        self.dir().join("bridge-data")
    }

    /// Starts a bridge with extra `[pipeline]` keys and `[[sinks]]`.
    pub fn bridge(&self, pipeline: &str, sinks: &str) -> BridgeProcess {
        BridgeProcess::start(
            &self.bin,
            self.dir(),
            &BridgeProcess::config_with(self.broker.port, pipeline, sinks),
            Duration::from_secs(30),
        )
    }

    /// `vitalmq sim` in the background: the first `devices` devices, `count` messages
    /// each at 20/s (room under the ACL's 50/s for resends after a reconnect, so the
    /// 256-message device outbox never overflows), resending after 1 s without receipt
    /// progress, until everything is receipted (120 s at most).
    /// Logs at info (tests wait for its "generation done" and "connection lost").
    pub fn sim(&self, devices: u32, count: u32) -> Spawned {
        Spawned::start(
            Command::new(&self.bin)
                .env("NO_COLOR", "1")
                .env("RUST_LOG", "info,rumqttc=warn")
                .args(["sim", "--pki"])
                .arg(self.pki())
                .arg("--broker")
                .arg(format!("127.0.0.1:{}", self.broker.port))
                .arg("--state")
                .arg(self.dir().join("sim-state"))
                .args([
                    "--devices",
                    &devices.to_string(),
                    "--count",
                    &count.to_string(),
                ])
                .args([
                    "--rate",
                    "20",
                    "--resend-after",
                    "1s",
                    "--until-receipted",
                    "120s",
                ]),
        )
    }

    /// `vitalmq store KIND` of this rig's bridge.
    pub fn rows(&self, kind: &str) -> Vec<serde_json::Value> {
        store_rows(&self.bin, kind, &self.data())
    }

    pub fn stats(&self) -> serde_json::Value {
        self.rows("stats").remove(0)
    }

    /// Polls the bridge's stats until `done` holds; panics after `within`.
    pub fn wait_stats(
        &self,
        within: Duration,
        what: &str,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            let st = self.stats();
            if done(&st) {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "not within {within:?}: {what}; stats {st}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// One QoS 1 PUBLISH of `payload` with mosquitto_pub as `role`/`id`.
    pub fn mosquitto_pub(&self, role: &str, id: &str, topic: &str, payload: &[u8]) {
        let file = self.dir().join(format!("payload-{id}.bin"));
        std::fs::write(&file, payload).expect("write payload");
        let identities = self.pki().join("identities").join(role);
        let ran = run(
            Command::new("mosquitto_pub")
                .args(["-h", "127.0.0.1", "-p", &self.broker.port.to_string()])
                .arg("--cafile")
                .arg(self.pki().join("ca/ca.pem"))
                .arg("--cert")
                .arg(identities.join(format!("{id}.pem")))
                .arg("--key")
                .arg(identities.join(format!("{id}.key.pem")))
                .args(["-i", id, "-V", "mqttv311", "-q", "1", "-t", topic, "-f"])
                .arg(&file),
            Duration::from_secs(15),
        );
        assert!(
            ran.success,
            "mosquitto_pub as {id} to {topic}: {}",
            ran.all()
        );
    }

    /// A line-buffered mosquitto_sub as `role`/`id` on `filter` (`-v`: topic, payload),
    /// once its SUBACK arrived.
    pub fn mosquitto_sub(&self, role: &str, id: &str, filter: &str) -> Spawned {
        self.mosquitto_sub_all(role, id, &[filter])
    }

    /// Like [`Self::mosquitto_sub`], on several filters in one SUBSCRIBE (one
    /// connection per identity: a second one would take the first one over).
    pub fn mosquitto_sub_all(&self, role: &str, id: &str, filters: &[&str]) -> Spawned {
        let filter = filters.join(" ");
        let identities = self.pki().join("identities").join(role);
        let sub = Spawned::start(
            Command::new("stdbuf")
                .args([
                    "-oL",
                    "mosquitto_sub",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.broker.port.to_string(),
                ])
                .arg("--cafile")
                .arg(self.pki().join("ca/ca.pem"))
                .arg("--cert")
                .arg(identities.join(format!("{id}.pem")))
                .arg("--key")
                .arg(identities.join(format!("{id}.key.pem")))
                // `-d` prints the SUBACK ("Subscribed (mid: ...)"): the subscription is
                // in place before the caller can make anything publish. Debug lines
                // never take the `topic payload` form of a message.
                .args(["-i", id, "-q", "1", "-v", "-d"])
                .args(filters.iter().flat_map(|f| ["-t", f])),
        );
        assert!(
            sub.wait_output(Duration::from_secs(20), |out| out
                .contains("Subscribed (mid:")),
            "{id} did not get its SUBACK for {filter}:\n{}",
            sub.all()
        );
        sub
    }

    /// Signs `(epoch, seq)` for `device` with its COSE key (`vitalmq envelope sign`).
    pub fn signed(&self, device: &str, epoch: u64, seq: u64) -> Vec<u8> {
        self.sign(
            device,
            device,
            epoch,
            seq,
            &["--m", "spo2=97", "--m", "pulse=72", "--q", "0.95"],
        )
    }

    /// `vitalmq envelope sign` of `(epoch, seq)` for `device` with `args` (payload
    /// flags), signed with `key_of`'s COSE key: another device's key forges it.
    pub fn sign(&self, device: &str, key_of: &str, epoch: u64, seq: u64, args: &[&str]) -> Vec<u8> {
        let key = self.pki().join("devices").join(key_of).join("cose.key.pem");
        let out = self.dir().join(format!("signed-{device}.cbor"));
        let (epoch, seq) = (epoch.to_string(), seq.to_string());
        let mut all = vec![
            "envelope",
            "sign",
            "--key",
            key.to_str().expect("utf-8"),
            "--dev",
            device,
            "--epoch",
            &epoch,
            "--seq",
            &seq,
        ];
        all.extend(args);
        all.extend(["--output", out.to_str().expect("utf-8")]);
        vitalmq_ok(&self.bin, &all);
        std::fs::read(&out).expect("signed message")
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970");
    u64::try_from(now.as_millis()).expect("ms fit u64")
}

/// Device time zero of a scripted trajectory: ten minutes ago. The script plays minutes
/// of device time in seconds, so it must lie within the rule file's `[clock]` limits of
/// the bridge's clock (300 s ahead, 7 days behind): a reading outside them is marked as
/// clock skew and evaluated at its reception time, which would squeeze the script.
pub fn recent_device_time_origin() -> u64 {
    now_ms() - 600_000
}

/// `(device time in s, spo2)`: 97 for a minute, a fall to 86 held for minutes (the
/// shipped `spo2-low` rule opens after the 16th reading), a dip to 84, then recovery to
/// 93 for two minutes. One reading every 10 s of device time.
pub fn desaturation() -> Vec<(u64, f64)> {
    let mut t = Vec::new();
    let mut s = 0;
    let mut push = |v: f64, n: usize| {
        for _ in 0..n {
            t.push((s, v));
            s += 10;
        }
    };
    push(97.0, 7);
    for v in [89.0, 88.0, 87.0, 86.0] {
        push(v, 1);
    }
    push(86.0, 10);
    push(84.0, 2);
    push(93.0, 14);
    t
}

/// The last stdout line of a finished `vitalmq sim`, asserting everything was receipted.
pub fn sim_summary_all_receipted(sim: &mut Spawned) -> serde_json::Value {
    let ran = sim.finish(Duration::from_secs(180));
    let summary: serde_json::Value = ran
        .stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no summary from vitalmq sim:\n{}", ran.all()));
    assert!(
        ran.success && summary["all_receipted"] == true,
        "not everything receipted: {summary}"
    );
    summary
}

/// The records of an audit log (JSON lines); none while the file does not exist.
pub fn audit_records(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line {l}: {e}")))
        .collect()
}

/// Whether `record` has every field of `fields`, each a (JSON pointer, string value).
pub fn has_fields(record: &serde_json::Value, fields: &[(&str, &str)]) -> bool {
    fields
        .iter()
        .all(|(k, v)| record.pointer(k).and_then(serde_json::Value::as_str) == Some(*v))
}

/// The refusals an audit record stands for: itself, or the repeats its aggregation
/// summary counts (`details.repeats`).
pub fn refusals_represented(record: &serde_json::Value) -> u64 {
    record["details"]["repeats"].as_u64().unwrap_or(1)
}
