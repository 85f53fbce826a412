use crate::__bindings::switchyard::plugin::types as wit;
use crate::Failure;
use serde::de::DeserializeOwned;
use std::fmt;

/// One event, as the router stored it: a [CloudEvents 1.0] envelope.
///
/// [CloudEvents 1.0]: https://github.com/cloudevents/spec/blob/v1.0.2/cloudevents/spec.md
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Event {
    /// Unique per source, and the same on every retry, redelivery and replay of the
    /// event: use it to process each event once.
    pub id: String,
    /// The name of the source (webhook) the event arrived on.
    pub source: String,
    /// The event type (CloudEvents `type`), e.g. `order.created`.
    pub ty: String,
    /// The CloudEvents `subject`, if the producer set one.
    pub subject: Option<String>,
    /// When the router accepted the event (RFC 3339, UTC).
    pub time: String,
    /// The media type of [`data`](Self::data), e.g. `application/json`.
    pub datacontenttype: String,
    /// The payload, byte for byte as it was accepted.
    pub data: Vec<u8>,
    /// CloudEvents extension attributes as (name, value) pairs, e.g. `replayed`.
    pub extensions: Vec<(String, String)>,
}

impl Event {
    /// Deserializes [`data`](Self::data) as JSON into `T`.
    ///
    /// The error converts into [`Failure::Reject`], naming `T` and what was wrong, so
    /// `let order: Order = event.data_as()?;` rejects malformed events.
    pub fn data_as<T: DeserializeOwned>(&self) -> Result<T, DataError> {
        serde_json::from_slice(&self.data).map_err(|source| DataError {
            target: std::any::type_name::<T>(),
            datacontenttype: self.datacontenttype.clone(),
            source,
        })
    }

    /// Which attempt at this delivery this is: 1 the first time, 2 on the first
    /// retry, ... (counted again from 1 after a redrive from the dead letters).
    /// The host sets it as the `deliveryattempt` extension attribute.
    pub fn attempt(&self) -> u32 {
        self.extension("deliveryattempt")
            .and_then(|a| a.parse().ok())
            .unwrap_or(1)
    }

    /// Whether this delivery comes from a replay of archived events
    /// (`switchyard replay`): the `replayed` extension attribute.
    pub fn is_replay(&self) -> bool {
        self.extension("replayed") == Some("true")
    }

    /// The value of the extension attribute `name` (e.g. `replayed`), if present.
    pub fn extension(&self, name: &str) -> Option<&str> {
        self.extensions
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

impl From<wit::Event> for Event {
    fn from(e: wit::Event) -> Self {
        Event {
            id: e.id,
            source: e.source,
            ty: e.type_,
            subject: e.subject,
            time: e.time,
            datacontenttype: e.datacontenttype,
            data: e.data,
            extensions: e.extensions,
        }
    }
}

/// The event's data could not be deserialized by [`Event::data_as`].
///
/// Converts into [`Failure::Reject`]: an event whose payload does not fit will not
/// fit on a retry either.
#[derive(Debug)]
pub struct DataError {
    target: &'static str,
    datacontenttype: String,
    source: serde_json::Error,
}

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "event data is not a valid {}: {}",
            self.target, self.source
        )?;
        let ct = self.datacontenttype.to_ascii_lowercase();
        if !ct.is_empty() && !ct.contains("json") {
            write!(f, " (datacontenttype is {:?})", self.datacontenttype)?;
        }
        Ok(())
    }
}

impl std::error::Error for DataError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

impl From<DataError> for Failure {
    fn from(e: DataError) -> Self {
        Failure::reject(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    struct Order {
        total: f64,
    }

    fn event(data: &str) -> Event {
        Event {
            ty: "order.created".into(),
            datacontenttype: "application/json".into(),
            data: data.as_bytes().to_vec(),
            extensions: vec![("replayed".into(), "true".into())],
            ..Event::default()
        }
    }

    #[test]
    fn data_as_deserializes_json() {
        assert_eq!(
            event(r#"{"total": 12.5}"#).data_as::<Order>().unwrap(),
            Order { total: 12.5 }
        );
    }

    #[test]
    fn data_error_becomes_a_reject_naming_the_problem() {
        let err = event(r#"{"sum": 1}"#).data_as::<Order>().unwrap_err();
        let Failure::Reject(reason) = Failure::from(err) else {
            panic!("expected a reject");
        };
        assert!(reason.contains("Order"), "{reason}");
        assert!(reason.contains("missing field `total`"), "{reason}");
    }

    #[test]
    fn data_error_mentions_a_non_json_content_type() {
        let mut e = event("hello");
        e.datacontenttype = "text/plain".into();
        let msg = e.data_as::<Order>().unwrap_err().to_string();
        assert!(msg.contains("text/plain"), "{msg}");
    }

    #[test]
    fn extension_lookup() {
        let e = event("{}");
        assert_eq!(e.extension("replayed"), Some("true"));
        assert_eq!(e.extension("missing"), None);
    }

    #[test]
    fn converts_from_wit() {
        let e: Event = wit::Event {
            id: "1".into(),
            source: "shop".into(),
            type_: "order.created".into(),
            subject: Some("s".into()),
            time: "2024-01-01T00:00:00Z".into(),
            datacontenttype: "application/json".into(),
            data: b"{}".to_vec(),
            extensions: vec![("a".into(), "b".into())],
        }
        .into();
        assert_eq!(e.ty, "order.created");
        assert_eq!(e.subject.as_deref(), Some("s"));
        assert_eq!(e.extension("a"), Some("b"));
    }
}
