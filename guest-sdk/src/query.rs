//! Answer queries on the plugin's state: the read side of CQRS.
//!
//! `GET /query/<plugin>/<path>?<params>` calls [`Plugin::query`](crate::Plugin::query)
//! in a fresh instance whose [`kv`](crate::kv) is read-only (writes fail) and
//! which cannot [`emit`](crate::emit). Fold events into kv in `handle`; read
//! them back here.
//!
//! ```no_run
//! use switchyard_sdk::query::{Request, Response};
//! use switchyard_sdk::{kv, Event, Failure, Plugin};
//!
//! struct Counter;
//!
//! impl Plugin for Counter {
//!     fn handle(event: Event) -> Result<(), Failure> {
//!         kv::increment(&format!("count/{}", event.ty), 1)?;
//!         Ok(())
//!     }
//!
//!     fn query(request: Request) -> Response {
//!         match request.segments().as_slice() {
//!             ["counts", ty] => match kv::get_json::<u64>(&format!("count/{ty}")) {
//!                 Ok(n) => Response::json(&n.unwrap_or(0)),
//!                 Err(e) => Response::error(503, &e.to_string()),
//!             },
//!             _ => Response::not_found("try /counts/<type>"),
//!         }
//!     }
//! }
//! # switchyard_sdk::export!(Counter);
//! ```

use crate::__bindings::switchyard::plugin::types as wit;
use serde::Serialize;

/// A query: the path after `/query/<plugin>/` and the URL's query parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// E.g. `customers/42` for `GET /query/<plugin>/customers/42`.
    pub path: String,
    /// The decoded `?name=value` pairs, in order.
    pub params: Vec<(String, String)>,
}

impl Request {
    /// The path's non-empty segments: `customers/42` → `["customers", "42"]`.
    pub fn segments(&self) -> Vec<&str> {
        self.path.split('/').filter(|s| !s.is_empty()).collect()
    }

    /// The first value of parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What a query answers, sent as the HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The HTTP status.
    pub status: u16,
    /// The body's media type.
    pub content_type: String,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// 200 with `value` as JSON (500 if it cannot be encoded).
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Response {
        match serde_json::to_vec(value) {
            Ok(body) => Response {
                status: 200,
                content_type: "application/json".into(),
                body,
            },
            Err(e) => Response::error(500, &format!("cannot encode the answer: {e}")),
        }
    }

    /// `status` with `{"error": message}`.
    pub fn error(status: u16, message: &str) -> Response {
        Response {
            status,
            content_type: "application/json".into(),
            body: serde_json::json!({ "error": message })
                .to_string()
                .into_bytes(),
        }
    }

    /// 404 with `{"error": message}`.
    pub fn not_found(message: &str) -> Response {
        Response::error(404, message)
    }

    /// 400 with `{"error": message}`.
    pub fn bad_request(message: &str) -> Response {
        Response::error(400, message)
    }
}

impl From<Response> for wit::Response {
    fn from(r: Response) -> Self {
        wit::Response {
            status: r.status,
            content_type: r.content_type,
            body: r.body,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_and_params() {
        let r = Request {
            path: "/customers//42/".into(),
            params: vec![("limit".into(), "5".into()), ("limit".into(), "9".into())],
        };
        assert_eq!(r.segments(), ["customers", "42"]);
        assert_eq!(r.param("limit"), Some("5"));
        assert_eq!(r.param("x"), None);
    }

    #[test]
    fn responses() {
        assert_eq!(Response::json(&[1]).body, b"[1]");
        let e = Response::not_found("no \"x\"");
        assert_eq!(e.status, 404);
        assert_eq!(e.body, br#"{"error":"no \"x\""}"#);
    }
}
