//! Routes: which events go to which plugins.

#[cfg(test)]
mod cases;
pub mod json;
pub mod matcher;
pub mod pattern;
#[cfg(test)]
mod reference;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde_json::Value;

use crate::event::Event;
pub use matcher::Matcher;
pub use pattern::{Pattern, PatternError};

/// How a route retries a delivery that asked to be retried.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub attempts: u32,
    pub backoff: Backoff,
    /// Delay before the second attempt.
    pub initial: Duration,
    /// Longest delay between two attempts.
    pub max: Duration,
    /// No attempt starts later than this after the first one.
    pub max_age: Duration,
}

/// How the delay grows between attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backoff {
    Exponential,
    Fixed,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        // 8 attempts over about an hour: 30 s, 1, 2, 4, 8, 16 and 30 min.
        RetryPolicy {
            attempts: 8,
            backoff: Backoff::Exponential,
            initial: Duration::from_secs(30),
            max: Duration::from_secs(30 * 60),
            max_age: Duration::from_secs(24 * 3600),
        }
    }
}

impl RetryPolicy {
    /// The delay after failed attempt number `attempt` (1-based): exponential
    /// or fixed, capped at `max`, with "equal jitter" (half fixed, half random)
    /// so that retries of many events do not arrive in lockstep.
    pub fn delay_after(&self, attempt: u32) -> Duration {
        let base = match self.backoff {
            Backoff::Fixed => self.initial,
            Backoff::Exponential => {
                let factor = 2u32.saturating_pow(attempt.saturating_sub(1));
                self.initial.saturating_mul(factor)
            }
        }
        .min(self.max);
        let half = base / 2;
        half + half.mul_f64(fastrand::f64())
    }
}

/// One `[[routes]]` entry, compiled.
#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub pattern: Pattern,
    /// The plugins it fans out to.
    pub to: Vec<String>,
    pub retry: RetryPolicy,
    /// See `RawRoute::order_key`: a JSON pointer into the envelope.
    pub order_key: Option<String>,
    /// Deliveries of this route running at once.
    pub concurrency: Option<usize>,
    /// The `match` table as written (for the admin API).
    pub match_json: Value,
}

/// Every route, in file order, and the one matcher compiled from them all.
///
/// Build it with [`RouteTable::new`]; `routes` is not to be changed
/// afterwards (the matcher is compiled from it once, at the latest on the
/// first match).
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    pub routes: Vec<Route>,
    matcher: OnceLock<Arc<Matcher>>,
}

impl RouteTable {
    /// The table of `routes`, with their patterns compiled into one matcher.
    /// Wildcard sets that may make matching slow are logged as warnings (see
    /// [`RouteTable::warnings`]).
    pub fn new(routes: Vec<Route>) -> RouteTable {
        let table = RouteTable {
            routes,
            matcher: OnceLock::new(),
        };
        for w in table.matcher().warnings() {
            tracing::warn!("routes: {w}");
        }
        table
    }

    fn matcher(&self) -> &Matcher {
        self.matcher
            .get_or_init(|| Arc::new(Matcher::new(self.routes.iter().map(|r| &r.pattern))))
    }

    /// Problems measured when compiling the matcher.
    pub fn warnings(&self) -> &[String] {
        self.matcher().warnings()
    }

    /// The routes that match `event`, in file order.
    pub fn matching(&self, event: &Event) -> Vec<&Route> {
        if self.routes.is_empty() {
            return Vec::new();
        }
        self.matcher()
            .matching_event(event)
            .into_iter()
            .filter_map(|i| self.routes.get(i))
            .collect()
    }

    pub fn get(&self, name: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.name == name)
    }

    /// `Ok` if `route` matches `event`; else the first field that failed and
    /// why, e.g. `data.total: 80 is not >= 100`, `data.customer: missing`.
    pub fn explain(&self, route: &Route, event: &Event) -> Result<(), String> {
        explain(&route.pattern, event)
    }
}

/// `Ok` if `pattern` matches `event`; else the first field that failed and why.
pub fn explain(pattern: &Pattern, event: &Event) -> Result<(), String> {
    let mut f = json::Flatten::default();
    json::scan_event(event, 0, &mut f);
    pattern.explain_leaves(&f.leaves)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let p = RetryPolicy {
            attempts: 10,
            backoff: Backoff::Exponential,
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            max_age: Duration::from_secs(3600),
        };
        for _ in 0..50 {
            let d1 = p.delay_after(1);
            assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100));
            let d3 = p.delay_after(3);
            assert!(d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400));
            let d9 = p.delay_after(9);
            assert!(d9 >= Duration::from_millis(500) && d9 <= Duration::from_secs(1));
        }
        let fixed = RetryPolicy {
            backoff: Backoff::Fixed,
            ..p
        };
        assert!(fixed.delay_after(7) <= Duration::from_millis(100));
        // No overflow for absurd attempt numbers.
        assert!(p.delay_after(u32::MAX) <= Duration::from_secs(1));
    }
}
