//! The NATS JetStream backend: several hosts share one set of streams.
//!
//! - **Events**: stream `<STREAM>`, one message per accepted event on
//!   `<prefix>.events.<source>` (an [`Envelope`]: the event and the
//!   deliveries its routes planned at acceptance). Ingest dedup is
//!   JetStream's: the idempotency key is the `Nats-Msg-Id`, and the stream's
//!   duplicate window is the longest of the sources' windows. A 202 is
//!   answered only once the server acknowledged the publish.
//! - **Deliveries**: every (route, plugin) is a durable pull consumer on the
//!   stream shared by all hosts (see `dispatch::nats`); a redrive or replay
//!   publishes the event again on `<prefix>.deliver.<route>` naming the one
//!   delivery it is for.
//! - **Delivery records** (attempts, status; what timelines show): kv bucket
//!   `<STREAM>_records`, one entry per event, updated with compare-and-set.
//! - **Dead letters**: stream `<STREAM>_DLQ` on `<prefix>.dlq.<route>`, each
//!   with the event, route, plugin, plugin hash and every attempt.
//! - **Plugin kv**: one kv bucket per plugin, `<STREAM>_kv_<plugin>`; a
//!   delivery's writes commit key by key with compare-and-set on the revision
//!   it read (see [`NatsJournal::commit_kv`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{
    Appended, Attempt, DeadLetter, DeadLetterPage, DedupInfo, DedupKey, DeliveryKey,
    DeliveryRecord, DeliveryStatus, EventFilter, EventStore, EventTimeline, JournalError,
    KvChanges, KvStore, PlannedDelivery, ReplayJob, ReplaySpec, Seq,
};
use crate::config::NatsConfig;
use crate::event::{Event, now_ms};

/// How long a request to the NATS server may take before the engine counts
/// as unavailable.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Compare-and-set rounds on one delivery record before giving up.
const RECORD_CAS_ROUNDS: usize = 64;
/// Envelope encoding version (first byte of each message payload).
const ENVELOPE_V1: u8 = 1;
/// Dead-letter encoding version (first byte; earlier letters are JSON).
const DEAD_V1: u8 = 1;
/// How old a plugin's cached kv usage may be (see `kv_usage_async`).
const USAGE_MAX_AGE: Duration = Duration::from_millis(500);
/// Delivery keys per stored chunk of a replay job.
const REPLAY_CHUNK: usize = 10_000;
/// Largest kv value a bucket accepts (the host's own limit is lower).
const KV_MAX_VALUE: i32 = 1 << 20;

/// One delivery an envelope asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvelopeDelivery {
    /// Its index among the deliveries planned for the event.
    pub idx: u32,
    pub route: String,
    pub plugin: String,
    #[serde(default)]
    pub order_key: Option<String>,
}

/// What a message of the events stream holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    pub event: Event,
    pub accepted_ms: u64,
    /// The deliveries this message is for: every planned one for a new event;
    /// the one redriven or replayed otherwise.
    pub deliveries: Vec<EnvelopeDelivery>,
    /// The event's own sequence, when this message is a redrive or replay
    /// (else the message's sequence is the event's).
    #[serde(default)]
    pub event_seq: Option<Seq>,
    /// The replay that published it.
    #[serde(default)]
    pub replay: Option<u64>,
    #[serde(default)]
    pub dedup_key: Option<String>,
}

impl Envelope {
    pub fn encode(&self) -> Result<Bytes, JournalError> {
        let mut out = vec![ENVELOPE_V1];
        rmp_serde::encode::write_named(&mut out, self).map_err(encoding)?;
        Ok(Bytes::from(out))
    }

    pub fn decode(bytes: &[u8]) -> Result<Envelope, JournalError> {
        match bytes.split_first() {
            Some((&ENVELOPE_V1, rest)) => rmp_serde::from_slice(rest).map_err(encoding),
            _ => Err(JournalError::Encoding(
                "not a switchyard event envelope".into(),
            )),
        }
    }
}

/// The record of one event (`ev.<hash>`): where it is, and how many
/// delivery indices it has (planned, then added by replays).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct EventRecord {
    seq: Seq,
    accepted_ms: u64,
    #[serde(default)]
    dedup: Option<DedupInfo>,
    deliveries: u32,
}

/// The record of one delivery (`ev.<hash>.<idx>`): written by the one host
/// its message is with, so its first attempt is a plain create.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct DeliveryEntry {
    record: DeliveryRecord,
    /// Its message in the dead-letter stream, while it is dead.
    #[serde(default)]
    dead_letter: Option<u64>,
}

/// A dead letter as the dead-letter stream holds it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct DeadMessage {
    event: Event,
    accepted_ms: u64,
    event_seq: Seq,
    idx: u32,
    record: DeliveryRecord,
    /// The event's data is not in the letter (with its record it did not fit
    /// a message): readers take it from the event stream, at `event_seq`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    data_elided: bool,
}

impl DeadMessage {
    /// MessagePack after a version byte, as envelopes are: the data stays
    /// bytes (JSON wrote each byte as a number, up to four times the size).
    fn encode(&self) -> Result<Vec<u8>, JournalError> {
        let mut out = vec![DEAD_V1];
        rmp_serde::encode::write_named(&mut out, self).map_err(encoding)?;
        Ok(out)
    }

    fn decode(bytes: &[u8]) -> Result<DeadMessage, JournalError> {
        match bytes.split_first() {
            Some((&DEAD_V1, rest)) => rmp_serde::from_slice(rest).map_err(encoding),
            // Letters stored by earlier versions are JSON objects.
            Some((b'{', _)) => serde_json::from_slice(bytes).map_err(encoding),
            _ => Err(encoding("a dead letter in an unknown encoding")),
        }
    }
}

/// The NATS JetStream engine (cheap to clone).
#[derive(Clone)]
pub struct NatsJournal {
    inner: Arc<Inner>,
}

struct Inner {
    client: async_nats::Client,
    js: jetstream::Context,
    name: String,
    prefix: String,
    replicas: usize,
    events: stream::Stream,
    dlq: stream::Stream,
    records: kv::Store,
    buckets: Mutex<HashMap<String, kv::Store>>,
    /// Each plugin's kv usage (bytes) and when it was read: quota checks run
    /// on every delivery that writes, and a bucket's size is a stream-info
    /// request to the server.
    usage: Mutex<HashMap<String, (std::time::Instant, u64)>>,
}

/// What a kv message carries besides its value (the bucket's own headers,
/// such as the expected revision of a compare-and-set), at most, for the
/// size check against `max_payload`.
const KV_OVERHEAD: usize = 512;

/// The bytes of a message's header block that count against the server's
/// `max_payload` with the payload (the subject does not): none without a
/// message id, else `NATS/1.0`, the `Nats-Msg-Id` line and the blank line.
/// A dedup key may be long (a header or a JSON pointer's value), so this is
/// counted, not estimated.
fn headers_len(msg_id: Option<&str>) -> usize {
    msg_id.map_or(0, |id| {
        "NATS/1.0\r\n".len() + "Nats-Msg-Id: ".len() + id.len() + "\r\n\r\n".len()
    })
}

/// A dead letter encoded within `room` bytes. An event near the size limit,
/// with its record, may not fit one message: it fitted alone, and the event
/// stream keeps it, so the letter leaves its data there first. Should the
/// rest still not fit (attributes near the limit beside a long record), the
/// oldest attempts go, counted in `attempts_not_kept`. Were the publish
/// refused, the delivery would run again and again.
fn fit_letter(msg: &mut DeadMessage, room: usize) -> Result<Vec<u8>, JournalError> {
    let mut bytes = msg.encode()?;
    if bytes.len() > room && !msg.data_elided {
        tracing::debug!(event_id = %msg.event.id, seq = msg.event_seq, "the dead letter leaves the event's data in the event stream");
        msg.event.data = Vec::new();
        msg.data_elided = true;
        bytes = msg.encode()?;
    }
    while bytes.len() > room && msg.record.attempts.len() > 1 {
        let drop = msg.record.attempts.len() / 2;
        tracing::debug!(event_id = %msg.event.id, drop, "the dead letter keeps only its later attempts");
        msg.record.attempts.drain(..drop);
        msg.record.attempts_not_kept += drop as u64;
        bytes = msg.encode()?;
    }
    if bytes.len() > room {
        return Err(JournalError::TooLarge {
            bytes: bytes.len(),
            limit: room,
        });
    }
    Ok(bytes)
}

fn unavailable(e: impl std::fmt::Display) -> JournalError {
    JournalError::Unavailable(e.to_string())
}

fn encoding(e: impl std::fmt::Display) -> JournalError {
    JournalError::Encoding(e.to_string())
}

/// A subject token for a name: anything but letters, digits, `_` and `-`
/// becomes `_` (subjects split on dots; the name itself is in the payload).
pub fn token(name: &str) -> String {
    let t: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if t.is_empty() { "_".into() } else { t }
}

/// A kv key NATS accepts for any plugin key: bytes outside `[A-Za-z0-9_-/]`
/// are written `=XX`. Prefix-preserving, so listing by prefix still works.
fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'/' {
            out.push(b as char);
        } else {
            out.push_str(&format!("={b:02X}"));
        }
    }
    out
}

fn decode_key(key: &str) -> Option<String> {
    let bytes = key.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'=' {
            let hex = key.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A kv value with its expiry (Unix ms, 0: never): JetStream 2.9 has no
/// per-key TTL, so expiry is checked on read and swept by `expire_kv`.
fn encode_value(value: &[u8], expires_ms: Option<u64>) -> Bytes {
    let mut out = Vec::with_capacity(8 + value.len());
    out.extend_from_slice(&expires_ms.unwrap_or(0).to_be_bytes());
    out.extend_from_slice(value);
    Bytes::from(out)
}

/// The value, if it has not expired at `now`.
fn live_value(stored: &[u8], now: u64) -> Option<Vec<u8>> {
    let (exp, value) = stored.split_at_checked(8)?;
    let exp = u64::from_be_bytes(exp.try_into().ok()?);
    (exp == 0 || exp > now).then(|| value.to_vec())
}

fn record_key(id: &str) -> String {
    let digest = Sha256::digest(id.as_bytes());
    format!("ev.{}", hex::encode(&digest[..16]))
}

fn delivery_key(id: &str, idx: u32) -> String {
    format!("{}.{idx}", record_key(id))
}

/// Runs a future on the runtime from synchronous code that runs on a runtime
/// worker (plugin host calls): the worker is handed off while it waits.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

/// Connects to the NATS server(s) of `config` (credentials from
/// `SWITCHYARD_NATS_TOKEN`, or `SWITCHYARD_NATS_USER` and
/// `SWITCHYARD_NATS_PASSWORD`).
async fn connect_client(
    config: &NatsConfig,
    name: &str,
) -> Result<async_nats::Client, JournalError> {
    let mut options = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(REQUEST_TIMEOUT)
        .request_timeout(Some(REQUEST_TIMEOUT))
        // Keep trying for ever after a disconnect: the host answers 503
        // meanwhile and recovers by itself.
        .max_reconnects(None)
        .event_callback(|e| async move {
            match e {
                async_nats::Event::Disconnected => tracing::warn!("NATS connection lost"),
                async_nats::Event::Connected => tracing::info!("NATS connected"),
                other => tracing::debug!(event = %other, "NATS"),
            }
        });
    if let Ok(token) = std::env::var("SWITCHYARD_NATS_TOKEN") {
        options = options.token(token);
    } else if let (Ok(user), Ok(password)) = (
        std::env::var("SWITCHYARD_NATS_USER"),
        std::env::var("SWITCHYARD_NATS_PASSWORD"),
    ) {
        options = options.user_and_password(user, password);
    }
    let servers: Vec<&str> = config.url.split(',').map(str::trim).collect();
    options.connect(servers).await.map_err(|e| {
        JournalError::Unavailable(format!("cannot connect to NATS at {}: {e}", config.url))
    })
}

/// What the streams are sized by.
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    /// How long events stay (replay window).
    pub retention: Duration,
    /// The dedup window (the longest of the sources').
    pub dedup_window: Duration,
}

impl NatsJournal {
    /// Connects (credentials from `SWITCHYARD_NATS_TOKEN`, or
    /// `SWITCHYARD_NATS_USER` and `SWITCHYARD_NATS_PASSWORD`) and creates or
    /// updates the streams and the records bucket.
    pub async fn connect(
        config: &NatsConfig,
        limits: StreamLimits,
    ) -> Result<NatsJournal, JournalError> {
        let client = connect_client(config, "switchyard").await?;
        let js = jetstream::ContextBuilder::new()
            .timeout(REQUEST_TIMEOUT)
            .build(client.clone());
        let prefix = config.stream.to_lowercase();
        // JetStream wants the duplicate window within the stream's max age.
        let dedup_window = limits.dedup_window.min(limits.retention);
        let events = js
            .create_or_update_stream(stream::Config {
                name: config.stream.clone(),
                description: Some("switchyard: accepted events".into()),
                subjects: vec![format!("{prefix}.events.>"), format!("{prefix}.deliver.>")],
                storage: stream::StorageType::File,
                num_replicas: config.replicas,
                max_age: limits.retention,
                duplicate_window: dedup_window,
                ..Default::default()
            })
            .await
            .map_err(|e| unavailable(format!("cannot create stream {}: {e}", config.stream)))?;
        let _ = events;
        let events = js
            .get_stream(&config.stream)
            .await
            .map_err(|e| unavailable(format!("cannot open stream {}: {e}", config.stream)))?;
        let dlq_name = format!("{}_DLQ", config.stream);
        js.create_or_update_stream(stream::Config {
            name: dlq_name.clone(),
            description: Some("switchyard: dead letters".into()),
            subjects: vec![format!("{prefix}.dlq.>")],
            storage: stream::StorageType::File,
            num_replicas: config.replicas,
            ..Default::default()
        })
        .await
        .map_err(|e| unavailable(format!("cannot create stream {dlq_name}: {e}")))?;
        let dlq = js
            .get_stream(&dlq_name)
            .await
            .map_err(|e| unavailable(format!("cannot open stream {dlq_name}: {e}")))?;
        let records = bucket(
            &js,
            &format!("{}_records", config.stream),
            config.replicas,
            limits.retention,
        )
        .await?;
        Ok(NatsJournal {
            inner: Arc::new(Inner {
                client,
                js,
                name: config.stream.clone(),
                prefix,
                replicas: config.replicas,
                events,
                dlq,
                records,
                buckets: Mutex::new(HashMap::new()),
                usage: Mutex::new(HashMap::new()),
            }),
        })
    }

    pub fn context(&self) -> &jetstream::Context {
        &self.inner.js
    }

    /// The events stream's name.
    pub fn stream_name(&self) -> &str {
        &self.inner.name
    }

    /// The subject an event from `source` is published on.
    pub fn event_subject(&self, source: &str) -> String {
        format!("{}.events.{}", self.inner.prefix, token(source))
    }

    fn deliver_subject(&self, route: &str) -> String {
        format!("{}.deliver.{}", self.inner.prefix, token(route))
    }

    /// Refuses a message over the server's `max_payload` (1 MiB unless its
    /// config says otherwise) before it is sent: the server would refuse it
    /// every time, and a retry could never succeed.
    fn check_size(&self, bytes: usize) -> Result<(), JournalError> {
        // The client keeps the limit the server announced (an atomic read).
        let limit = self.inner.client.max_payload();
        if bytes > limit {
            return Err(JournalError::TooLarge { bytes, limit });
        }
        Ok(())
    }

    /// An envelope's payload, if it fits a message with the header that
    /// carries `msg_id`.
    fn encode_checked(
        &self,
        envelope: &Envelope,
        msg_id: Option<&str>,
    ) -> Result<Bytes, JournalError> {
        let payload = envelope.encode()?;
        self.check_size(payload.len() + headers_len(msg_id))?;
        Ok(payload)
    }

    /// Publishes an envelope and waits for the server's acknowledgement.
    async fn publish(
        &self,
        subject: String,
        envelope: &Envelope,
        msg_id: Option<&str>,
    ) -> Result<jetstream::publish::PublishAck, JournalError> {
        let payload = self.encode_checked(envelope, msg_id)?;
        self.publish_payload(subject, payload, msg_id).await
    }

    /// Publishes an encoded envelope and waits for the acknowledgement.
    async fn publish_payload(
        &self,
        subject: String,
        payload: Bytes,
        msg_id: Option<&str>,
    ) -> Result<jetstream::publish::PublishAck, JournalError> {
        let mut publish = jetstream::message::PublishMessage::build().payload(payload);
        if let Some(id) = msg_id {
            publish = publish.message_id(id);
        }
        let ack = self
            .inner
            .js
            .send_publish(subject, publish)
            .await
            .map_err(unavailable)?;
        ack.await.map_err(unavailable)
    }

    /// An envelope by its stream sequence.
    pub async fn envelope(&self, seq: Seq) -> Result<Option<Envelope>, JournalError> {
        match self.inner.events.get_raw_message(seq).await {
            Ok(m) => Ok(Some(Envelope::decode(&m.payload)?)),
            Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// The payloads of the events a delivery emitted, once each is known to
    /// fit a message: checked before the delivery's kv writes commit, so a
    /// result the server cannot take writes nothing.
    pub fn encode_emitted(
        &self,
        emitted: &[(Envelope, String)],
    ) -> Result<Vec<Bytes>, JournalError> {
        emitted
            .iter()
            .map(|(env, msg_id)| self.encode_checked(env, Some(msg_id)))
            .collect()
    }

    /// Publishes events a delivery emitted (with the deliveries planned for
    /// them), with their payloads from [`Self::encode_emitted`]. `msg_ids`
    /// make a re-run of the same delivery (after a crash before its ack)
    /// publish nothing new within the dedup window.
    pub async fn publish_emitted(
        &self,
        emitted: &[(Envelope, String)],
        payloads: Vec<Bytes>,
    ) -> Result<Vec<Seq>, JournalError> {
        let mut out = Vec::with_capacity(emitted.len());
        for ((env, msg_id), payload) in emitted.iter().zip(payloads) {
            let ack = self
                .publish_payload(self.event_subject(&env.event.source), payload, Some(msg_id))
                .await?;
            if !ack.duplicate {
                self.create_record(&env.event.id, ack.sequence, env).await;
            }
            out.push(ack.sequence);
        }
        Ok(out)
    }

    /// Writes the first record of an event (best effort: consumers create it
    /// too when it is missing).
    async fn create_record(&self, id: &str, seq: Seq, env: &Envelope) {
        let record = EventRecord {
            seq,
            accepted_ms: env.accepted_ms,
            dedup: env.dedup_key.as_ref().map(|k| DedupInfo {
                key: k.clone(),
                duplicates: 0,
                last_duplicate_ms: None,
            }),
            deliveries: env.deliveries.len() as u32,
        };
        let Ok(bytes) = serde_json::to_vec(&record) else {
            return;
        };
        if let Err(e) = self
            .inner
            .records
            .create(record_key(id), Bytes::from(bytes))
            .await
            && e.kind() != kv::CreateErrorKind::AlreadyExists
        {
            tracing::warn!(event_id = %id, error = %e, "cannot write the event's record");
        }
    }

    /// A JSON value of the records bucket and its revision (0: absent, or
    /// deleted).
    async fn read_json<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<(Option<T>, u64), JournalError> {
        match self.inner.records.entry(key).await.map_err(unavailable)? {
            Some(e) if e.operation == kv::Operation::Put => Ok((
                Some(serde_json::from_slice(&e.value).map_err(encoding)?),
                e.revision,
            )),
            Some(e) => Ok((None, e.revision)),
            None => Ok((None, 0)),
        }
    }

    /// Changes a JSON value of the records bucket with compare-and-set,
    /// reading it again while other hosts change it meanwhile. `init` is the
    /// value to change when there is none.
    async fn update_json<T: Serialize + serde::de::DeserializeOwned>(
        &self,
        key: &str,
        init: impl Fn() -> T,
        change: impl Fn(&mut T),
    ) -> Result<(), JournalError> {
        for _ in 0..RECORD_CAS_ROUNDS {
            let (value, revision) = self.read_json::<T>(key).await?;
            let mut value = value.unwrap_or_else(&init);
            change(&mut value);
            let bytes = serde_json::to_vec(&value).map_err(encoding)?;
            match self
                .inner
                .records
                .update(key, Bytes::from(bytes), revision)
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(unavailable(e)),
            }
        }
        Err(JournalError::CommitFailed(format!(
            "record {key} kept changing under {RECORD_CAS_ROUNDS} updates"
        )))
    }

    /// Changes an event's record (several hosts count its duplicates and
    /// add replayed deliveries).
    async fn update_record(
        &self,
        id: &str,
        seq: Seq,
        accepted_ms: u64,
        change: impl Fn(&mut EventRecord),
    ) -> Result<(), JournalError> {
        let init = || EventRecord {
            seq,
            accepted_ms,
            ..EventRecord::default()
        };
        self.update_json(&record_key(id), init, change).await
    }

    /// Changes a delivery's record. With `first` (the first run of the
    /// event's own message), it cannot exist yet: one create, no read; if it
    /// does after all, the compare-and-set path takes over.
    async fn update_delivery(
        &self,
        id: &str,
        idx: u32,
        first: bool,
        init: impl Fn() -> DeliveryRecord,
        change: impl Fn(&mut DeliveryEntry),
    ) -> Result<(), JournalError> {
        let key = delivery_key(id, idx);
        let init = || DeliveryEntry {
            record: init(),
            dead_letter: None,
        };
        if first {
            let mut entry = init();
            change(&mut entry);
            let bytes = serde_json::to_vec(&entry).map_err(encoding)?;
            match self.inner.records.create(&key, Bytes::from(bytes)).await {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
                Err(e) => return Err(unavailable(e)),
            }
        }
        self.update_json(&key, init, change).await
    }

    /// A delivery's record.
    async fn delivery_entry(&self, key: &str) -> Result<Option<DeliveryEntry>, JournalError> {
        Ok(self.read_json(key).await?.0)
    }

    /// Records an attempt at a delivery and where it stands now. `first`:
    /// this is the first run of the event's own message (not a redelivery,
    /// redrive or replay).
    #[allow(clippy::too_many_arguments)]
    pub async fn record_attempt(
        &self,
        env: &Envelope,
        seq: Seq,
        delivery: &EnvelopeDelivery,
        first: bool,
        attempt: Attempt,
        status: DeliveryStatus,
        due_ms: Option<u64>,
        dead_letter: Option<u64>,
    ) -> Result<(), JournalError> {
        // The accepting host writes the event's record before its 202, but
        // may have failed to (NATS went away just after the publish) or died:
        // the first run of the first delivery makes sure it is there, beside
        // its own write, so timelines find every event.
        let ensure_head = async {
            if first && delivery.idx == 0 {
                self.create_record(&env.event.id, seq, env).await;
            }
        };
        let (_, result) = tokio::join!(
            ensure_head,
            self.update_delivery(
                &env.event.id,
                delivery.idx,
                first,
                || new_record(delivery, env.accepted_ms),
                |e| {
                    let d = &mut e.record;
                    // A consumer that stopped before its ack reports the
                    // same attempt again.
                    if !d.attempts.contains(&attempt) {
                        d.add_attempt(&attempt);
                    }
                    // A run whose message another host settled meanwhile (it
                    // was redelivered while NATS was away) may report late.
                    // It joins the history, but only a success or a new
                    // replay moves a final delivery: a late failure would
                    // leave it "retrying" with no message left to retry it.
                    let reopens = env.replay.is_some() && env.replay != d.replay;
                    if d.status.is_final() && status != DeliveryStatus::Delivered && !reopens {
                        tracing::debug!(event_id = %env.event.id, idx = delivery.idx, "a late run's failure does not reopen a settled delivery");
                        return;
                    }
                    d.status = status;
                    d.due_ms = due_ms;
                    if env.replay.is_some() {
                        d.replay = env.replay;
                    }
                    e.dead_letter = dead_letter;
                },
            )
        );
        result
    }

    /// Moves a delivery to the dead letters, with its record.
    pub async fn publish_dead_letter(
        &self,
        env: &Envelope,
        seq: Seq,
        delivery: &EnvelopeDelivery,
        record: DeliveryRecord,
    ) -> Result<u64, JournalError> {
        let mut msg = DeadMessage {
            event: env.event.clone(),
            accepted_ms: env.accepted_ms,
            event_seq: seq,
            idx: delivery.idx,
            record,
            data_elided: false,
        };
        let subject = format!("{}.dlq.{}", self.inner.prefix, token(&delivery.route));
        // The id makes a re-run (a crash between this and the ack) store it
        // once.
        let msg_id = format!("dead:{seq}:{}:{}", delivery.idx, msg.record.attempts_made());
        let room = self
            .inner
            .client
            .max_payload()
            .saturating_sub(headers_len(Some(&msg_id)));
        let bytes = fit_letter(&mut msg, room)?;
        let publish = jetstream::message::PublishMessage::build()
            .payload(Bytes::from(bytes))
            .message_id(msg_id);
        let ack = self
            .inner
            .js
            .send_publish(subject, publish)
            .await
            .map_err(unavailable)?
            .await
            .map_err(unavailable)?;
        Ok(ack.sequence)
    }

    /// The record of a delivery (for the attempts a dead letter keeps).
    pub async fn delivery_record(
        &self,
        id: &str,
        idx: u32,
    ) -> Result<Option<DeliveryRecord>, JournalError> {
        Ok(self
            .delivery_entry(&delivery_key(id, idx))
            .await?
            .map(|e| e.record))
    }

    async fn record(&self, id: &str) -> Result<Option<EventRecord>, JournalError> {
        Ok(self.read_json(&record_key(id)).await?.0)
    }

    /// Publishes dead letters again for their route, with a fresh retry
    /// budget, and removes them from the dead letters. Returns the deliveries
    /// redriven.
    pub async fn redrive(
        &self,
        select: super::RedriveSelect,
    ) -> Result<Vec<DeliveryKey>, JournalError> {
        let mut letters: Vec<(u64, DeadMessage)> = Vec::new();
        match select {
            super::RedriveSelect::Keys(keys) => {
                for key in keys {
                    if let Some(found) = self.dead_message(key).await? {
                        letters.push(found);
                    }
                }
            }
            super::RedriveSelect::Route(route) => {
                let mut after = 0;
                loop {
                    let page = self.dead_page(route.as_deref(), after, 256).await?;
                    if page.is_empty() {
                        break;
                    }
                    after = page.last().map_or(after, |(s, _)| *s);
                    letters.extend(page);
                }
            }
        }
        let mut out = Vec::new();
        let now = now_ms();
        for (dlq_seq, msg) in letters {
            if msg.data_elided {
                // Redriven without its data it would be another event. It
                // stays listed (shown without it); the others go on.
                tracing::warn!(
                    event_id = %msg.event.id,
                    dlq_seq,
                    "not redriven: the dead letter keeps no data (it did not fit one message with its record), and the event has left the event stream"
                );
                continue;
            }
            let delivery = EnvelopeDelivery {
                idx: msg.idx,
                route: msg.record.route.clone(),
                plugin: msg.record.plugin.clone(),
                order_key: msg.record.order_key.clone(),
            };
            let env = Envelope {
                event: msg.event,
                accepted_ms: msg.accepted_ms,
                deliveries: vec![delivery.clone()],
                event_seq: Some(msg.event_seq),
                replay: None,
                dedup_key: None,
            };
            // The record says pending before the message exists: a consumer
            // may run it and record "delivered" at once, which an update
            // made after the publish would turn back into "pending".
            let dead = msg.record.clone();
            self.update_delivery(
                &env.event.id,
                delivery.idx,
                false,
                || dead.clone(),
                |e| {
                    e.record.status = DeliveryStatus::Pending;
                    e.record.due_ms = Some(now);
                    e.record.redriven_ms.push(now);
                    e.dead_letter = None;
                },
            )
            .await?;
            if let Err(e) = self
                .publish(
                    self.deliver_subject(&delivery.route),
                    &env,
                    Some(&format!("redrive:{dlq_seq}")),
                )
                .await
            {
                // Not redriven: the dead letter is still in its stream, and
                // its record says so again (at worst it stays "pending" with
                // the letter listed, and a second redrive publishes it).
                let undone = self
                    .update_delivery(
                        &env.event.id,
                        delivery.idx,
                        false,
                        || dead.clone(),
                        |e| {
                            e.record.status = DeliveryStatus::Dead;
                            e.record.due_ms = None;
                            if e.record.redriven_ms.last() == Some(&now) {
                                e.record.redriven_ms.pop();
                            }
                            e.dead_letter = Some(dlq_seq);
                        },
                    )
                    .await;
                if let Err(undo) = undone {
                    tracing::warn!(error = %undo, dlq_seq, "a redrive failed, and its record still says pending");
                }
                return Err(e);
            }
            if let Err(e) = self.inner.dlq.delete_message(dlq_seq).await {
                tracing::warn!(error = %e, dlq_seq, "redriven, but cannot remove the dead letter");
            }
            out.push(DeliveryKey {
                seq: msg.event_seq,
                idx: msg.idx,
            });
        }
        Ok(out)
    }

    /// Replays archived events: reads the events stream from `since`, plans
    /// deliveries with `plan` (the routes in force now), records them on the
    /// events' records, and publishes one message per delivery, marked with
    /// the replay. Returns the job once every delivery is published.
    pub async fn replay(
        &self,
        spec: ReplaySpec,
        plan: impl Fn(&Event) -> Vec<PlannedDelivery>,
    ) -> Result<ReplayJob, JournalError> {
        use futures_util::StreamExt;
        let created_ms = now_ms();
        let id = self.new_replay_id(&spec, created_ms).await?;
        let info = self.inner.events.get_info().await.map_err(unavailable)?;
        let last = info.state.last_sequence;
        let mut job = ReplayJob {
            id,
            spec: spec.clone(),
            created_ms,
            events: 0,
            deliveries: Vec::new(),
        };
        if last > 0 {
            let start = time::OffsetDateTime::from_unix_timestamp_nanos(
                i128::from(spec.since_ms) * 1_000_000,
            )
            .map_err(encoding)?;
            // An ephemeral consumer reads the stream by time; acknowledgements
            // are not needed, the sequence says when it is done.
            let reader = self
                .inner
                .events
                .create_consumer(consumer::pull::Config {
                    deliver_policy: consumer::DeliverPolicy::ByStartTime { start_time: start },
                    ack_policy: consumer::AckPolicy::None,
                    filter_subject: format!("{}.events.>", self.inner.prefix),
                    inactive_threshold: Duration::from_secs(60),
                    ..Default::default()
                })
                .await
                .map_err(unavailable)?;
            let mut messages = reader
                .stream()
                .max_messages_per_batch(256)
                .messages()
                .await
                .map_err(unavailable)?;
            loop {
                let next = tokio::time::timeout(REQUEST_TIMEOUT, messages.next()).await;
                let msg = match next {
                    // Nothing newer than the last message there was at the start.
                    Err(_) | Ok(None) => break,
                    Ok(Some(m)) => m.map_err(unavailable)?,
                };
                let seq = msg.info().map_err(unavailable)?.stream_sequence;
                let env = Envelope::decode(&msg.payload)?;
                let past_until = spec.until_ms.is_some_and(|u| env.accepted_ms >= u);
                if seq > last || past_until {
                    break;
                }
                if env.accepted_ms < spec.since_ms
                    || spec.source.as_ref().is_some_and(|s| *s != env.event.source)
                {
                    continue;
                }
                let planned = plan(&env.event);
                if planned.is_empty() {
                    continue;
                }
                // Reserve delivery indices on the event's record, then write
                // each new delivery's record before its message.
                let base = std::sync::Mutex::new(0u32);
                let planned_count = env.deliveries.len() as u32;
                self.update_record(&env.event.id, seq, env.accepted_ms, |r| {
                    let from = r.deliveries.max(planned_count);
                    r.deliveries = from + planned.len() as u32;
                    if let Ok(mut b) = base.lock() {
                        *b = from;
                    }
                })
                .await?;
                let base = base.into_inner().unwrap_or_default();
                let taken: Vec<EnvelopeDelivery> = planned
                    .iter()
                    .enumerate()
                    .map(|(i, p)| EnvelopeDelivery {
                        idx: base + i as u32,
                        route: p.route.clone(),
                        plugin: p.plugin.clone(),
                        order_key: p.order_key.clone(),
                    })
                    .collect();
                for d in &taken {
                    let mut rec = new_record(d, created_ms);
                    rec.replay = Some(id);
                    self.update_delivery(&env.event.id, d.idx, true, || rec.clone(), |_| {})
                        .await?;
                }
                for d in taken {
                    let out = Envelope {
                        event: env.event.clone(),
                        accepted_ms: env.accepted_ms,
                        deliveries: vec![d.clone()],
                        event_seq: Some(seq),
                        replay: Some(id),
                        dedup_key: None,
                    };
                    self.publish(
                        self.deliver_subject(&d.route),
                        &out,
                        Some(&format!("replay:{id}:{seq}:{}", d.idx)),
                    )
                    .await?;
                    job.deliveries.push(DeliveryKey { seq, idx: d.idx });
                }
                job.events += 1;
            }
            let _ = self
                .inner
                .events
                .delete_consumer(&reader.cached_info().name)
                .await;
        }
        self.store_replay(&job).await?;
        Ok(job)
    }

    /// Reserves a replay id (Unix ms, made unique among the hosts).
    async fn new_replay_id(&self, spec: &ReplaySpec, now: u64) -> Result<u64, JournalError> {
        let mut id = now;
        loop {
            let job = ReplayJob {
                id,
                spec: spec.clone(),
                created_ms: now,
                events: 0,
                deliveries: Vec::new(),
            };
            let bytes = serde_json::to_vec(&job).map_err(encoding)?;
            match self
                .inner
                .records
                .create(format!("replay.{id}"), Bytes::from(bytes))
                .await
            {
                Ok(_) => return Ok(id),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => id += 1,
                Err(e) => return Err(unavailable(e)),
            }
        }
    }

    /// Stores a replay job: its deliveries in chunks (a kv value is at most
    /// 1 MiB).
    async fn store_replay(&self, job: &ReplayJob) -> Result<(), JournalError> {
        let chunks: Vec<&[DeliveryKey]> = job.deliveries.chunks(REPLAY_CHUNK).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let bytes = serde_json::to_vec(chunk).map_err(encoding)?;
            self.inner
                .records
                .put(format!("replay.{}.{i}", job.id), Bytes::from(bytes))
                .await
                .map_err(unavailable)?;
        }
        let head = ReplayJob {
            deliveries: Vec::new(),
            ..job.clone()
        };
        let mut value = serde_json::to_value(&head).map_err(encoding)?;
        value["chunks"] = chunks.len().into();
        let bytes = serde_json::to_vec(&value).map_err(encoding)?;
        self.inner
            .records
            .put(format!("replay.{}", job.id), Bytes::from(bytes))
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// A replay and the deliveries it planned.
    pub async fn replay_job(&self, id: u64) -> Result<Option<ReplayJob>, JournalError> {
        let Some(head) = self
            .inner
            .records
            .get(format!("replay.{id}"))
            .await
            .map_err(unavailable)?
        else {
            return Ok(None);
        };
        let value: serde_json::Value = serde_json::from_slice(&head).map_err(encoding)?;
        let chunks = value["chunks"].as_u64().unwrap_or(0);
        let mut job: ReplayJob = serde_json::from_value(value).map_err(encoding)?;
        for i in 0..chunks {
            if let Some(c) = self
                .inner
                .records
                .get(format!("replay.{id}.{i}"))
                .await
                .map_err(unavailable)?
            {
                let keys: Vec<DeliveryKey> = serde_json::from_slice(&c).map_err(encoding)?;
                job.deliveries.extend(keys);
            }
        }
        Ok(Some(job))
    }

    /// The record of one delivery, by its key.
    pub async fn delivery(&self, key: DeliveryKey) -> Result<Option<DeliveryRecord>, JournalError> {
        let Some(env) = self.envelope(key.seq).await? else {
            return Ok(None);
        };
        self.delivery_record(&env.event.id, key.idx).await
    }

    /// The dead-letter message of a delivery, by its key.
    async fn dead_message(
        &self,
        key: DeliveryKey,
    ) -> Result<Option<(u64, DeadMessage)>, JournalError> {
        let Some(env) = self.envelope(key.seq).await? else {
            // The event has left the events stream (retention) and its letter
            // stays: without the event's id there is no record to point at
            // it, so the letters are walked, oldest first. Only letters
            // older than the retention take this way; an id past the
            // stream's end names nothing, and costs no walk.
            let last = self
                .inner
                .events
                .get_info()
                .await
                .map_err(unavailable)?
                .state
                .last_sequence;
            if key.seq > last {
                return Ok(None);
            }
            return self.dead_message_by_walk(key).await;
        };
        let entry = self
            .delivery_entry(&delivery_key(&env.event.id, key.idx))
            .await?;
        let Some(dlq_seq) = entry.and_then(|e| e.dead_letter) else {
            return Ok(None);
        };
        match self.inner.dlq.get_raw_message(dlq_seq).await {
            Ok(m) => Ok(Some((
                dlq_seq,
                self.whole(DeadMessage::decode(&m.payload)?).await?,
            ))),
            Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// The dead letter of a delivery, found by reading every letter.
    async fn dead_message_by_walk(
        &self,
        key: DeliveryKey,
    ) -> Result<Option<(u64, DeadMessage)>, JournalError> {
        let mut after = 0;
        loop {
            let page = self.dead_page(None, after, 256).await?;
            let Some(last) = page.last().map(|(seq, _)| *seq) else {
                return Ok(None);
            };
            if let Some(found) = page
                .into_iter()
                .find(|(_, m)| m.event_seq == key.seq && m.idx == key.idx)
            {
                return Ok(Some(found));
            }
            after = last;
        }
    }

    /// A dead letter with its event's data, taken back from the event stream
    /// if the letter left it out. If the event has left the stream too
    /// (retention), the letter stays without it, `data_elided` set.
    async fn whole(&self, mut msg: DeadMessage) -> Result<DeadMessage, JournalError> {
        if msg.data_elided
            && let Some(env) = self.envelope(msg.event_seq).await?
        {
            msg.event.data = env.event.data;
            msg.data_elided = false;
        }
        Ok(msg)
    }

    /// Dead-letter messages after the dead-letter stream's sequence `after`.
    async fn dead_page(
        &self,
        route: Option<&str>,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, DeadMessage)>, JournalError> {
        let subject = match route {
            Some(r) => format!("{}.dlq.{}", self.inner.prefix, token(r)),
            None => format!("{}.dlq.>", self.inner.prefix),
        };
        let mut out = Vec::new();
        let mut next = after + 1;
        while out.len() < limit {
            let m = match self
                .inner
                .dlq
                .raw_message_builder()
                .sequence(next)
                .next_by_subject(subject.clone())
                .send()
                .await
            {
                Ok(m) => m,
                Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => break,
                Err(e) => return Err(unavailable(e)),
            };
            next = m.sequence + 1;
            let msg = DeadMessage::decode(&m.payload)?;
            if route.is_some_and(|r| r != msg.record.route) {
                continue;
            }
            out.push((m.sequence, self.whole(msg).await?));
        }
        Ok(out)
    }

    /// The kv bucket of a plugin, created on first use.
    async fn plugin_bucket(&self, plugin: &str) -> Result<kv::Store, JournalError> {
        if let Some(b) = self
            .inner
            .buckets
            .lock()
            .map_err(|_| JournalError::CommitFailed("kv bucket map poisoned".into()))?
            .get(plugin)
        {
            return Ok(b.clone());
        }
        let name = format!("{}_kv_{}", self.inner.name, token(plugin));
        let store = bucket(&self.inner.js, &name, self.inner.replicas, Duration::ZERO).await?;
        if let Ok(mut map) = self.inner.buckets.lock() {
            map.insert(plugin.to_string(), store.clone());
        }
        Ok(store)
    }

    /// Commits a successful delivery's kv writes: a key it read with
    /// compare-and-set against the revision current when its read value is
    /// checked, a key it only wrote as is. `Ok(false)`: a key the delivery read has changed since (run it
    /// again); writes already made are values the re-run will read.
    pub async fn commit_kv(&self, plugin: &str, kv: &KvChanges) -> Result<bool, JournalError> {
        if kv.writes.is_empty() {
            return Ok(true);
        }
        // Checked before anything is written: JetStream kv has no
        // transaction to undo the writes before a refused one.
        for w in &kv.writes {
            if let Some(v) = &w.value {
                self.check_size(8 + v.len() + w.key.len() + KV_OVERHEAD)?;
            }
        }
        let bucket = self.plugin_bucket(plugin).await?;
        let now = now_ms();
        let reads: HashMap<&str, &Option<Vec<u8>>> =
            kv.reads.iter().map(|(k, v)| (k.as_str(), v)).collect();
        // Keys only read must still hold what the delivery saw (its writes
        // may derive from them); checked first, though not atomically with
        // the writes (JetStream kv has no multi-key transaction).
        let written: std::collections::HashSet<&str> =
            kv.writes.iter().map(|w| w.key.as_str()).collect();
        for (key, seen) in &kv.reads {
            if written.contains(key.as_str()) {
                continue;
            }
            let current = bucket
                .get(encode_key(key))
                .await
                .map_err(unavailable)?
                .and_then(|v| live_value(&v, now));
            if current != *seen {
                return Ok(false);
            }
        }
        for w in &kv.writes {
            let key = encode_key(&w.key);
            let Some(seen) = reads.get(w.key.as_str()) else {
                // A blind write (the delivery did not read the key): the last
                // one wins, as on the embedded engine; nothing to check.
                match &w.value {
                    Some(v) => {
                        bucket
                            .put(&key, encode_value(v, w.expires_ms))
                            .await
                            .map_err(unavailable)?;
                    }
                    None => bucket.delete(&key).await.map_err(unavailable)?,
                }
                continue;
            };
            let entry = bucket.entry(&key).await.map_err(unavailable)?;
            let (current, revision) = match &entry {
                Some(e) if e.operation == kv::Operation::Put => {
                    (live_value(&e.value, now), e.revision)
                }
                Some(e) => (None, e.revision),
                None => (None, 0),
            };
            if **seen != current {
                return Ok(false);
            }
            let result = match &w.value {
                Some(v) => bucket
                    .update(&key, encode_value(v, w.expires_ms), revision)
                    .await
                    .map(|_| ())
                    .map_err(|e| {
                        (
                            e.kind() == kv::UpdateErrorKind::WrongLastRevision,
                            e.to_string(),
                        )
                    }),
                None if entry.is_none() => Ok(()),
                None => bucket
                    .delete_expect_revision(&key, Some(revision))
                    .await
                    .map_err(|e| (e.to_string().contains("wrong last sequence"), e.to_string())),
            };
            match result {
                Ok(()) => {}
                Err((true, _)) => return Ok(false),
                Err((false, e)) => return Err(unavailable(e)),
            }
        }
        Ok(true)
    }

    /// Deletes expired kv entries of a plugin (at most `limit`).
    pub async fn expire_kv(&self, plugin: &str, limit: usize) -> Result<usize, JournalError> {
        use futures_util::StreamExt;
        let bucket = self.plugin_bucket(plugin).await?;
        let now = now_ms();
        let mut keys = bucket.keys().await.map_err(unavailable)?;
        let mut expired = Vec::new();
        while let Some(k) = keys.next().await {
            let k = k.map_err(unavailable)?;
            if let Some(e) = bucket.entry(&k).await.map_err(unavailable)?
                && e.operation == kv::Operation::Put
                && live_value(&e.value, now).is_none()
            {
                expired.push((k, e.revision));
                if expired.len() >= limit {
                    break;
                }
            }
        }
        let n = expired.len();
        for (k, rev) in expired {
            // A write since the check wins over the sweep.
            let _ = bucket.purge_expect_revision(&k, Some(rev)).await;
        }
        Ok(n)
    }

    async fn kv_get_async(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>, JournalError> {
        let bucket = self.plugin_bucket(plugin).await?;
        let value = bucket.get(encode_key(key)).await.map_err(unavailable)?;
        Ok(value.and_then(|v| live_value(&v, now_ms())))
    }

    async fn kv_list_async(
        &self,
        plugin: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, JournalError> {
        use futures_util::StreamExt;
        let bucket = self.plugin_bucket(plugin).await?;
        let mut keys = bucket.keys().await.map_err(unavailable)?;
        let mut all = Vec::new();
        while let Some(k) = keys.next().await {
            let k = k.map_err(unavailable)?;
            if let Some(key) = decode_key(&k)
                && key.starts_with(prefix)
                && after.is_none_or(|a| key.as_str() > a)
            {
                all.push(key);
            }
        }
        all.sort_unstable();
        let now = now_ms();
        let mut out = Vec::new();
        for key in all {
            if out.len() >= limit {
                break;
            }
            if let Some(v) = bucket.get(encode_key(&key)).await.map_err(unavailable)?
                && live_value(&v, now).is_some()
            {
                out.push(key);
            }
        }
        Ok(out)
    }

    /// A plugin's kv usage, at most `USAGE_MAX_AGE` old: the quota is
    /// enforced as on the embedded engine, give or take what that much time
    /// of writes adds.
    async fn kv_usage_async(&self, plugin: &str) -> Result<u64, JournalError> {
        if let Ok(cache) = self.inner.usage.lock()
            && let Some((at, bytes)) = cache.get(plugin)
            && at.elapsed() < USAGE_MAX_AGE
        {
            return Ok(*bytes);
        }
        let bucket = self.plugin_bucket(plugin).await?;
        let status = bucket.status().await.map_err(unavailable)?;
        let bytes = status.info.state.bytes;
        if let Ok(mut cache) = self.inner.usage.lock() {
            cache.insert(plugin.to_string(), (std::time::Instant::now(), bytes));
        }
        Ok(bytes)
    }

    async fn timeline_from(
        &self,
        env: Envelope,
        seq: Seq,
        record: Option<EventRecord>,
    ) -> Result<EventTimeline, JournalError> {
        // The planned deliveries, then those replays added (in the record's
        // count only); one not attempted yet has no record of its own.
        let count = record
            .as_ref()
            .map_or(0, |r| r.deliveries)
            .max(env.deliveries.len() as u32);
        let mut deliveries = Vec::with_capacity(count as usize);
        for idx in 0..count {
            let own = self
                .delivery_entry(&delivery_key(&env.event.id, idx))
                .await?
                .map(|e| e.record);
            let planned = env.deliveries.iter().find(|d| d.idx == idx);
            let rec = match (own, planned) {
                (Some(r), _) => r,
                (None, Some(d)) => new_record(d, env.accepted_ms),
                (None, None) => continue,
            };
            deliveries.push((DeliveryKey { seq, idx }, rec));
        }
        Ok(EventTimeline {
            seq,
            accepted_ms: env.accepted_ms,
            dedup: record.and_then(|r| r.dedup),
            event: Arc::new(env.event),
            deliveries,
        })
    }
}

fn new_record(d: &EnvelopeDelivery, accepted_ms: u64) -> DeliveryRecord {
    DeliveryRecord {
        route: d.route.clone(),
        plugin: d.plugin.clone(),
        status: DeliveryStatus::Pending,
        attempts: Vec::new(),
        due_ms: Some(accepted_ms),
        created_ms: accepted_ms,
        order_key: d.order_key.clone(),
        replay: None,
        redriven_ms: Vec::new(),
        attempts_not_kept: 0,
    }
}

async fn bucket(
    js: &jetstream::Context,
    name: &str,
    replicas: usize,
    max_age: Duration,
) -> Result<kv::Store, JournalError> {
    if let Ok(b) = js.get_key_value(name).await {
        return Ok(b);
    }
    // The stream a kv bucket is, created directly: the client's
    // `create_key_value` first asks for account info in a form NATS 2.9 does
    // not answer. These are the settings it would use.
    let created = js
        .create_stream(stream::Config {
            name: format!("KV_{name}"),
            description: Some("switchyard kv".into()),
            subjects: vec![format!("$KV.{name}.>")],
            max_messages_per_subject: 1,
            max_age,
            max_message_size: KV_MAX_VALUE,
            storage: stream::StorageType::File,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            num_replicas: replicas,
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        })
        .await;
    if let Err(e) = created {
        // Another host may have created it meanwhile.
        tracing::debug!(bucket = name, error = %e, "create kv bucket");
    }
    js.get_key_value(name)
        .await
        .map_err(|e| unavailable(format!("cannot open kv bucket {name}: {e}")))
}

impl KvStore for NatsJournal {
    fn kv_get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>, JournalError> {
        block_on(self.kv_get_async(plugin, key))
    }

    fn kv_list(
        &self,
        plugin: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, JournalError> {
        block_on(self.kv_list_async(plugin, prefix, after, limit))
    }

    fn kv_usage(&self, plugin: &str) -> Result<u64, JournalError> {
        block_on(self.kv_usage_async(plugin))
    }
}

#[async_trait::async_trait]
impl EventStore for NatsJournal {
    async fn append(
        &self,
        event: Arc<Event>,
        accepted_ms: u64,
        deliveries: Vec<PlannedDelivery>,
        dedup: Option<DedupKey>,
    ) -> Result<Appended, JournalError> {
        let env = Envelope {
            event: (*event).clone(),
            accepted_ms,
            deliveries: deliveries
                .into_iter()
                .enumerate()
                .map(|(i, d)| EnvelopeDelivery {
                    idx: i as u32,
                    route: d.route,
                    plugin: d.plugin,
                    order_key: d.order_key,
                })
                .collect(),
            event_seq: None,
            replay: None,
            dedup_key: dedup.as_ref().map(|d| d.key.clone()),
        };
        // While disconnected, say so at once: the client would queue the
        // publish, and a 503 after a timeout may still be stored later.
        if self.inner.client.connection_state() != async_nats::connection::State::Connected {
            return Err(JournalError::Unavailable(
                "not connected to NATS; retry shortly".into(),
            ));
        }
        let msg_id = dedup.as_ref().map(|d| format!("{}:{}", d.source, d.key));
        let ack = self
            .publish(self.event_subject(&event.source), &env, msg_id.as_deref())
            .await?;
        if ack.duplicate {
            let first = self
                .envelope(ack.sequence)
                .await?
                .ok_or_else(|| unavailable("the first event of a duplicate is gone"))?;
            let now = now_ms();
            let (id, seq, at) = (first.event.id.clone(), ack.sequence, first.accepted_ms);
            if let Err(e) = self
                .update_record(&id, seq, at, |r| {
                    if let Some(d) = r.dedup.as_mut() {
                        d.duplicates += 1;
                        d.last_duplicate_ms = Some(now);
                    }
                })
                .await
            {
                tracing::warn!(error = %e, "cannot count a duplicate");
            }
            return Ok(Appended::Duplicate { id });
        }
        self.create_record(&event.id, ack.sequence, &env).await;
        Ok(Appended::New(ack.sequence))
    }

    async fn timeline(&self, id: &str) -> Result<Option<EventTimeline>, JournalError> {
        let Some(record) = self.record(id).await? else {
            return Ok(None);
        };
        let seq = record.seq;
        let Some(env) = self.envelope(seq).await? else {
            return Ok(None);
        };
        Ok(Some(self.timeline_from(env, seq, Some(record)).await?))
    }

    async fn recent(
        &self,
        before: Option<Seq>,
        limit: usize,
        scan: usize,
        keep: &EventFilter<'_>,
    ) -> Result<Vec<EventTimeline>, JournalError> {
        let info = self.inner.events.get_info().await.map_err(unavailable)?;
        let (first, last) = (info.state.first_sequence, info.state.last_sequence);
        let mut seq = before.map_or(last, |b| b.saturating_sub(1).min(last));
        let mut out = Vec::new();
        let mut scanned = 0;
        while seq >= first.max(1) && scanned < scan && out.len() < limit {
            scanned += 1;
            if let Some(env) = self.envelope(seq).await? {
                let wanted = env.event_seq.is_none() && keep(&env.event);
                if wanted {
                    let record = self.record(&env.event.id).await?;
                    out.push(self.timeline_from(env, seq, record).await?);
                }
            }
            seq -= 1;
        }
        Ok(out)
    }

    async fn dead_letters(
        &self,
        route: Option<&str>,
        after: Option<DeliveryKey>,
        limit: usize,
    ) -> Result<DeadLetterPage, JournalError> {
        // Pages go by the dead-letter stream's order; `after` names a
        // delivery, whose dead letter is found through its record.
        let after_seq = match after {
            Some(k) => self.dead_message(k).await?.map_or(0, |(s, _)| s),
            None => 0,
        };
        let page = self.dead_page(route, after_seq, limit + 1).await?;
        let mut items: Vec<DeadLetter> = page
            .into_iter()
            .map(|(_, m)| DeadLetter {
                key: DeliveryKey {
                    seq: m.event_seq,
                    idx: m.idx,
                },
                event: Arc::new(m.event),
                record: m.record,
            })
            .collect();
        let next = if items.len() > limit {
            items.truncate(limit);
            items.last().map(|d| d.key)
        } else {
            None
        };
        Ok(DeadLetterPage { items, next })
    }

    async fn dead_letter(&self, key: DeliveryKey) -> Result<Option<DeadLetter>, JournalError> {
        Ok(self.dead_message(key).await?.map(|(_, m)| DeadLetter {
            key,
            event: Arc::new(m.event),
            record: m.record,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_keys_round_trip_and_keep_prefix_order() {
        for key in ["customer:ada", "a.b", "ü", "=x", "plain/path-1_2", ""] {
            let enc = encode_key(key);
            assert!(
                enc.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-/=".contains(&b)),
                "{enc}"
            );
            assert_eq!(decode_key(&enc).as_deref(), Some(key));
        }
        assert!(encode_key("customer:ada").starts_with(&encode_key("customer:")));
    }

    #[test]
    fn values_expire() {
        let v = encode_value(b"x", Some(100));
        assert_eq!(live_value(&v, 99), Some(b"x".to_vec()));
        assert_eq!(live_value(&v, 100), None);
        assert_eq!(
            live_value(&encode_value(b"y", None), u64::MAX),
            Some(b"y".to_vec())
        );
    }

    #[test]
    fn tokens_are_subject_safe() {
        assert_eq!(token("shop"), "shop");
        assert_eq!(token("a.b c>*"), "a_b_c__");
        assert_eq!(token(""), "_");
    }

    fn event(datacontenttype: &str, data: Vec<u8>) -> Event {
        Event {
            id: "e1".into(),
            source: "shop".into(),
            ty: "t".into(),
            subject: None,
            time: "now".into(),
            datacontenttype: datacontenttype.into(),
            data,
            extensions: Default::default(),
        }
    }

    /// A dead delivery's record with these attempts.
    fn dead_record(attempts: Vec<crate::journal::Attempt>) -> DeliveryRecord {
        DeliveryRecord {
            route: "r".into(),
            plugin: "p".into(),
            status: DeliveryStatus::Dead,
            attempts,
            due_ms: None,
            created_ms: 4,
            order_key: None,
            replay: None,
            redriven_ms: Vec::new(),
            attempts_not_kept: 0,
        }
    }

    #[test]
    fn envelopes_round_trip() {
        let env = Envelope {
            event: event("application/json", b"{}".to_vec()),
            accepted_ms: 5,
            deliveries: vec![EnvelopeDelivery {
                idx: 0,
                route: "r".into(),
                plugin: "p".into(),
                order_key: Some("k".into()),
            }],
            event_seq: Some(3),
            replay: None,
            dedup_key: None,
        };
        let back = Envelope::decode(&env.encode().unwrap()).unwrap();
        assert_eq!(back.deliveries, env.deliveries);
        assert_eq!(back.event, env.event);
        assert!(Envelope::decode(b"junk").is_err());
    }

    #[test]
    fn dead_letters_keep_data_as_bytes_and_old_json_letters_still_read() {
        let msg = DeadMessage {
            event: event(
                "application/octet-stream",
                (0..=255u8).cycle().take(10_000).collect(),
            ),
            accepted_ms: 5,
            event_seq: 3,
            idx: 1,
            record: dead_record(Vec::new()),
            data_elided: false,
        };
        let packed = msg.encode().unwrap();
        let back = DeadMessage::decode(&packed).unwrap();
        assert_eq!(back.event, msg.event);
        assert_eq!((back.event_seq, back.idx, back.data_elided), (3, 1, false));
        // What earlier versions wrote: JSON, each byte of data a number.
        let json = serde_json::to_vec(&msg).unwrap();
        assert!(json.len() > 3 * msg.event.data.len(), "{}", json.len());
        assert!(
            packed.len() < msg.event.data.len() + 300,
            "{}",
            packed.len()
        );
        assert_eq!(DeadMessage::decode(&json).unwrap().event, msg.event);
        assert!(DeadMessage::decode(b"junk").is_err());
        assert!(DeadMessage::decode(b"").is_err());
    }

    /// The longest record a delivery can have: 1,000 attempts (a route's
    /// most), each with a plugin's text at its longest and, in JSON, its
    /// worst (every byte a `"`, which JSON doubles). It fits in one kv value
    /// and, without the event's data, in one dead letter.
    #[test]
    fn the_longest_record_of_attempts_fits_one_message() {
        let error = format!(
            "plugin asked to retry (last HTTP failure: {}); gave up: the next attempt would come after the route's max_age of 1year 11months 30days 23h 59m 59s",
            crate::journal::plugin_text("\"".repeat(1 << 20))
        );
        let attempt = crate::journal::Attempt {
            at_ms: u64::MAX,
            duration_us: u64::MAX,
            error: Some(error),
            plugin_hash: Some("f".repeat(64)),
            emitted: Vec::new(),
        };
        let record = DeliveryRecord {
            route: "r".repeat(64),
            plugin: "p".repeat(64),
            due_ms: Some(u64::MAX),
            created_ms: u64::MAX,
            order_key: Some("k".repeat(256)),
            replay: Some(u64::MAX),
            redriven_ms: vec![u64::MAX; 100],
            attempts_not_kept: u64::MAX,
            ..dead_record(vec![attempt; 1000])
        };
        let limit = 1 << 20;
        let entry = DeliveryEntry {
            record: record.clone(),
            dead_letter: Some(u64::MAX),
        };
        let json = serde_json::to_vec(&entry).unwrap().len();
        assert!(json + KV_OVERHEAD < limit, "{json} bytes of JSON");
        let letter = DeadMessage {
            event: event("application/json", Vec::new()),
            accepted_ms: u64::MAX,
            event_seq: u64::MAX,
            idx: u32::MAX,
            record,
            data_elided: true,
        };
        let packed = letter.encode().unwrap().len();
        assert!(packed + 1024 < limit, "{packed} bytes of letter");
    }

    /// A letter that does not fit leaves out the event's data, then its
    /// oldest attempts (counted), and fails only when the event's attributes
    /// alone do not fit.
    #[test]
    fn a_letter_is_fitted_to_one_message() {
        let attempt = crate::journal::Attempt {
            at_ms: 1,
            duration_us: 1,
            error: Some("e".repeat(600)),
            plugin_hash: Some("f".repeat(64)),
            emitted: Vec::new(),
        };
        let letter = |data: usize, attribute: usize, attempts: usize| {
            let mut event = event("application/octet-stream", vec![7; data]);
            event.extensions.insert("big".into(), "a".repeat(attribute));
            DeadMessage {
                event,
                accepted_ms: 5,
                event_seq: 3,
                idx: 1,
                record: dead_record(vec![attempt.clone(); attempts]),
                data_elided: false,
            }
        };
        let room = (1 << 20) - 100;
        // Fits: as it is.
        let mut small = letter(1000, 10, 3);
        let bytes = fit_letter(&mut small, room).unwrap();
        assert_eq!(DeadMessage::decode(&bytes).unwrap().event.data.len(), 1000);
        assert!(!small.data_elided);
        // Data near the limit: left out, every attempt kept.
        let mut near = letter(900_000, 10, 300);
        fit_letter(&mut near, room).unwrap();
        assert!(near.data_elided);
        assert_eq!(near.record.attempts.len(), 300);
        // Attributes of 400 kB and 1,000 attempts: the oldest go, counted.
        let mut heavy = letter(500_000, 400_000, 1000);
        let bytes = fit_letter(&mut heavy, room).unwrap();
        assert!(bytes.len() <= room);
        let back = DeadMessage::decode(&bytes).unwrap();
        assert!(back.data_elided);
        assert!(back.record.attempts.len() < 1000);
        assert_eq!(back.record.attempts_made(), 1000);
        // Attributes alone over the limit: refused.
        let mut hopeless = letter(0, 1 << 20, 2);
        assert!(matches!(
            fit_letter(&mut hopeless, room),
            Err(JournalError::TooLarge { .. })
        ));
    }

    #[test]
    fn the_header_block_is_counted_with_the_message_id() {
        assert_eq!(headers_len(None), 0);
        assert_eq!(
            headers_len(Some("shop:k1")),
            "NATS/1.0\r\nNats-Msg-Id: shop:k1\r\n\r\n".len()
        );
        let long = "k".repeat(40_000);
        assert!(headers_len(Some(&long)) > 40_000);
    }
}
