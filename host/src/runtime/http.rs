//! Outbound HTTP for plugins: standard `wasi:http` (wasmtime-wasi-http), with
//! every request checked against the plugin's `allow_http` list before a
//! connection is opened, and bounded by its `http_timeout`.
//!
//! `allow_http` entries are `host[:port]` or `*.domain[:port]`:
//!
//! - a host is a DNS name or an IP address (IPv6 in brackets, `[::1]:8080`),
//!   compared without regard to case;
//! - `*.example.com` matches every name below `example.com` (`a.example.com`,
//!   `a.b.example.com`), not `example.com` itself (list it too if wanted);
//! - without a port, an entry allows only the default port of the request's
//!   scheme (80 for `http`, 443 for `https`), so `hooks.example.com` never
//!   opens `hooks.example.com:6379`; with one, only that port.
//!
//! The check is on the URL's host, before DNS: a name that is allowed may
//! resolve to any address (DNS rebinding is out of scope; list IP addresses
//! to pin them).

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt;
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody, WasiHttpHooks};

/// The per-request timeout of a plugin that does not set `http_timeout`
/// (lowered to its `timeout` when that is shorter).
pub const DEFAULT_HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// What one plugin may do over HTTP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpPolicy {
    /// The hosts it may call; empty: none (every request is refused).
    pub allow: Vec<HostPattern>,
    /// Connect, first-byte and between-bytes timeout of each request; a
    /// guest may ask for shorter ones, never longer.
    pub timeout: Duration,
}

impl Default for HttpPolicy {
    /// No outbound HTTP at all.
    fn default() -> Self {
        HttpPolicy {
            allow: Vec::new(),
            timeout: DEFAULT_HTTP_TIMEOUT,
        }
    }
}

/// Why a request was refused before it was sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// The plugin has an empty (or no) `allow_http`.
    #[error("the plugin has no `allow_http`, so it may not make HTTP requests")]
    NoHosts,
    /// The request's host and port match no entry.
    #[error("`{0}` is not in the plugin's `allow_http`")]
    NotAllowed(String),
    /// The URL has no host, or one that is not a valid name or address.
    #[error("the URL has no valid host")]
    NoHost,
    /// The URL carries a user name (`user@host`).
    #[error("URLs with a user name (`user@host`) are not allowed")]
    Userinfo,
}

impl HttpPolicy {
    /// Whether a request to `uri` may be sent; the error says why not.
    pub fn check(&self, uri: &http::Uri) -> Result<(), Denied> {
        if self.allow.is_empty() {
            return Err(Denied::NoHosts);
        }
        let authority = uri.authority().ok_or(Denied::NoHost)?;
        if authority.as_str().contains('@') {
            return Err(Denied::Userinfo);
        }
        let default_port = if uri.scheme() == Some(&http::uri::Scheme::HTTPS) {
            443
        } else {
            80
        };
        let port = authority.port_u16().unwrap_or(default_port);
        let host = normalize_host(authority.host()).ok_or(Denied::NoHost)?;
        if self
            .allow
            .iter()
            .any(|p| p.allows(&host, port, default_port))
        {
            Ok(())
        } else {
            Err(Denied::NotAllowed(format!("{host}:{port}")))
        }
    }

    /// The guest's request options with every timeout capped at the policy's.
    fn cap(&self, options: Option<RequestOptions>) -> RequestOptions {
        let options = options.unwrap_or_default();
        let cap = |d: Option<Duration>| Some(d.map_or(self.timeout, |d| d.min(self.timeout)));
        RequestOptions {
            connect_timeout: cap(options.connect_timeout),
            first_byte_timeout: cap(options.first_byte_timeout),
            between_bytes_timeout: cap(options.between_bytes_timeout),
        }
    }
}

/// One `allow_http` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    host: HostMatch,
    /// `None`: the default port of the request's scheme only.
    port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostMatch {
    /// This host (normalized: lower case, IPv6 compressed in brackets).
    Exact(String),
    /// Any name ending in `.` + this domain.
    Subdomains(String),
}

/// Why an `allow_http` entry is not a pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("the entry is empty")]
    Empty,
    #[error("write the host without a scheme (no `http://`)")]
    Scheme,
    #[error("write only the host and port, no path or query")]
    Path,
    #[error("a host pattern has no user name (`@`)")]
    Userinfo,
    #[error("`{0}` is not a port number (1-65535)")]
    Port(String),
    #[error("`*` alone would allow every host; list the hosts, or `*.domain`")]
    AnyHost,
    #[error("`*` may only be the whole first label, as in `*.example.com`")]
    Wildcard,
    #[error("an IPv6 address goes in brackets, as in `[::1]:8080`")]
    BareIpv6,
    #[error("`{0}` is not a host name or IP address")]
    Host(String),
}

impl FromStr for HostPattern {
    type Err = PatternError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err(PatternError::Empty);
        }
        if s.contains("://") {
            return Err(PatternError::Scheme);
        }
        if s.contains(['/', '?', '#']) {
            return Err(PatternError::Path);
        }
        if s.contains('@') {
            return Err(PatternError::Userinfo);
        }
        let (host, port) = split_host_port(s)?;
        let port = match port {
            None => None,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => Some(n),
                _ => return Err(PatternError::Port(p.to_string())),
            },
        };
        let lower = host.to_ascii_lowercase();
        let host = if lower == "*" {
            return Err(PatternError::AnyHost);
        } else if let Some(domain) = lower.strip_prefix("*.") {
            if domain.contains('*') {
                return Err(PatternError::Wildcard);
            }
            let domain = domain.strip_suffix('.').unwrap_or(domain);
            // An IP address has no subdomains.
            if !is_dns_name(domain) || domain.parse::<Ipv4Addr>().is_ok() {
                return Err(PatternError::Host(domain.to_string()));
            }
            HostMatch::Subdomains(domain.to_string())
        } else if lower.contains('*') {
            return Err(PatternError::Wildcard);
        } else {
            HostMatch::Exact(normalize_host(&lower).ok_or(PatternError::Host(lower))?)
        };
        Ok(HostPattern { host, port })
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            HostMatch::Exact(h) => f.write_str(h)?,
            HostMatch::Subdomains(d) => write!(f, "*.{d}")?,
        }
        match self.port {
            Some(p) => write!(f, ":{p}"),
            None => Ok(()),
        }
    }
}

impl HostPattern {
    /// Whether a request to `host` (normalized) on `port` matches, where
    /// `default_port` is its scheme's.
    fn allows(&self, host: &str, port: u16, default_port: u16) -> bool {
        if port != self.port.unwrap_or(default_port) {
            return false;
        }
        match &self.host {
            HostMatch::Exact(h) => h == host,
            HostMatch::Subdomains(domain) => host
                .strip_suffix(domain.as_str())
                .and_then(|rest| rest.strip_suffix('.'))
                .is_some_and(|label| !label.is_empty()),
        }
    }
}

/// `host[:port]` → host and port text; an IPv6 address must be bracketed.
fn split_host_port(s: &str) -> Result<(&str, Option<&str>), PatternError> {
    if s.starts_with('[') {
        let end = s
            .find(']')
            .ok_or_else(|| PatternError::Host(s.to_string()))?;
        let (host, rest) = s.split_at(end + 1);
        return match rest {
            "" => Ok((host, None)),
            _ => match rest.strip_prefix(':') {
                Some(port) => Ok((host, Some(port))),
                None => Err(PatternError::Host(s.to_string())),
            },
        };
    }
    match s.rsplit_once(':') {
        Some((host, _)) if host.contains(':') => Err(PatternError::BareIpv6),
        Some((host, port)) => Ok((host, Some(port))),
        None => Ok((s, None)),
    }
}

/// A host as compared: lower case, without a trailing dot, an IPv6 address
/// compressed and in brackets; `None` if it is neither a name nor an address.
fn normalize_host(host: &str) -> Option<String> {
    let host = host.to_ascii_lowercase();
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return inner.parse::<Ipv6Addr>().ok().map(|ip| format!("[{ip}]"));
    }
    let host = host.strip_suffix('.').unwrap_or(&host);
    if host.parse::<Ipv4Addr>().is_ok() || is_dns_name(host) {
        Some(host.to_string())
    } else {
        None
    }
}

/// Letters, digits, `-` and `_` in dot-separated labels of 1 to 63 bytes, 253
/// bytes at most; no label starts or ends with `-`.
fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// The `wasi:http` hooks of one delivery: the allow list and timeout, and
/// where request failures are noted. Made on the delivery's first request,
/// so a delivery that makes none pays nothing for it.
pub(super) struct HttpHooks {
    policy: Arc<HttpPolicy>,
    plugin: String,
    event_id: String,
    /// The last failure of a request (refused, timed out, refused
    /// connection...), to explain a retry. Written by the request tasks.
    last_failure: Arc<Mutex<Option<String>>>,
}

impl HttpHooks {
    pub(super) fn new(policy: Arc<HttpPolicy>, plugin: &str, event_id: &str) -> HttpHooks {
        HttpHooks {
            policy,
            plugin: plugin.to_string(),
            event_id: event_id.to_string(),
            last_failure: Arc::default(),
        }
    }

    /// The last request failure of the delivery, if any.
    pub(super) fn last_failure(&self) -> Option<String> {
        lock(&self.last_failure).clone()
    }
}

fn lock(slot: &Mutex<Option<String>>) -> std::sync::MutexGuard<'_, Option<String>> {
    // A panic while holding it cannot leave the `Option` half-written.
    slot.lock().unwrap_or_else(|e| e.into_inner())
}

fn note(slot: &Mutex<Option<String>>, text: String) {
    *lock(slot) = Some(text);
}

/// Counts a request by plugin and outcome (`ok`, `denied`, `timeout`,
/// `error`): label values from the configuration and a fixed set.
fn count(plugin: &str, outcome: &'static str) {
    metrics::counter!(
        "switchyard_plugin_http_requests_total",
        "plugin" => plugin.to_string(),
        "outcome" => outcome
    )
    .increment(1);
}

fn is_timeout(e: &HttpError) -> bool {
    matches!(
        e,
        HttpError::ConnectionTimeout
            | HttpError::ConnectionReadTimeout
            | HttpError::HttpResponseTimeout
            | HttpError::DnsTimeout
    )
}

/// An error in words, with the timeout that was hit.
fn describe(e: &HttpError, timeout: Duration) -> String {
    let t = humantime::format_duration(timeout);
    match e {
        HttpError::ConnectionTimeout => format!("timed out connecting (http_timeout {t})"),
        HttpError::ConnectionReadTimeout | HttpError::HttpResponseTimeout => {
            format!("timed out waiting for the response (http_timeout {t})")
        }
        other => other.to_string(),
    }
}

type IoFuture = Box<dyn Future<Output = Result<(), HttpError>> + Send>;
type SendFuture =
    Box<dyn Future<Output = Result<(http::Response<WasiBody>, IoFuture), HttpError>> + Send>;

impl WasiHttpHooks for HttpHooks {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: IoFuture,
    ) -> SendFuture {
        let target = format!("{} {}", request.method(), request.uri());
        if let Err(denied) = self.policy.check(request.uri()) {
            tracing::warn!(
                plugin = %self.plugin,
                event_id = %self.event_id,
                authority = request.uri().authority().map_or("", |a| a.as_str()),
                "outbound HTTP request refused: {denied}"
            );
            count(&self.plugin, "denied");
            note(&self.last_failure, format!("{target}: refused: {denied}"));
            return Box::new(async { Err(HttpError::HttpRequestDenied) });
        }
        let options = self.policy.cap(options);
        let timeout = self.policy.timeout;
        let plugin = self.plugin.clone();
        let failure = self.last_failure.clone();
        Box::new(async move {
            match wasmtime_wasi_http::default_send_request(request, Some(options)).await {
                Ok((response, io)) => {
                    count(&plugin, "ok");
                    // Errors while the guest reads the body (a stalled
                    // server) are noted too.
                    let response = response.map(move |body| {
                        body.map_err(move |e| {
                            note(
                                &failure,
                                format!(
                                    "{target}: reading the response: {}",
                                    describe(&e, timeout)
                                ),
                            );
                            e
                        })
                        .boxed_unsync()
                    });
                    Ok((response, Box::new(io) as IoFuture))
                }
                Err(e) => {
                    count(&plugin, if is_timeout(&e) { "timeout" } else { "error" });
                    note(&failure, format!("{target}: {}", describe(&e, timeout)));
                    Err(e)
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(s: &str) -> HostPattern {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn policy(entries: &[&str]) -> HttpPolicy {
        HttpPolicy {
            allow: entries.iter().map(|e| pattern(e)).collect(),
            timeout: Duration::from_secs(1),
        }
    }

    fn check(p: &HttpPolicy, url: &str) -> Result<(), Denied> {
        p.check(&url.parse::<http::Uri>().unwrap())
    }

    #[test]
    fn an_exact_host_matches_itself_on_the_schemes_default_port_only() {
        let p = policy(&["api.example.com"]);
        assert_eq!(check(&p, "https://api.example.com/v1"), Ok(()));
        assert_eq!(check(&p, "http://api.example.com/"), Ok(()));
        assert_eq!(check(&p, "https://API.Example.COM./x"), Ok(()));
        assert_eq!(check(&p, "https://api.example.com:443/"), Ok(()));
        assert_eq!(check(&p, "http://api.example.com:80/"), Ok(()));
        assert_eq!(
            check(&p, "http://api.example.com:443/"),
            Err(Denied::NotAllowed("api.example.com:443".into()))
        );
        assert_eq!(
            check(&p, "https://api.example.com:8443/"),
            Err(Denied::NotAllowed("api.example.com:8443".into()))
        );
        for other in [
            "https://example.com/",
            "https://x.api.example.com/",
            "https://api.example.com.evil.net/",
            "https://evilapi.example.com/",
        ] {
            assert!(
                matches!(check(&p, other), Err(Denied::NotAllowed(_))),
                "{other}"
            );
        }
    }

    #[test]
    fn a_port_allows_that_port_only() {
        let p = policy(&["127.0.0.1:8080", "hooks.example.com:8443"]);
        assert_eq!(check(&p, "http://127.0.0.1:8080/hook"), Ok(()));
        assert_eq!(check(&p, "https://127.0.0.1:8080/hook"), Ok(()));
        assert_eq!(check(&p, "https://hooks.example.com:8443/"), Ok(()));
        assert_eq!(
            check(&p, "http://127.0.0.1/hook"),
            Err(Denied::NotAllowed("127.0.0.1:80".into()))
        );
        assert!(check(&p, "http://127.0.0.1:8081/").is_err());
        assert!(check(&p, "https://hooks.example.com/").is_err());
        assert!(check(&p, "http://127.0.0.2:8080/").is_err());
    }

    #[test]
    fn a_wildcard_matches_subdomains_at_any_depth_but_not_the_domain() {
        let p = policy(&["*.example.com"]);
        assert_eq!(check(&p, "https://a.example.com/"), Ok(()));
        assert_eq!(check(&p, "https://a.b.example.com/"), Ok(()));
        assert_eq!(check(&p, "http://A.Example.com/"), Ok(()));
        for other in [
            "https://example.com/",
            "https://badexample.com/",
            "https://a.example.com.evil.net/",
            "https://a.example.com:8443/",
            "https://a.example.org/",
        ] {
            assert!(check(&p, other).is_err(), "{other}");
        }
        let p = policy(&["*.example.com:9000"]);
        assert_eq!(check(&p, "http://a.example.com:9000/"), Ok(()));
        assert!(check(&p, "http://a.example.com/").is_err());
    }

    #[test]
    fn ipv6_addresses_compare_in_canonical_form() {
        let p = policy(&["[0:0::1]:8080"]);
        assert_eq!(pattern("[0:0::1]:8080").to_string(), "[::1]:8080");
        assert_eq!(check(&p, "http://[::1]:8080/"), Ok(()));
        assert_eq!(check(&p, "http://[0000::0001]:8080/"), Ok(()));
        assert!(check(&p, "http://[::2]:8080/").is_err());
    }

    #[test]
    fn no_allow_list_means_no_requests() {
        let p = HttpPolicy::default();
        assert_eq!(check(&p, "https://example.com/"), Err(Denied::NoHosts));
    }

    #[test]
    fn user_names_in_urls_are_refused() {
        let p = policy(&["example.com"]);
        assert_eq!(
            check(&p, "https://example.com@evil.net/"),
            Err(Denied::Userinfo)
        );
        assert_eq!(check(&p, "https://u:p@example.com/"), Err(Denied::Userinfo));
    }

    #[test]
    fn patterns_round_trip_in_normal_form() {
        for (text, shown) in [
            ("Hooks.Example.com", "hooks.example.com"),
            ("hooks.example.com.", "hooks.example.com"),
            ("*.Example.com:8443", "*.example.com:8443"),
            ("10.0.0.1:80", "10.0.0.1:80"),
            (" localhost:3000 ", "localhost:3000"),
            ("[::1]", "[::1]"),
        ] {
            assert_eq!(pattern(text).to_string(), shown, "{text}");
        }
    }

    #[test]
    fn bad_patterns_say_what_is_wrong() {
        for (text, error) in [
            ("", PatternError::Empty),
            ("https://example.com", PatternError::Scheme),
            ("example.com/hook", PatternError::Path),
            ("user@example.com", PatternError::Userinfo),
            ("example.com:0", PatternError::Port("0".into())),
            ("example.com:65536", PatternError::Port("65536".into())),
            ("example.com:", PatternError::Port("".into())),
            ("example.com:+80", PatternError::Port("+80".into())),
            ("*", PatternError::AnyHost),
            ("*:443", PatternError::AnyHost),
            ("a*.example.com", PatternError::Wildcard),
            ("a.*.com", PatternError::Wildcard),
            ("*.*.com", PatternError::Wildcard),
            ("::1", PatternError::BareIpv6),
            ("[::1", PatternError::Host("[::1".into())),
            ("[::1]x", PatternError::Host("[::1]x".into())),
            ("[nope]", PatternError::Host("[nope]".into())),
            ("exa mple.com", PatternError::Host("exa mple.com".into())),
            (
                "-x.example.com",
                PatternError::Host("-x.example.com".into()),
            ),
            ("a..b", PatternError::Host("a..b".into())),
            ("*.10.0.0.1", PatternError::Host("10.0.0.1".into())),
        ] {
            assert_eq!(text.parse::<HostPattern>(), Err(error), "{text:?}");
        }
    }

    #[test]
    fn guest_timeouts_are_capped_at_the_policy() {
        let p = policy(&["example.com"]);
        let capped = p.cap(None);
        assert_eq!(capped.connect_timeout, Some(Duration::from_secs(1)));
        assert_eq!(capped.first_byte_timeout, Some(Duration::from_secs(1)));
        assert_eq!(capped.between_bytes_timeout, Some(Duration::from_secs(1)));
        let capped = p.cap(Some(RequestOptions {
            connect_timeout: Some(Duration::from_millis(100)),
            first_byte_timeout: Some(Duration::from_secs(60)),
            between_bytes_timeout: None,
        }));
        assert_eq!(capped.connect_timeout, Some(Duration::from_millis(100)));
        assert_eq!(capped.first_byte_timeout, Some(Duration::from_secs(1)));
        assert_eq!(capped.between_bytes_timeout, Some(Duration::from_secs(1)));
    }

    #[test]
    fn timeouts_are_described_with_the_limit() {
        let t = Duration::from_millis(300);
        assert_eq!(
            describe(&HttpError::ConnectionReadTimeout, t),
            "timed out waiting for the response (http_timeout 300ms)"
        );
        assert!(is_timeout(&HttpError::ConnectionTimeout));
        assert!(!is_timeout(&HttpError::ConnectionRefused));
    }
}
