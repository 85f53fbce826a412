use crate::__bindings::switchyard::plugin::types as wit;
use std::fmt;
use std::time::Duration;

/// Why [`Plugin::handle`](crate::Plugin::handle) did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// A transient problem: deliver the event again later, after the given delay if
    /// any (like HTTP `Retry-After`), else after the route's backoff.
    Retry(Option<Duration>),
    /// The event can never be handled: stop retrying and dead-letter it with this
    /// reason.
    Reject(String),
}

impl Failure {
    /// Deliver the event again after the route's backoff.
    pub fn retry() -> Self {
        Failure::Retry(None)
    }

    /// Deliver the event again, no sooner than `delay` from now.
    pub fn retry_after(delay: Duration) -> Self {
        Failure::Retry(Some(delay))
    }

    /// Give up on the event for good; `reason` is recorded with the dead
    /// letter (its first 256 bytes).
    pub fn reject(reason: impl Into<String>) -> Self {
        Failure::Reject(reason.into())
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Retry(None) => f.write_str("retry later"),
            Failure::Retry(Some(delay)) => write!(f, "retry after {delay:?}"),
            Failure::Reject(reason) => write!(f, "rejected: {reason}"),
        }
    }
}

impl std::error::Error for Failure {}

impl From<Failure> for wit::Failure {
    fn from(failure: Failure) -> Self {
        match failure {
            Failure::Retry(delay) => {
                wit::Failure::Retry(delay.map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)))
            }
            Failure::Reject(reason) => wit::Failure::Reject(reason),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_to_wit_with_nanoseconds() {
        let wit: wit::Failure = Failure::retry_after(Duration::from_millis(1500)).into();
        assert!(matches!(wit, wit::Failure::Retry(Some(1_500_000_000))));
        let wit: wit::Failure = Failure::retry().into();
        assert!(matches!(wit, wit::Failure::Retry(None)));
        let wit: wit::Failure = Failure::reject("nope").into();
        assert!(matches!(wit, wit::Failure::Reject(r) if r == "nope"));
    }

    #[test]
    fn huge_delays_saturate() {
        let wit: wit::Failure = Failure::retry_after(Duration::MAX).into();
        assert!(matches!(wit, wit::Failure::Retry(Some(u64::MAX))));
    }

    #[test]
    fn displays() {
        assert_eq!(Failure::retry().to_string(), "retry later");
        assert_eq!(
            Failure::retry_after(Duration::from_secs(2)).to_string(),
            "retry after 2s"
        );
        assert_eq!(Failure::reject("bad").to_string(), "rejected: bad");
    }
}
