//! The CLI as a client of the admin API: `vitalmq store events|alerts|quarantine`,
//! `vitalmq trace`, `vitalmq registry ...` and `vitalmq reid lookup` given
//! `--server https://host:port` call the API with the operator certificate of
//! `--cert/--key` (trusting `--ca`) and the `--purpose` stated, instead of reading or
//! changing local files. The server decides and audits; the client prints its answer.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;

/// How to reach the admin API, for commands that can be its clients.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// The admin API (`https://host:port`): the command becomes a call to it, as the
    /// operator of `--cert`, and is audited there.
    #[arg(long, requires_all = ["cert", "key", "ca"])]
    pub server: Option<String>,
    /// The operator's certificate (PEM).
    #[arg(long, requires = "server")]
    pub cert: Option<PathBuf>,
    /// The operator's private key (PEM).
    #[arg(long, requires = "server")]
    pub key: Option<PathBuf>,
    /// The CA the server's certificate chains to (PEM).
    #[arg(long, requires = "server")]
    pub ca: Option<PathBuf>,
    /// A break-glass reason: read outside the role's sites (audited, alerted).
    #[arg(long, requires = "server")]
    pub break_glass: Option<String>,
}

/// An API call.
#[derive(Debug)]
pub struct Call<'a> {
    pub method: reqwest::Method,
    /// The path's segments, e.g. `["v1", "trace", id]`: each is percent-encoded as one
    /// segment, so an id cannot reach another endpoint.
    pub path: Vec<&'a str>,
    /// Query pairs, e.g. `[("device", id)]`: percent-encoded, so an id cannot add a
    /// parameter (`dev-1&break_glass=x`).
    pub query: Vec<(&'a str, &'a str)>,
    pub purpose: Option<&'a str>,
    pub body: Option<Value>,
}

/// The URL of `path` and `query` under `server`, each segment and value encoded.
pub fn endpoint(
    server: &str,
    path: &[&str],
    query: &[(&str, &str)],
) -> anyhow::Result<reqwest::Url> {
    // `.` and `..` would be dropped as segments (the call would reach another path);
    // an empty one would name the collection: none is an id.
    if let Some(bad) = path.iter().find(|s| matches!(**s, "" | "." | "..")) {
        anyhow::bail!("`{bad}` is not an id");
    }
    let mut url =
        reqwest::Url::parse(server).with_context(|| format!("--server {server}: not a URL"))?;
    url.path_segments_mut()
        .map_err(|()| anyhow::anyhow!("--server {server}: not an https://host:port URL"))?
        .pop_if_empty()
        .extend(path);
    if !query.is_empty() {
        url.query_pairs_mut().extend_pairs(query);
    }
    Ok(url)
}

impl ClientArgs {
    /// Makes `call` and returns the JSON answer; an answer other than 2xx is an error
    /// carrying the server's reason.
    pub fn call(&self, server: &str, call: Call<'_>) -> anyhow::Result<Value> {
        let client = self.client()?;
        let url = endpoint(server, &call.path, &call.query)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let mut request = client.request(call.method, url.clone());
            if let Some(p) = call.purpose {
                request = request.header(vitalmq_admin::access::PURPOSE_HEADER, p);
            }
            if let Some(b) = &self.break_glass {
                request = request.header(vitalmq_admin::access::BREAK_GLASS_HEADER, b);
            }
            if let Some(body) = call.body {
                request = request
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(serde_json::to_vec(&body)?);
            }
            let response = request
                .send()
                .await
                .with_context(|| format!("calling {url}"))?;
            let status = response.status();
            let text = response.text().await.context("reading the answer")?;
            let value: Value = serde_json::from_str(&text)
                .with_context(|| format!("{url}: not a JSON answer ({status})"))?;
            if !status.is_success() {
                let error = value["error"].as_str().unwrap_or("no reason given");
                anyhow::bail!("{url}: {status}: {error}");
            }
            Ok(value)
        })
    }

    fn client(&self) -> anyhow::Result<reqwest::Client> {
        let need = |p: &Option<PathBuf>, flag: &str| {
            p.clone()
                .ok_or_else(|| anyhow::anyhow!("--server needs --{flag}"))
        };
        let (cert, key, ca) = (
            need(&self.cert, "cert")?,
            need(&self.key, "key")?,
            need(&self.ca, "ca")?,
        );
        let mut roots = rustls::RootCertStore::empty();
        for c in
            CertificateDer::pem_file_iter(&ca).with_context(|| format!("--ca {}", ca.display()))?
        {
            roots
                .add(c.with_context(|| format!("--ca {}", ca.display()))?)
                .with_context(|| format!("--ca {}", ca.display()))?;
        }
        let chain = CertificateDer::pem_file_iter(&cert)
            .with_context(|| format!("--cert {}", cert.display()))?
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("--cert {}", cert.display()))?;
        let key = PrivateKeyDer::from_pem_file(&key)
            .with_context(|| format!("--key {}", key.display()))?;
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .context("the operator certificate and key do not match")?;
        Ok(reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(std::time::Duration::from_secs(60))
            .build()?)
    }
}

impl ClientArgs {
    /// The server, when the command is to be a client of it.
    pub fn remote(&self) -> Option<&str> {
        self.server.as_deref()
    }

    /// `vitalmq store events|alerts|quarantine --server ...`: the rows as JSON lines.
    pub fn store_rows(
        &self,
        server: &str,
        kind: &str,
        device: Option<&str>,
        purpose: Option<&str>,
    ) -> anyhow::Result<std::process::ExitCode> {
        let answer = self.call(
            server,
            Call {
                method: reqwest::Method::GET,
                path: vec!["v1", kind],
                query: device.map(|d| ("device", d)).into_iter().collect(),
                purpose,
                body: None,
            },
        )?;
        for row in answer["rows"].as_array().into_iter().flatten() {
            println!("{row}");
        }
        if let Some(n) = answer["withheld_outside_scope"].as_u64() {
            eprintln!(
                "{n} rows outside your role's sites were left out (--break-glass REASON to read them)"
            );
        }
        Ok(std::process::ExitCode::SUCCESS)
    }

    /// `vitalmq trace ID --server ...`: the trace as JSON (as `--json` prints it).
    pub fn trace(
        &self,
        server: &str,
        id: &str,
        purpose: Option<&str>,
    ) -> anyhow::Result<std::process::ExitCode> {
        let mut answer = self.call(
            server,
            Call {
                method: reqwest::Method::GET,
                path: vec!["v1", "trace", id],
                query: vec![],
                purpose,
                body: None,
            },
        )?;
        if let Value::Object(map) = &mut answer {
            map.remove("break_glass");
        }
        println!("{answer}");
        Ok(std::process::ExitCode::SUCCESS)
    }

    /// `vitalmq registry ... --server ...`: the change, applied and audited by the server.
    pub fn registry(
        &self,
        server: &str,
        device: &str,
        change: &crate::registry_cmd::Change,
        purpose: Option<&str>,
    ) -> anyhow::Result<std::process::ExitCode> {
        let answer = self.call(
            server,
            Call {
                method: reqwest::Method::POST,
                path: vec!["v1", "registry", device],
                query: vec![],
                purpose,
                body: Some(serde_json::to_value(change)?),
            },
        )?;
        for line in answer["changes"].as_array().into_iter().flatten() {
            println!("{device}: {}", line.as_str().unwrap_or_default());
        }
        println!("changed through {server}");
        Ok(std::process::ExitCode::SUCCESS)
    }

    /// `vitalmq reid lookup --server ...`: the enrolment id.
    pub fn reid_lookup(
        &self,
        server: &str,
        pseudonym: &str,
        purpose: Option<&str>,
    ) -> anyhow::Result<std::process::ExitCode> {
        let answer = self.call(
            server,
            Call {
                method: reqwest::Method::POST,
                path: vec!["v1", "reid", "lookup"],
                query: vec![],
                purpose,
                body: Some(serde_json::json!({ "pseudonym": pseudonym })),
            },
        )?;
        println!("{}", answer["enrolment_id"].as_str().unwrap_or_default());
        Ok(std::process::ExitCode::SUCCESS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_stays_one_segment_or_one_value() {
        let url = endpoint(
            "https://127.0.0.1:8443/",
            &["v1", "registry", "../reid/lookup?x=1#y"],
            &[],
        )
        .expect("url");
        let segments: Vec<&str> = url.path_segments().expect("segments").collect();
        assert_eq!(segments.len(), 3, "{url}");
        assert_eq!(segments[..2], ["v1", "registry"]);
        assert_eq!(segments[2], "..%2Freid%2Flookup%3Fx=1%23y", "{url}");
        assert_eq!(url.query(), None, "{url}");
        assert_eq!(url.fragment(), None, "{url}");

        let url = endpoint(
            "https://127.0.0.1:8443",
            &["v1", "events"],
            &[("device", "dev-1&break_glass=x")],
        )
        .expect("url");
        assert_eq!(url.path(), "/v1/events");
        let pairs: Vec<(String, String)> = url.query_pairs().into_owned().collect();
        assert_eq!(
            pairs,
            [("device".to_owned(), "dev-1&break_glass=x".to_owned())],
            "{url}"
        );

        for bad in ["..", ".", ""] {
            assert!(
                endpoint("https://h:1", &["v1", "trace", bad], &[]).is_err(),
                "`{bad}`"
            );
        }
    }
}
