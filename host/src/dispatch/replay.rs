//! Redrive and replay: deliver again what the journal holds.
//!
//! A redrive makes dead letters pending again (same delivery, fresh retry
//! budget, the plugin as it is now). A replay plans new deliveries of archived
//! events to the routes as they are now, marked `replayed`.

use std::sync::Arc;

use arc_swap::ArcSwap;

use super::{Dispatcher, Work};
use crate::journal::{Journal, JournalError, RedriveSelect, ReplayJob, ReplaySpec};
use crate::server::Live;

/// Events read and planned per journal transaction.
const REPLAY_CHUNK: usize = 256;

/// Why a replay could not start.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("no route named `{0}` is configured")]
    UnknownRoute(String),
    #[error("`until` must be later than `since`")]
    EmptyRange,
    #[error(transparent)]
    Journal(#[from] JournalError),
}

/// Checks a replay's spec against the rules in force; returns them.
pub fn check(live: &Arc<ArcSwap<Live>>, spec: &ReplaySpec) -> Result<Arc<Live>, ReplayError> {
    if spec.until_ms.is_some_and(|u| u <= spec.since_ms) {
        return Err(ReplayError::EmptyRange);
    }
    let live = live.load_full();
    if let Some(r) = &spec.route
        && live.config.routes.get(r).is_none()
    {
        return Err(ReplayError::UnknownRoute(r.clone()));
    }
    Ok(live)
}

/// The deliveries a replay plans for an event: to the routes in force now
/// that match it (only the spec's route, if it names one).
pub fn plan_now(
    live: &Live,
    spec: &ReplaySpec,
    event: &crate::event::Event,
) -> Vec<crate::journal::PlannedDelivery> {
    let routes: Vec<_> = live
        .config
        .routes
        .matching(event)
        .into_iter()
        .filter(|r| spec.route.as_ref().is_none_or(|name| *name == r.name))
        .collect();
    crate::ingress::plan(&routes, event)
}

/// Redrives dead letters; returns how many were.
pub async fn redrive(
    journal: &Journal,
    dispatcher: &Dispatcher,
    select: RedriveSelect,
) -> Result<Vec<crate::journal::DeliveryKey>, JournalError> {
    let due = journal.redrive(select).await?;
    let keys = due.iter().map(|d| d.key).collect();
    dispatcher.enqueue_all(due.into_iter().map(|d| Work::from_due(d, None)).collect());
    Ok(keys)
}

/// Plans and queues a replay; returns it once every delivery is planned
/// (committed), not delivered.
pub async fn replay(
    journal: &Journal,
    dispatcher: &Dispatcher,
    live: &Arc<ArcSwap<Live>>,
    spec: ReplaySpec,
) -> Result<ReplayJob, ReplayError> {
    let live = check(live, &spec)?;
    let mut job = None;
    let mut after = None;
    loop {
        let events = journal.archived(spec.since_ms, spec.until_ms, after, REPLAY_CHUNK)?;
        let Some(last) = events.last() else { break };
        after = Some((last.accepted_ms, last.seq));
        let full = events.len() == REPLAY_CHUNK;
        let items = events
            .iter()
            .filter(|e| spec.source.as_ref().is_none_or(|s| *s == e.event.source))
            .map(|e| (e.seq, plan_now(&live, &spec, &e.event)))
            .filter(|(_, planned)| !planned.is_empty())
            .collect::<Vec<_>>();
        if !items.is_empty() || job.is_none() {
            let (id, due) = journal.plan_replay(job, spec.clone(), items).await?;
            job = Some(id);
            let by_seq: std::collections::HashMap<_, _> =
                events.iter().map(|e| (e.seq, e.event.clone())).collect();
            dispatcher.enqueue_all(
                due.into_iter()
                    .map(|d| {
                        let event = by_seq.get(&d.key.seq).cloned();
                        Work::from_due(d, event)
                    })
                    .collect(),
            );
        }
        if !full {
            break;
        }
    }
    let id = match job {
        Some(id) => id,
        None => journal.plan_replay(None, spec, Vec::new()).await?.0,
    };
    journal
        .replay_job(id)?
        .ok_or_else(|| JournalError::Encoding(format!("replay {id} vanished")).into())
}
