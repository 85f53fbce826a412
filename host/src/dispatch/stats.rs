//! Live delivery figures for the dashboard: outcomes per route since start,
//! and recent durations per plugin (for p50/p99). Prometheus has the same as
//! counters and histograms; this keeps them readable in-process.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

/// Durations kept per plugin for its percentiles.
const SAMPLES: usize = 1024;

/// Outcomes of a route's deliveries since the server started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RouteCounts {
    pub delivered: u64,
    pub retried: u64,
    pub dead: u64,
}

/// A plugin's recent delivery durations.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Percentiles {
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// How many recent deliveries they are computed over.
    pub samples: usize,
}

#[derive(Default)]
struct Inner {
    routes: HashMap<String, RouteCounts>,
    plugins: HashMap<String, VecDeque<u64>>,
}

/// Shared by the dispatcher (writes) and the dashboard (reads).
#[derive(Default)]
pub struct FlowStats {
    inner: Mutex<Inner>,
}

impl FlowStats {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a committed outcome: "delivered", "retry" or "dead".
    pub fn outcome(&self, route: &str, outcome: &str) {
        let mut inner = self.lock();
        // Look up before inserting: no allocation per delivery once known.
        if !inner.routes.contains_key(route) {
            inner
                .routes
                .insert(route.to_string(), RouteCounts::default());
        }
        let Some(c) = inner.routes.get_mut(route) else {
            return;
        };
        match outcome {
            "delivered" => c.delivered += 1,
            "retry" => c.retried += 1,
            _ => c.dead += 1,
        }
    }

    /// Records how long a delivery to `plugin` took.
    pub fn duration(&self, plugin: &str, d: Duration) {
        let mut inner = self.lock();
        if !inner.plugins.contains_key(plugin) {
            inner
                .plugins
                .insert(plugin.to_string(), VecDeque::with_capacity(SAMPLES));
        }
        let Some(ring) = inner.plugins.get_mut(plugin) else {
            return;
        };
        if ring.len() == SAMPLES {
            ring.pop_front();
        }
        ring.push_back(d.as_micros() as u64);
    }

    pub fn route(&self, route: &str) -> RouteCounts {
        self.lock().routes.get(route).copied().unwrap_or_default()
    }

    /// p50 and p99 of the plugin's last deliveries, if it had any.
    pub fn plugin(&self, plugin: &str) -> Option<Percentiles> {
        let inner = self.lock();
        let ring = inner.plugins.get(plugin).filter(|r| !r.is_empty())?;
        let mut v: Vec<u64> = ring.iter().copied().collect();
        v.sort_unstable();
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0;
        Some(Percentiles {
            p50_ms: at(0.5),
            p99_ms: at(0.99),
            samples: v.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_percentiles() {
        let s = FlowStats::default();
        s.outcome("r", "delivered");
        s.outcome("r", "retry");
        s.outcome("r", "dead");
        s.outcome("r", "delivered");
        assert_eq!(
            s.route("r"),
            RouteCounts {
                delivered: 2,
                retried: 1,
                dead: 1
            }
        );
        assert_eq!(s.route("other"), RouteCounts::default());
        for ms in 1..=100 {
            s.duration("p", Duration::from_millis(ms));
        }
        let p = s.plugin("p").unwrap();
        assert_eq!((p.p50_ms, p.p99_ms, p.samples), (51.0, 99.0, 100));
        assert!(s.plugin("q").is_none());
        for _ in 0..2000 {
            s.duration("p", Duration::from_millis(1));
        }
        assert_eq!(s.plugin("p").unwrap().samples, SAMPLES, "bounded");
    }
}
