//! The dashboard: server-rendered pages (maud, no JavaScript) on the admin
//! listener, behind the same admin check as `/api`. Routes with their patterns
//! and live counts, recent events with search, an event's timeline (with the
//! events it emitted and the one that caused it), dead letters with a redrive
//! button, plugins with their version, limits and p50/p99.

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use maud::{DOCTYPE, Markup, PreEscaped, html};

use super::admin::{delivery_id, parse_delivery_id};
use super::{ApiError, AppState};
use crate::event::{Event, rfc3339_ms};
use crate::journal::{DeliveryRecord, DeliveryStatus, EventTimeline, RedriveSelect};

/// Events a list page shows, and how many it looks through to fill it.
const PAGE: usize = 50;
const SCAN: usize = 5000;

/// The dashboard's routes (behind the admin check, added by the caller).
pub(super) fn pages() -> Router<AppState> {
    Router::new()
        .route("/", get(overview))
        .route("/ui/events", get(events))
        .route("/ui/events/{id}", get(event))
        .route("/ui/dlq", get(dead_letters))
        .route("/ui/dlq/{id}/redrive", post(redrive))
}

const STYLE: &str = r#"
:root { --fg:#1d2330; --muted:#667085; --line:#e4e7ec; --bg:#f7f8fa; --accent:#3656d3;
        --ok:#157f3b; --warn:#b25e09; --bad:#b42318; }
* { box-sizing: border-box; }
body { margin:0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color:var(--fg); background:var(--bg); }
header { background:#111827; color:#fff; padding:10px 24px; display:flex; gap:24px; align-items:center; }
header b { font-size:16px; letter-spacing:.3px; }
header a { color:#cbd5e1; text-decoration:none; } header a.on, header a:hover { color:#fff; }
main { max-width:1180px; margin:0 auto; padding:20px 24px 48px; }
h1 { font-size:20px; margin:4px 0 16px; } h2 { font-size:16px; margin:28px 0 10px; }
table { width:100%; border-collapse:collapse; background:#fff; border:1px solid var(--line); border-radius:8px; overflow:hidden; }
th, td { text-align:left; padding:8px 12px; border-bottom:1px solid var(--line); vertical-align:top; }
th { background:#f2f4f7; font-weight:600; color:#344054; font-size:12px; text-transform:uppercase; letter-spacing:.4px; }
tr:last-child td { border-bottom:none; }
code, .mono { font: 12.5px/1.4 ui-monospace, SFMono-Regular, Menlo, monospace; }
pre { background:#fff; border:1px solid var(--line); border-radius:8px; padding:12px; overflow:auto; margin:0; }
a { color:var(--accent); }
.muted { color:var(--muted); }
.pill { display:inline-block; padding:1px 8px; border-radius:999px; font-size:12px; font-weight:600; }
.delivered { background:#e7f6ec; color:var(--ok); } .dead { background:#fdecea; color:var(--bad); }
.retrying, .pending { background:#fff4e5; color:var(--warn); }
.num { text-align:right; font-variant-numeric: tabular-nums; }
form.search { display:flex; gap:8px; margin-bottom:14px; }
input[type=text] { flex:1; padding:7px 10px; border:1px solid #d0d5dd; border-radius:6px; font-size:14px; }
button { padding:6px 14px; border-radius:6px; border:1px solid var(--accent); background:var(--accent); color:#fff; font-weight:600; cursor:pointer; }
.card { background:#fff; border:1px solid var(--line); border-radius:8px; padding:14px 16px; }
.grid { display:grid; grid-template-columns: 1fr 1fr; gap:16px; }
ol.timeline { list-style:none; padding:0; margin:0; border-left:2px solid var(--line); }
ol.timeline li { margin:0 0 12px 14px; position:relative; }
ol.timeline li::before { content:""; position:absolute; left:-21px; top:5px; width:10px; height:10px; border-radius:50%; background:var(--line); }
ol.timeline li.ok::before { background:var(--ok); } ol.timeline li.err::before { background:var(--bad); }
.error { color:var(--bad); }
"#;

fn page(title: &str, current: &str, body: Markup) -> Markup {
    let nav = [
        ("/", "Overview"),
        ("/ui/events", "Events"),
        ("/ui/dlq", "Dead letters"),
    ];
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Switchyard" }
                style { (PreEscaped(STYLE)) }
            }
            body {
                header {
                    b { "Switchyard" }
                    @for (href, label) in nav {
                        a href=(href) class=[(current == href).then_some("on")] { (label) }
                    }
                    a href="/metrics" { "Metrics" }
                }
                main { (body) }
            }
        }
    }
}

fn status_pill(status: &str) -> Markup {
    html! { span class={ "pill " (status) } { (status) } }
}

fn delivery_status(d: &DeliveryRecord) -> &'static str {
    match d.status {
        DeliveryStatus::Pending => "pending",
        DeliveryStatus::Retrying => "retrying",
        DeliveryStatus::Delivered => "delivered",
        DeliveryStatus::Dead => "dead",
    }
}

/// An event's overall state: dead if any delivery is, else pending while
/// any is open, else delivered.
fn overall(t: &EventTimeline) -> &'static str {
    let ds = t.deliveries.iter().map(|(_, d)| delivery_status(d));
    let all: Vec<&str> = ds.collect();
    if all.contains(&"dead") {
        "dead"
    } else if all.iter().any(|s| *s == "pending" || *s == "retrying") {
        "pending"
    } else {
        "delivered"
    }
}

fn event_link(id: &str) -> Markup {
    html! { a class="mono" href={ "/ui/events/" (id) } { (id) } }
}

async fn overview(State(state): State<AppState>) -> Markup {
    let live = state.live.load_full();
    let stats = state.backend.deliveries().stats();
    let mut plugins: Vec<_> = live.plugins.values().cloned().collect();
    plugins.sort_by(|a, b| a.name.cmp(&b.name));
    let failure = state.reloader.failure();
    page(
        "Overview",
        "/",
        html! {
            h1 { "Overview" }
            @if let Some(f) = failure {
                div class="card error" {
                    b { "The last reload failed (" (f.at) "); the rules in force are kept:" }
                    pre { @for e in &f.errors { (e) "\n" } }
                }
            }
            h2 { "Routes" }
            table {
                tr { th { "Route" } th { "Match" } th { "To" } th class="num" { "Delivered" } th class="num" { "Retried" } th class="num" { "Dead" } }
                @for r in &live.config.routes.routes {
                    @let c = stats.route(&r.name);
                    tr {
                        td { b { (r.name) } @if let Some(k) = &r.order_key { br; span class="muted" { "order key " code { (k) } } } }
                        td { code { (if r.match_json.is_null() || r.match_json.as_object().is_some_and(|m| m.is_empty()) { "every event".to_string() } else { r.match_json.to_string() }) } }
                        td { (r.to.join(", ")) }
                        td class="num" { (c.delivered) }
                        td class="num" { (c.retried) }
                        td class="num" { @if c.dead > 0 { a href={ "/ui/dlq?route=" (r.name) } { (c.dead) } } @else { "0" } }
                    }
                }
            }
            h2 { "Plugins" }
            table {
                tr { th { "Plugin" } th { "Version (sha256)" } th { "Limits" } th class="num" { "p50" } th class="num" { "p99" } th class="num" { "kv" } }
                @for p in &plugins {
                    @let pct = stats.plugin(&p.name);
                    tr {
                        td { b { (p.name) } @if p.answers_queries { br; a class="muted" href={ "/query/" (p.name) "/" } { "/query/" (p.name) "/…" } } }
                        td class="mono" title=(p.hash) { (p.hash.get(..12).unwrap_or(&p.hash)) "…" }
                        td { "timeout " (humantime::format_duration(p.limits.timeout)) ", memory " (crate::runtime::format_bytes(p.limits.memory))
                             @if let Some(f) = p.limits.fuel { ", fuel " (f) } }
                        td class="num" { @if let Some(x) = pct { (format!("{:.2} ms", x.p50_ms)) } @else { "–" } }
                        td class="num" { @if let Some(x) = pct { (format!("{:.2} ms", x.p99_ms)) } @else { "–" } }
                        td class="num" { (state.backend.store().kv_usage(&p.name).map(|b| format!("{b} B")).unwrap_or_default())
                            " / " (crate::runtime::format_bytes(p.limits.kv_quota)) }
                    }
                }
            }
        },
    )
}

#[derive(serde::Deserialize, Default)]
struct EventsQuery {
    /// An event id, or words that must all appear in the source or type.
    #[serde(default)]
    q: String,
    /// Show events older than this seq.
    before: Option<u64>,
}

fn matches_query(e: &Event, words: &[String]) -> bool {
    words.iter().all(|w| {
        e.source.to_lowercase().contains(w)
            || e.ty.to_lowercase().contains(w)
            || e.subject
                .as_deref()
                .is_some_and(|s| s.to_lowercase().contains(w))
    })
}

async fn events(
    State(state): State<AppState>,
    Query(q): Query<EventsQuery>,
) -> Result<Response, ApiError> {
    let query = q.q.trim().to_string();
    // An exact id goes straight to its timeline.
    if !query.is_empty()
        && state
            .backend
            .store()
            .timeline(&query)
            .await
            .map_err(ApiError::from)?
            .is_some()
    {
        return Ok(Redirect::to(&format!("/ui/events/{query}")).into_response());
    }
    let words: Vec<String> = query
        .to_lowercase()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let list = state
        .backend
        .store()
        .recent(q.before, PAGE, SCAN, &|e| matches_query(e, &words))
        .await
        .map_err(ApiError::from)?;
    let next = (list.len() == PAGE)
        .then(|| list.last().map(|t| t.seq))
        .flatten();
    Ok(page(
        "Events",
        "/ui/events",
        html! {
            h1 { "Recent events" }
            form class="search" method="get" action="/ui/events" {
                input type="text" name="q" value=(query) placeholder="event id, or words in its source, type or subject";
                button type="submit" { "Search" }
            }
            table {
                tr { th { "Accepted" } th { "Id" } th { "Source" } th { "Type" } th { "Deliveries" } th { "Status" } }
                @for t in &list {
                    tr {
                        td class="muted" { (rfc3339_ms(t.accepted_ms)) }
                        td { (event_link(&t.event.id)) }
                        td { (t.event.source) }
                        td { (t.event.ty) }
                        td { (t.deliveries.len()) }
                        td { @if t.deliveries.is_empty() { span class="muted" { "no route" } } @else { (status_pill(overall(t))) } }
                    }
                }
                @if list.is_empty() { tr { td colspan="6" class="muted" { "No events" @if !query.is_empty() { " match " code { (query) } } "." } } }
            }
            @if let Some(seq) = next {
                p { a href={ "/ui/events?before=" (seq) "&q=" (query) } { "Older →" } }
            }
        },
    )
    .into_response())
}

async fn event(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let Some(t) = state
        .backend
        .store()
        .timeline(&id)
        .await
        .map_err(ApiError::from)?
    else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown event",
            format!("no event has id `{id}`"),
        ));
    };
    let e = &t.event;
    let cause = e.extensions.get(crate::runtime::CAUSATION_EXTENSION);
    let data = match serde_json::from_slice::<serde_json::Value>(&e.data) {
        Ok(v) => serde_json::to_string_pretty(&v).unwrap_or_default(),
        Err(_) => format!("{} bytes of {}", e.data.len(), e.datacontenttype),
    };
    Ok(page(
        &format!("Event {id}"),
        "/ui/events",
        html! {
            h1 { "Event " span class="mono" { (e.id) } " " (status_pill(if t.deliveries.is_empty() { "delivered" } else { overall(&t) })) }
            div class="grid" {
                div class="card" {
                    table {
                        tr { th { "source" } td { (e.source) } }
                        tr { th { "type" } td { (e.ty) } }
                        @if let Some(s) = &e.subject { tr { th { "subject" } td { (s) } } }
                        tr { th { "accepted" } td { (rfc3339_ms(t.accepted_ms)) } }
                        @if let Some(c) = cause { tr { th { "caused by" } td { (event_link(c)) } } }
                        @for (k, v) in &e.extensions {
                            @if k != crate::runtime::CAUSATION_EXTENSION { tr { th { (k) } td class="mono" { (v) } } }
                        }
                        @if let Some(d) = &t.dedup { tr { th { "dedup key" } td { code { (d.key) } " (" (d.duplicates) " repeats)" } } }
                    }
                }
                div { pre { (data) } }
            }
            h2 { "Timeline" }
            ol class="timeline" {
                li class="ok" { b { "Received" } " " span class="muted" { (rfc3339_ms(t.accepted_ms)) } }
                @if t.deliveries.is_empty() { li { span class="muted" { "No route matched." } } }
                @for (key, d) in &t.deliveries {
                    li class=[(d.status == DeliveryStatus::Delivered).then_some("ok").or((d.status == DeliveryStatus::Dead).then_some("err"))] {
                        b { "Route " (d.route) " → " (d.plugin) } " " (status_pill(delivery_status(d)))
                        @if d.replay.is_some() { " " span class="pill pending" { "replayed" } }
                        @if d.status == DeliveryStatus::Dead {
                            form method="post" action={ "/ui/dlq/" (delivery_id(*key)) "/redrive" } style="display:inline; margin-left:8px" {
                                button type="submit" data-redrive=(delivery_id(*key)) { "Redrive" }
                            }
                        }
                        table style="margin-top:6px" {
                            tr { th { "#" } th { "At" } th class="num" { "Duration" } th { "Result" } th { "Version" } }
                            @if d.attempts_not_kept > 0 {
                                tr { td colspan="5" class="muted" {
                                    @if d.attempts_not_kept == 1 { "1 earlier attempt is not kept." }
                                    @else { (d.attempts_not_kept) " earlier attempts are not kept." }
                                } }
                            }
                            @for (i, a) in d.attempts.iter().enumerate() {
                                tr {
                                    td { (d.attempts_not_kept + i as u64 + 1) }
                                    td class="muted" { (rfc3339_ms(a.at_ms)) }
                                    td class="num" { (format!("{:.2} ms", a.duration_us as f64 / 1000.0)) }
                                    td {
                                        @match &a.error { Some(err) => span class="error" { (err) }, None => span { "ok" } }
                                        @for child in &a.emitted { br; "emitted " (event_link(child)) }
                                    }
                                    td class="mono" { (a.plugin_hash.as_deref().and_then(|h| h.get(..12)).unwrap_or("–")) }
                                }
                            }
                            @if d.attempts.is_empty() { tr { td colspan="5" class="muted" { "Not attempted yet" @if let Some(due) = d.due_ms { " (due " (rfc3339_ms(due)) ")" } "." } } }
                        }
                    }
                }
            }
        },
    )
    .into_response())
}

#[derive(serde::Deserialize, Default)]
struct DlqQuery {
    route: Option<String>,
}

async fn dead_letters(
    State(state): State<AppState>,
    Query(q): Query<DlqQuery>,
) -> Result<Markup, ApiError> {
    let page_of = state
        .backend
        .store()
        .dead_letters(q.route.as_deref(), None, 200)
        .await
        .map_err(ApiError::from)?;
    Ok(page(
        "Dead letters",
        "/ui/dlq",
        html! {
            h1 { "Dead letters" @if let Some(r) = &q.route { " of route " code { (r) } } }
            table {
                tr { th { "Delivery" } th { "Event" } th { "Route → plugin" } th { "Last error" } th { } }
                @for dl in &page_of.items {
                    tr {
                        td class="mono" { (delivery_id(dl.key)) }
                        td { (event_link(&dl.event.id)) br; span class="muted" { (dl.event.source) " · " (dl.event.ty) } }
                        td { (dl.record.route) " → " (dl.record.plugin) }
                        td class="error" { (dl.record.attempts.last().and_then(|a| a.error.clone()).unwrap_or_default()) }
                        td { form method="post" action={ "/ui/dlq/" (delivery_id(dl.key)) "/redrive" } {
                            button type="submit" data-redrive=(delivery_id(dl.key)) { "Redrive" } } }
                    }
                }
                @if page_of.items.is_empty() { tr { td colspan="5" class="muted" { "No dead letters." } } }
            }
        },
    ))
}

/// The redrive button: redrives one dead letter, then shows its event.
async fn redrive(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let key = parse_delivery_id(&id)?;
    let event_id = state
        .backend
        .store()
        .dead_letter(key)
        .await
        .map_err(ApiError::from)?
        .map(|d| d.event.id.clone());
    state
        .backend
        .deliveries()
        .redrive(RedriveSelect::Keys(vec![key]))
        .await
        .map_err(ApiError::from)?;
    let to = match event_id {
        Some(id) => format!("/ui/events/{id}"),
        None => "/ui/dlq".to_string(),
    };
    Ok(Redirect::to(&to).into_response())
}
