//! The CLI side of the admin API: `switchyard dlq ...` and `switchyard replay`
//! talk to a running server over HTTP (the server holds the journal's lock,
//! so the CLI never opens the store itself).

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

/// Errors of an admin API call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the server at {url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The server answered with an error (`{"error", "detail"}`).
    #[error("{status}: {error}: {detail}")]
    Api {
        status: u16,
        error: String,
        detail: String,
    },
    #[error("unexpected answer from the server: {0}")]
    Protocol(String),
    #[error("{0}")]
    Usage(String),
}

/// A client of one server's admin API.
pub struct AdminClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl AdminClient {
    /// The server at `url`, or else at the `admin_listen` (or `listen`)
    /// address of `config`
    /// (`0.0.0.0` and `[::]` mean this host's loopback). The bearer token
    /// comes from `SWITCHYARD_ADMIN_TOKEN` when set.
    pub fn new(url: Option<&str>, config: &Path) -> Result<AdminClient, ClientError> {
        let base = match url {
            Some(u) => u.trim_end_matches('/').to_string(),
            None => {
                let cfg = crate::config::load(config).map_err(|e| {
                    ClientError::Usage(format!(
                        "give --server URL, or a valid --config to read `listen` from:\n{e}"
                    ))
                })?;
                let mut addr = cfg.server.admin_listen.unwrap_or(cfg.server.listen);
                if addr.ip().is_unspecified() {
                    addr.set_ip(if addr.is_ipv4() {
                        std::net::Ipv4Addr::LOCALHOST.into()
                    } else {
                        std::net::Ipv6Addr::LOCALHOST.into()
                    });
                }
                format!("http://{addr}")
            }
        };
        Ok(AdminClient {
            base,
            token: std::env::var("SWITCHYARD_ADMIN_TOKEN")
                .ok()
                .filter(|t| !t.is_empty()),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .map_err(|e| ClientError::Protocol(e.to_string()))?,
        })
    }

    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body))
            .await
    }

    async fn send(&self, mut req: reqwest::RequestBuilder) -> Result<Value, ClientError> {
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let resp = req
            .send()
            .await
            .map_err(|source| ClientError::Unreachable {
                url: self.base.clone(),
                source,
            })?;
        let status = resp.status();
        let body: Value = resp
            .json()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        if status.is_success() {
            Ok(body)
        } else {
            Err(ClientError::Api {
                status: status.as_u16(),
                error: body["error"].as_str().unwrap_or("error").to_string(),
                detail: body["detail"].as_str().unwrap_or_default().to_string(),
            })
        }
    }
}

/// A time for `--since`/`--until`: RFC 3339 (`2026-11-26T10:00:00Z`), or a
/// duration meaning that long ago (`90m`, `7d`). Returns Unix milliseconds.
pub fn parse_when(text: &str, now_ms: u64) -> Result<u64, ClientError> {
    if let Ok(t) = humantime::parse_rfc3339_weak(text) {
        return t
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .map_err(|_| ClientError::Usage(format!("`{text}` is before 1970")));
    }
    match humantime::parse_duration(text) {
        Ok(d) => Ok(now_ms.saturating_sub(d.as_millis() as u64)),
        Err(_) => Err(ClientError::Usage(format!(
            "`{text}` is neither an RFC 3339 time (2026-11-26T10:00:00Z) nor a duration ago (2h, 7d)"
        ))),
    }
}

/// One line per dead letter: id, route → plugin, event, when, why.
pub fn dead_letter_line(d: &Value) -> String {
    format!(
        "{id:<10} {route} → {plugin}  event {event} ({ty})  dead {at}  {reason}",
        id = d["id"].as_str().unwrap_or("?"),
        route = d["route"].as_str().unwrap_or("?"),
        plugin = d["plugin"].as_str().unwrap_or("?"),
        event = d["event_id"].as_str().unwrap_or("?"),
        ty = d["type"].as_str().unwrap_or("?"),
        at = d["dead_at"].as_str().unwrap_or("?"),
        reason = d["reason"].as_str().unwrap_or(""),
    )
}

/// Every page of `GET /api/dlq` (of one route or all), up to `limit` items.
pub async fn dead_letters(
    client: &AdminClient,
    route: Option<&str>,
    limit: usize,
) -> Result<Vec<Value>, ClientError> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    while out.len() < limit {
        let mut path = format!("/api/dlq?limit={}", (limit - out.len()).min(1000));
        if let Some(r) = route {
            path.push_str(&format!("&route={}", urlencode(r)));
        }
        if let Some(a) = &after {
            path.push_str(&format!("&after={a}"));
        }
        let page = client.get(&path).await?;
        let items = page["items"]
            .as_array()
            .ok_or_else(|| ClientError::Protocol(format!("no `items` in {page}")))?;
        out.extend(items.iter().cloned());
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => break,
        }
    }
    Ok(out)
}

/// Route names are `[A-Za-z0-9._-]`; anything else is escaped anyway.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Starts a replay; with `wait`, shows a progress bar until every planned
/// delivery is final. Returns the replay's last state.
pub async fn replay(
    client: &AdminClient,
    since_ms: u64,
    until_ms: Option<u64>,
    route: Option<&str>,
    source: Option<&str>,
    wait: bool,
) -> Result<Value, ClientError> {
    let mut body = json!({ "since": since_ms });
    if let Some(u) = until_ms {
        body["until"] = u.into();
    }
    if let Some(r) = route {
        body["route"] = r.into();
    }
    if let Some(s) = source {
        body["source"] = s.into();
    }
    let job = client.post("/api/replay", &body).await?;
    let id = job["id"]
        .as_u64()
        .ok_or_else(|| ClientError::Protocol(format!("no replay id in {job}")))?;
    if !wait {
        return Ok(job);
    }
    let total = job["deliveries"].as_u64().unwrap_or(0);
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} replay {msg} [{bar:30}] {pos}/{len} deliveries ({per_sec}, eta {eta})",
        )
        .map_err(|e| ClientError::Protocol(e.to_string()))?
        .progress_chars("=> "),
    );
    bar.set_message(id.to_string());
    let mut state = job;
    loop {
        let done = state["delivered"].as_u64().unwrap_or(0) + state["dead"].as_u64().unwrap_or(0);
        bar.set_position(done);
        if state["done"] == true {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        state = client.get(&format!("/api/replay/{id}")).await?;
    }
    bar.finish_and_clear();
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn when_is_a_time_or_a_duration_ago() {
        assert_eq!(parse_when("1970-01-01T00:00:01Z", 0).unwrap(), 1000);
        assert_eq!(
            parse_when("2h", 10_000_000).unwrap(),
            10_000_000 - 7_200_000
        );
        assert_eq!(parse_when("7d", 1).unwrap(), 0);
        assert!(parse_when("yesterday", 0).is_err());
        assert_eq!(urlencode("a b/c"), "a%20b%2Fc");
    }
}
