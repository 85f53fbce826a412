//! Publish derived events back into the router (event chaining).
//!
//! An emitted event is routed by `rules.toml` like a webhook event. Its
//! `source` is `plugin/<this plugin's name>`, its `causationid` extension names
//! the event being handled, and its `hops` extension counts the emits since the
//! webhook event. It is stored only if the current delivery succeeds, in the
//! same commit as its acknowledgement: no emit without the ack, no ack without
//! the emit. A chain longer than the router's `max_hops` (default 8), or more
//! than 100 emits from one delivery, fails the delivery into the dead letters.
//!
//! ```no_run
//! # fn demo() -> Result<(), switchyard_sdk::Failure> {
//! use switchyard_sdk::emit;
//!
//! #[derive(serde::Serialize)]
//! struct Shipped { order: String }
//!
//! let id = emit::json("order.shipped", &Shipped { order: "o-1".into() })?;
//! emit::Emit::new("customer.notified").subject("c-7").json(&"sent")?.send()?;
//! # let _ = id;
//! # Ok(()) }
//! ```

use crate::__bindings::switchyard::plugin::emit as wit;
use crate::Failure;
use serde::Serialize;
use std::fmt;

/// Most events one delivery may emit; one more fails the delivery into the
/// dead letters.
pub const MAX_EMITS_PER_DELIVERY: usize = 100;
/// Longest event type, bytes (it must not be empty either).
pub const MAX_TYPE_LEN: usize = 256;
/// Longest subject, bytes.
pub const MAX_SUBJECT_LEN: usize = 1024;
/// Largest `data`, bytes.
pub const MAX_DATA_LEN: usize = 1 << 20;
/// What one emitted event counts towards
/// [`MAX_OUTPUT_PER_DELIVERY`](crate::MAX_OUTPUT_PER_DELIVERY) beyond its
/// data, type and subject (its id, source, time, extensions and delivery
/// records, roughly).
pub const EMIT_OVERHEAD: usize = 256;

/// Why an emit failed.
///
/// Converts into a [`Failure`] that rejects the event: neither kind gets
/// better on retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmitError {
    /// The event is malformed (empty type, data too large or not JSON).
    Invalid(String),
    /// A limit was hit (hops from the webhook event, emits per delivery). The
    /// delivery is dead-lettered whatever `handle` returns.
    Limit(String),
}

impl fmt::Display for EmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EmitError::Invalid(m) => write!(f, "emit: {m}"),
            EmitError::Limit(m) => write!(f, "emit: {m}"),
        }
    }
}

impl std::error::Error for EmitError {}

impl From<wit::Error> for EmitError {
    fn from(e: wit::Error) -> Self {
        match e {
            wit::Error::Invalid(m) => EmitError::Invalid(m),
            wit::Error::Limit(m) => EmitError::Limit(m),
        }
    }
}

impl From<EmitError> for Failure {
    fn from(e: EmitError) -> Self {
        Failure::reject(e.to_string())
    }
}

/// Emits an event of type `ty` whose data is `data` as JSON; returns its id.
pub fn json<T: Serialize + ?Sized>(ty: &str, data: &T) -> Result<String, EmitError> {
    Emit::new(ty).json(data)?.send()
}

/// An event to emit, built step by step.
#[derive(Debug, Clone)]
pub struct Emit {
    ty: String,
    subject: Option<String>,
    datacontenttype: Option<String>,
    data: Vec<u8>,
}

impl Emit {
    /// An event of type `ty` with no data yet (`null` until set).
    pub fn new(ty: &str) -> Emit {
        Emit {
            ty: ty.to_string(),
            subject: None,
            datacontenttype: None,
            data: b"null".to_vec(),
        }
    }

    /// Sets the event's `subject`.
    pub fn subject(mut self, subject: &str) -> Emit {
        self.subject = Some(subject.to_string());
        self
    }

    /// Sets `data` to `value` as JSON (`application/json`).
    pub fn json<T: Serialize + ?Sized>(mut self, value: &T) -> Result<Emit, EmitError> {
        self.data = serde_json::to_vec(value)
            .map_err(|e| EmitError::Invalid(format!("cannot encode the data as JSON: {e}")))?;
        self.datacontenttype = None;
        Ok(self)
    }

    /// Sets `data` to raw bytes of the given media type.
    pub fn bytes(mut self, content_type: &str, data: Vec<u8>) -> Emit {
        self.data = data;
        self.datacontenttype = Some(content_type.to_string());
        self
    }

    /// Emits it; returns the id it will have.
    pub fn send(self) -> Result<String, EmitError> {
        #[cfg(not(target_arch = "wasm32"))]
        return crate::native("emit::send", |h| {
            h.emit(self.ty, self.subject, self.datacontenttype, self.data)
        });
        #[cfg(target_arch = "wasm32")]
        Ok(wit::emit(&wit::NewEvent {
            type_: self.ty,
            subject: self.subject,
            datacontenttype: self.datacontenttype,
            data: self.data,
        })?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_reject() {
        let f = Failure::from(EmitError::from(wit::Error::Limit("8 hops".into())));
        assert_eq!(f, Failure::reject("emit: 8 hops"));
    }

    #[test]
    fn builder_sets_fields() {
        let e = Emit::new("t").subject("s").json(&[1, 2]).unwrap();
        assert_eq!(e.data, b"[1,2]");
        assert_eq!(e.subject.as_deref(), Some("s"));
        let e = e.bytes("text/plain", b"hi".to_vec());
        assert_eq!(e.datacontenttype.as_deref(), Some("text/plain"));
    }
}
