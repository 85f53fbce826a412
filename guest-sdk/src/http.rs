//! Outbound HTTP: blocking requests through standard `wasi:http`.
//!
//! The router sends a request only if its host is in the plugin's
//! `allow_http` list in `rules.toml` (`"hooks.example.com"`,
//! `"*.example.com"`, `"127.0.0.1:8080"`); any other is refused with
//! [`HttpError::Denied`]. Each request is bounded by the plugin's
//! `http_timeout` (connect, first byte, and between bytes of the body).
//!
//! Bodies are read whole into memory, within the plugin's memory cap.
//!
//! ```no_run
//! # fn demo() -> Result<(), switchyard_sdk::Failure> {
//! use switchyard_sdk::http;
//!
//! // A GET; `error_for_status` turns 4xx/5xx into an `HttpError`.
//! let rate: f64 = http::get("https://rates.example.com/eur")?.error_for_status()?.json()?;
//!
//! // A POST with a JSON body and a header.
//! let answer = http::Request::post("https://hooks.example.com/orders")
//!     .header("authorization", "Bearer 123")
//!     .json(&serde_json::json!({ "rate": rate }))
//!     .send()?;
//! if answer.status() == 409 {
//!     return Ok(()); // already there
//! }
//! answer.error_for_status()?;
//! # Ok(()) }
//! ```
//!
//! `?` turns an [`HttpError`] into a [`Failure`]: a refused host, an invalid
//! URL or request, an unexpected body or a 4xx answer reject the event;
//! timeouts, network errors, 5xx, 408 and 429 answers ask for a retry
//! (after the server's `Retry-After`, if it sent one in seconds).

use crate::Failure;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt;
use std::time::Duration;

/// An HTTP method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Patch,
    Delete,
    Options,
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
            Method::Options => "OPTIONS",
        })
    }
}

/// Why a request did not produce the response wanted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpError {
    /// The URL is not an `http://` or `https://` URL with a host.
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The router refused the request: the host is not in the plugin's
    /// `allow_http` (or the plugin has none).
    Denied {
        /// The method and URL.
        request: String,
    },
    /// No connection, or no (more) response, within the time allowed.
    Timeout {
        /// The method and URL.
        request: String,
    },
    /// The connection failed: refused, DNS, TLS, or a protocol error.
    Network {
        /// The method and URL.
        request: String,
        /// The `wasi:http` error.
        message: String,
    },
    /// The request cannot be sent as built: a header that may not be set, a
    /// body over a limit, a JSON body that did not serialize...
    InvalidRequest {
        /// The method and URL.
        request: String,
        /// What is wrong with it.
        message: String,
    },
    /// The server answered with an error status ([`Response::error_for_status`]).
    Status {
        /// The method and URL.
        request: String,
        /// The status code, 400 to 599.
        status: u16,
        /// The server's `Retry-After`, when given in seconds.
        retry_after: Option<Duration>,
    },
    /// The response body is not what was expected ([`Response::json`],
    /// [`Response::text`]).
    Body {
        /// The method and URL.
        request: String,
        /// What is wrong with it.
        message: String,
    },
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::InvalidUrl { url, reason } => {
                write!(f, "http: invalid URL `{url}`: {reason}")
            }
            HttpError::Denied { request } => write!(
                f,
                "http: {request}: refused, the host is not allowed (not in the plugin's allow_http)"
            ),
            HttpError::Timeout { request } => write!(f, "http: {request}: timed out"),
            HttpError::Network { request, message } => write!(f, "http: {request}: {message}"),
            HttpError::InvalidRequest { request, message } => {
                write!(f, "http: {request}: invalid request: {message}")
            }
            HttpError::Status {
                request, status, ..
            } => write!(f, "http: {request}: answered {status}"),
            HttpError::Body { request, message } => write!(f, "http: {request}: {message}"),
        }
    }
}

impl std::error::Error for HttpError {}

impl HttpError {
    /// Whether trying again later may succeed (a timeout, a network error, a
    /// 5xx, 408 or 429 answer).
    pub fn is_transient(&self) -> bool {
        match self {
            HttpError::Timeout { .. } | HttpError::Network { .. } => true,
            HttpError::Status { status, .. } => *status >= 500 || matches!(status, 408 | 429),
            _ => false,
        }
    }
}

impl From<HttpError> for Failure {
    fn from(e: HttpError) -> Self {
        if e.is_transient() {
            let after = match &e {
                HttpError::Status { retry_after, .. } => *retry_after,
                _ => None,
            };
            Failure::Retry(after)
        } else {
            Failure::reject(e.to_string())
        }
    }
}

/// A request to send, built step by step; [`send`](Request::send) sends it.
#[derive(Debug, Clone)]
#[must_use = "a request does nothing until `send` is called"]
pub struct Request {
    method: Method,
    url: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    timeout: Option<Duration>,
    /// A problem found while building (e.g. a body that did not serialize),
    /// reported by `send`.
    error: Option<String>,
}

impl Request {
    /// A request with `method` to `url` (`http://` or `https://`).
    pub fn new(method: Method, url: impl Into<String>) -> Request {
        Request {
            method,
            url: url.into(),
            headers: Vec::new(),
            body: Vec::new(),
            timeout: None,
            error: None,
        }
    }

    /// A GET request.
    pub fn get(url: impl Into<String>) -> Request {
        Request::new(Method::Get, url)
    }

    /// A POST request.
    pub fn post(url: impl Into<String>) -> Request {
        Request::new(Method::Post, url)
    }

    /// A PUT request.
    pub fn put(url: impl Into<String>) -> Request {
        Request::new(Method::Put, url)
    }

    /// A PATCH request.
    pub fn patch(url: impl Into<String>) -> Request {
        Request::new(Method::Patch, url)
    }

    /// A DELETE request.
    pub fn delete(url: impl Into<String>) -> Request {
        Request::new(Method::Delete, url)
    }

    /// Adds a header (several with the same name are all sent). `host`,
    /// `connection`, `transfer-encoding` and the like are set by the router
    /// and may not be set here.
    pub fn header(mut self, name: impl Into<String>, value: impl AsRef<[u8]>) -> Request {
        self.headers.push((name.into(), value.as_ref().to_vec()));
        self
    }

    /// Sets the body (sent with its `content-length`).
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Request {
        self.body = body.into();
        self
    }

    /// Sets the body to `value` as JSON, and `content-type: application/json`
    /// unless a content type was set.
    pub fn json<T: Serialize + ?Sized>(mut self, value: &T) -> Request {
        match serde_json::to_vec(value) {
            Ok(body) => self.body = body,
            Err(e) => self.error = Some(format!("the JSON body did not serialize: {e}")),
        }
        if find(&self.headers, "content-type").is_none() {
            self.headers
                .push(("content-type".into(), b"application/json".to_vec()));
        }
        self
    }

    /// Waits at most `timeout` to connect, for the response to start, and
    /// between parts of its body. The plugin's `http_timeout` still applies
    /// when it is shorter.
    pub fn timeout(mut self, timeout: Duration) -> Request {
        self.timeout = Some(timeout);
        self
    }

    /// Sends the request and reads the whole response.
    ///
    /// Any status is a response here; [`Response::error_for_status`] turns
    /// 4xx and 5xx into errors.
    pub fn send(self) -> Result<Response, HttpError> {
        let described = format!("{} {}", self.method, self.url);
        let target = parse_url(&self.url).map_err(|reason| HttpError::InvalidUrl {
            url: self.url.clone(),
            reason,
        })?;
        if let Some(message) = self.error.clone() {
            return Err(HttpError::InvalidRequest {
                request: described,
                message,
            });
        }
        crate::require_host("http::Request::send");
        match wasi::send(&self, &target) {
            Ok(response) => Ok(Response {
                request: described,
                ..response
            }),
            Err(e) => Err(e.into_error(described)),
        }
    }
}

/// Sends a GET request to `url` and reads the whole response.
pub fn get(url: &str) -> Result<Response, HttpError> {
    Request::get(url).send()
}

/// An HTTP response, its body read whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    request: String,
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

impl Response {
    /// A response as [`Request::send`] returns it, e.g. to unit-test code
    /// that handles responses; `request` names it in errors ("GET https://…").
    pub fn new(
        request: impl Into<String>,
        status: u16,
        headers: Vec<(String, Vec<u8>)>,
        body: Vec<u8>,
    ) -> Response {
        Response {
            request: request.into(),
            status,
            headers,
            body,
        }
    }

    /// The status code.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The first value of header `name` (any case), if it is text.
    pub fn header(&self, name: &str) -> Option<&str> {
        find(&self.headers, name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Every header as (lower-case name, value), in the order received.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.headers.iter().map(|(k, v)| (k.as_str(), v.as_slice()))
    }

    /// The body.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The body, taken.
    pub fn into_body(self) -> Vec<u8> {
        self.body
    }

    /// The body as UTF-8 text.
    pub fn text(&self) -> Result<&str, HttpError> {
        std::str::from_utf8(&self.body).map_err(|e| HttpError::Body {
            request: self.request.clone(),
            message: format!("the body is not UTF-8 text: {e}"),
        })
    }

    /// The body as JSON, deserialized into `T`.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, HttpError> {
        serde_json::from_slice(&self.body).map_err(|e| HttpError::Body {
            request: self.request.clone(),
            message: format!("the body is not the JSON expected: {e}"),
        })
    }

    /// The response itself if its status is below 400, else
    /// [`HttpError::Status`] (with the server's `Retry-After` in seconds).
    pub fn error_for_status(self) -> Result<Response, HttpError> {
        if self.status < 400 {
            return Ok(self);
        }
        let retry_after = self
            .header("retry-after")
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        Err(HttpError::Status {
            request: self.request,
            status: self.status,
            retry_after,
        })
    }
}

/// The first value of header `name`, compared without regard to case.
fn find<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice())
}

/// The parts of a URL that `wasi:http` takes apart.
#[derive(Debug, PartialEq, Eq)]
struct Target<'a> {
    https: bool,
    authority: &'a str,
    path_with_query: String,
}

/// Splits `scheme://authority/path?query#fragment` (the fragment is not
/// sent).
fn parse_url(url: &str) -> Result<Target<'_>, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| "expected http:// or https://".to_string())?;
    let https = match scheme.to_ascii_lowercase().as_str() {
        "http" => false,
        "https" => true,
        other => return Err(format!("scheme `{other}` is not http or https")),
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    if authority.is_empty() {
        return Err("it has no host".into());
    }
    if authority.contains(|c: char| c.is_whitespace() || c.is_control()) {
        return Err("the host contains spaces".into());
    }
    let tail = tail.split('#').next().unwrap_or("");
    if tail.contains(|c: char| c.is_whitespace() || c.is_control()) {
        return Err("the path contains spaces; percent-encode them".into());
    }
    let path_with_query = match tail.chars().next() {
        None => "/".to_string(),
        Some('?') => format!("/{tail}"),
        Some(_) => tail.to_string(),
    };
    Ok(Target {
        https,
        authority,
        path_with_query,
    })
}

/// The `wasi:http` calls: only reached inside the router.
mod wasi {
    use super::{Method, Request, Response, Target};
    use crate::__bindings::wasi::http::outgoing_handler;
    use crate::__bindings::wasi::http::types as wit;
    use crate::__bindings::wasi::io::streams::StreamError;

    /// Most bytes `blocking-write-and-flush` takes at once.
    const WRITE_CHUNK: usize = 4096;
    /// Bytes asked for per read of the response body.
    const READ_CHUNK: u64 = 64 << 10;

    /// A failure before it is given the request's name.
    pub(super) enum Error {
        Code(wit::ErrorCode),
        Request(String),
    }

    impl Error {
        pub(super) fn into_error(self, request: String) -> super::HttpError {
            use super::HttpError;
            use wit::ErrorCode as C;
            match self {
                Error::Request(message) => HttpError::InvalidRequest { request, message },
                Error::Code(C::HttpRequestDenied) => HttpError::Denied { request },
                Error::Code(
                    C::ConnectionTimeout
                    | C::ConnectionReadTimeout
                    | C::ConnectionWriteTimeout
                    | C::HttpResponseTimeout
                    | C::DnsTimeout,
                ) => HttpError::Timeout { request },
                Error::Code(
                    code @ (C::HttpRequestMethodInvalid
                    | C::HttpRequestUriInvalid
                    | C::HttpRequestUriTooLong
                    | C::HttpRequestLengthRequired
                    | C::HttpRequestBodySize(_)
                    | C::HttpRequestHeaderSectionSize(_)
                    | C::HttpRequestHeaderSize(_)
                    | C::HttpRequestTrailerSectionSize(_)
                    | C::HttpRequestTrailerSize(_)),
                ) => HttpError::InvalidRequest {
                    request,
                    message: format!("{code:?}"),
                },
                Error::Code(code) => HttpError::Network {
                    request,
                    message: format!("{code:?}"),
                },
            }
        }
    }

    impl From<wit::ErrorCode> for Error {
        fn from(code: wit::ErrorCode) -> Self {
            Error::Code(code)
        }
    }

    fn method(m: Method) -> wit::Method {
        match m {
            Method::Get => wit::Method::Get,
            Method::Head => wit::Method::Head,
            Method::Post => wit::Method::Post,
            Method::Put => wit::Method::Put,
            Method::Patch => wit::Method::Patch,
            Method::Delete => wit::Method::Delete,
            Method::Options => wit::Method::Options,
        }
    }

    fn refused(what: &str) -> Error {
        Error::Request(format!("the host refused to {what}"))
    }

    pub(super) fn send(req: &Request, target: &Target<'_>) -> Result<Response, Error> {
        let headers = wit::Fields::new();
        for (name, value) in &req.headers {
            headers
                .append(name, value)
                .map_err(|e| Error::Request(format!("header `{name}`: {e:?}")))?;
        }
        let has_body = !req.body.is_empty();
        if has_body && super::find(&req.headers, "content-length").is_none() {
            let length = req.body.len().to_string();
            headers
                .append("content-length", length.as_bytes())
                .map_err(|e| Error::Request(format!("header `content-length`: {e:?}")))?;
        }
        let request = wit::OutgoingRequest::new(headers);
        request
            .set_method(&method(req.method))
            .map_err(|()| refused("set the method"))?;
        let scheme = if target.https {
            wit::Scheme::Https
        } else {
            wit::Scheme::Http
        };
        request
            .set_scheme(Some(&scheme))
            .map_err(|()| refused("set the scheme"))?;
        request
            .set_authority(Some(target.authority))
            .map_err(|()| Error::Request(format!("invalid host `{}`", target.authority)))?;
        request
            .set_path_with_query(Some(target.path_with_query.as_str()))
            .map_err(|()| Error::Request(format!("invalid path `{}`", target.path_with_query)))?;
        // Taken before `handle`, which consumes the request; written after
        // it, while the host sends (its buffer holds one write).
        let body = if has_body {
            Some(request.body().map_err(|()| refused("give the body"))?)
        } else {
            None
        };

        let options = match req.timeout {
            Some(t) => {
                let options = wit::RequestOptions::new();
                let nanos = u64::try_from(t.as_nanos()).unwrap_or(u64::MAX);
                // The host caps these at `http_timeout` whatever they are.
                let _ = options.set_connect_timeout(Some(nanos));
                let _ = options.set_first_byte_timeout(Some(nanos));
                let _ = options.set_between_bytes_timeout(Some(nanos));
                Some(options)
            }
            None => None,
        };
        let pending = outgoing_handler::handle(request, options)?;

        // A request that is refused or fails fails its body writes too; the
        // response future then says why, so write errors only matter if it
        // does not.
        let mut write_error = None;
        if let Some(body) = body {
            if let Ok(stream) = body.write() {
                for chunk in req.body.chunks(WRITE_CHUNK) {
                    if let Err(e) = stream.blocking_write_and_flush(chunk) {
                        write_error = Some(stream_error(e));
                        break;
                    }
                }
            }
            if write_error.is_none() {
                wit::OutgoingBody::finish(body, None)?;
            }
        }

        pending.subscribe().block();
        let response = match pending.get() {
            Some(Ok(Ok(response))) => response,
            Some(Ok(Err(code))) => return Err(code.into()),
            // Taken already, or not ready after `block`: neither can happen.
            Some(Err(())) | None => return Err(refused("give the response")),
        };
        if let Some(e) = write_error {
            return Err(e);
        }
        let status = response.status();
        let headers = {
            let fields = response.headers();
            fields.entries()
        };
        let incoming = response.consume().map_err(|()| refused("give the body"))?;
        let mut data = Vec::new();
        {
            let stream = incoming.stream().map_err(|()| refused("give the body"))?;
            loop {
                match stream.blocking_read(READ_CHUNK) {
                    Ok(bytes) => data.extend_from_slice(&bytes),
                    Err(StreamError::Closed) => break,
                    Err(e) => return Err(stream_error(e)),
                }
            }
        }
        drop(wit::IncomingBody::finish(incoming));
        Ok(Response::new(String::new(), status, headers, data))
    }

    fn stream_error(e: StreamError) -> Error {
        match e {
            StreamError::LastOperationFailed(io) => match wit::http_error_code(&io) {
                Some(code) => Error::Code(code),
                None => Error::Code(wit::ErrorCode::InternalError(Some(io.to_debug_string()))),
            },
            StreamError::Closed => Error::Code(wit::ErrorCode::HttpResponseIncomplete),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(url: &str) -> Target<'_> {
        parse_url(url).unwrap_or_else(|e| panic!("{url}: {e}"))
    }

    #[test]
    fn urls_split_into_scheme_host_and_path() {
        assert_eq!(
            target("https://hooks.example.com/a/b?x=1#frag"),
            Target {
                https: true,
                authority: "hooks.example.com",
                path_with_query: "/a/b?x=1".into()
            }
        );
        let t = target("HTTP://127.0.0.1:8080");
        assert!(!t.https);
        assert_eq!(
            (t.authority, t.path_with_query.as_str()),
            ("127.0.0.1:8080", "/")
        );
        assert_eq!(target("http://h?q=1").path_with_query, "/?q=1");
        assert_eq!(target("http://[::1]:80/x").authority, "[::1]:80");
        assert_eq!(target("http://h#top").path_with_query, "/");
    }

    #[test]
    fn bad_urls_are_refused_before_sending() {
        for (url, why) in [
            ("hooks.example.com/x", "expected http:// or https://"),
            ("ftp://h/x", "scheme `ftp` is not http or https"),
            ("http:///x", "it has no host"),
            ("http://a b/", "the host contains spaces"),
            (
                "http://h/a b",
                "the path contains spaces; percent-encode them",
            ),
        ] {
            assert_eq!(parse_url(url), Err(why.to_string()), "{url}");
            let e = Request::get(url).send().unwrap_err();
            assert_eq!(
                e,
                HttpError::InvalidUrl {
                    url: url.into(),
                    reason: why.into()
                }
            );
            assert!(matches!(Failure::from(e), Failure::Reject(_)));
        }
    }

    #[test]
    fn a_body_that_does_not_serialize_is_reported_by_send() {
        let mut map = std::collections::BTreeMap::new();
        map.insert(vec![1u8], 2); // JSON keys must be strings
        let e = Request::post("http://h/").json(&map).send().unwrap_err();
        assert!(
            matches!(&e, HttpError::InvalidRequest { message, .. } if message.contains("did not serialize")),
            "{e:?}"
        );
    }

    #[test]
    fn json_sets_the_content_type_unless_given() {
        let r = Request::post("http://h/").json(&[1, 2]);
        assert_eq!(r.body, b"[1,2]");
        assert_eq!(
            find(&r.headers, "Content-Type"),
            Some(&b"application/json"[..])
        );
        let r = Request::post("http://h/")
            .header("Content-Type", "application/cloudevents+json")
            .json(&[1]);
        assert_eq!(r.headers.len(), 1);
    }

    #[test]
    fn errors_become_retries_or_rejects() {
        let request = "POST http://h/".to_string();
        let denied = HttpError::Denied {
            request: request.clone(),
        };
        assert_eq!(
            Failure::from(denied),
            Failure::reject(
                "http: POST http://h/: refused, the host is not allowed (not in the plugin's allow_http)"
            )
        );
        let timeout = HttpError::Timeout {
            request: request.clone(),
        };
        assert_eq!(timeout.to_string(), "http: POST http://h/: timed out");
        assert_eq!(Failure::from(timeout), Failure::retry());
        let network = HttpError::Network {
            request: request.clone(),
            message: "ConnectionRefused".into(),
        };
        assert_eq!(Failure::from(network), Failure::retry());
        let status = |status, retry_after| HttpError::Status {
            request: request.clone(),
            status,
            retry_after,
        };
        assert_eq!(Failure::from(status(503, None)), Failure::retry());
        assert_eq!(
            Failure::from(status(429, Some(Duration::from_secs(7)))),
            Failure::retry_after(Duration::from_secs(7))
        );
        assert_eq!(
            Failure::from(status(404, None)),
            Failure::reject("http: POST http://h/: answered 404")
        );
    }

    #[test]
    fn responses_give_status_headers_and_body() {
        let r = Response::new(
            "GET http://h/",
            200,
            vec![
                ("content-type".into(), b"application/json".to_vec()),
                ("x-bin".into(), vec![0xff]),
            ],
            br#"{"rate": 1.5}"#.to_vec(),
        );
        assert!(r.is_success());
        assert_eq!(r.header("Content-Type"), Some("application/json"));
        assert_eq!(r.header("x-bin"), None);
        assert_eq!(r.headers().count(), 2);
        #[derive(serde::Deserialize)]
        struct Rate {
            rate: f64,
        }
        assert_eq!(r.json::<Rate>().unwrap().rate, 1.5);
        assert!(matches!(r.json::<Vec<u8>>(), Err(HttpError::Body { .. })));
        assert_eq!(r.text().unwrap(), r#"{"rate": 1.5}"#);
        assert!(r.clone().error_for_status().is_ok());
    }

    #[test]
    fn error_statuses_carry_retry_after() {
        let r = Response::new(
            "GET http://h/",
            429,
            vec![("retry-after".into(), b"30".to_vec())],
            Vec::new(),
        );
        assert_eq!(
            r.error_for_status(),
            Err(HttpError::Status {
                request: "GET http://h/".into(),
                status: 429,
                retry_after: Some(Duration::from_secs(30)),
            })
        );
        let r = Response::new("GET http://h/", 302, Vec::new(), Vec::new());
        assert!(r.error_for_status().is_ok());
    }
}
