//! Durable key-value state, private to the plugin.
//!
//! Writes made while handling an event become visible to other deliveries only when
//! that delivery succeeds; a delivery that fails leaves no writes behind. Within one
//! delivery, reads see the delivery's own writes.
//!
//! ```no_run
//! # fn demo() -> Result<(), switchyard_sdk::KvError> {
//! use switchyard_sdk::kv;
//!
//! kv::set_string("greeting", "hello")?;
//! assert_eq!(kv::get_string("greeting")?.as_deref(), Some("hello"));
//! let seen: u64 = kv::get_json("seen")?.unwrap_or(0);
//! kv::set_json("seen", &(seen + 1))?;
//! let visits = kv::increment("visits", 1)?; // atomic counter
//! kv::set_with_ttl("session/abc", b"1", std::time::Duration::from_secs(3600))?;
//! for key in kv::keys("session/") {
//!     let key = key?;
//!     # let _ = key;
//! }
//! # let _ = visits;
//! # Ok(()) }
//! ```

use crate::__bindings::switchyard::plugin::kv as wit;
use crate::Failure;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt;
use std::time::Duration;

/// Longest key, bytes (keys must not be empty either).
pub const MAX_KEY_LEN: usize = 512;
/// Largest value, bytes.
pub const MAX_VALUE_LEN: usize = 1 << 20;
/// Most distinct keys one delivery may write.
pub const MAX_WRITES_PER_DELIVERY: usize = 10_000;

/// Why a [`kv`](self) call failed.
///
/// Converts into a [`Failure`]: [`Unavailable`](Self::Unavailable) into a retry, the
/// others into a reject, so `?` does the right thing inside `handle`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvError {
    /// The key or value breaks a limit (size, quota); the text says which.
    Invalid(String),
    /// The store cannot be used right now; retrying later may succeed.
    Unavailable(String),
    /// A value could not be (de)serialized by [`get_json`], [`set_json`] or
    /// [`get_string`]; the text names the key and the problem.
    Encoding(String),
}

impl fmt::Display for KvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvError::Invalid(m) => write!(f, "kv: invalid key or value: {m}"),
            KvError::Unavailable(m) => write!(f, "kv: store unavailable: {m}"),
            KvError::Encoding(m) => write!(f, "kv: {m}"),
        }
    }
}

impl std::error::Error for KvError {}

impl From<wit::Error> for KvError {
    fn from(e: wit::Error) -> Self {
        match e {
            wit::Error::Invalid(m) => KvError::Invalid(m),
            wit::Error::Unavailable(m) => KvError::Unavailable(m),
        }
    }
}

impl From<KvError> for Failure {
    fn from(e: KvError) -> Self {
        match e {
            KvError::Unavailable(_) => Failure::retry(),
            KvError::Invalid(_) | KvError::Encoding(_) => Failure::reject(e.to_string()),
        }
    }
}

/// The bytes stored under `key`, or `None` if there are none.
pub fn get(key: &str) -> Result<Option<Vec<u8>>, KvError> {
    #[cfg(not(target_arch = "wasm32"))]
    return crate::native("kv::get", |h| h.kv_get(key));
    #[cfg(target_arch = "wasm32")]
    Ok(wit::get(key)?)
}

/// Stores `value` under `key`, replacing any previous value.
pub fn set(key: &str, value: &[u8]) -> Result<(), KvError> {
    #[cfg(not(target_arch = "wasm32"))]
    return crate::native("kv::set", |h| h.kv_set(key, value, None));
    #[cfg(target_arch = "wasm32")]
    Ok(wit::set(key, value)?)
}

/// Removes `key`; removing a missing key is not an error.
pub fn delete(key: &str) -> Result<(), KvError> {
    #[cfg(not(target_arch = "wasm32"))]
    return crate::native("kv::delete", |h| h.kv_delete(key));
    #[cfg(target_arch = "wasm32")]
    Ok(wit::delete(key)?)
}

/// Stores `value` under `key` until `ttl` has passed; after that the key reads
/// as absent (and the host deletes it in the background). Setting the key again
/// with [`set`] removes the expiry.
pub fn set_with_ttl(key: &str, value: &[u8], ttl: Duration) -> Result<(), KvError> {
    #[cfg(not(target_arch = "wasm32"))]
    return crate::native("kv::set_with_ttl", |h| h.kv_set(key, value, Some(ttl)));
    #[cfg(target_arch = "wasm32")]
    {
        let nanos = u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX);
        Ok(wit::set_with_ttl(key, value, nanos)?)
    }
}

/// Adds `delta` to the integer under `key` (an absent key counts as 0) and
/// returns the new value. The value is stored as decimal text, so
/// [`get_json::<i64>`](get_json) reads it too.
///
/// Atomic across deliveries: if another delivery changed the key since this
/// one read it, the router runs this delivery again on the new value instead
/// of committing a lost update. The same holds for every read-then-write.
pub fn increment(key: &str, delta: i64) -> Result<i64, KvError> {
    #[cfg(not(target_arch = "wasm32"))]
    return crate::native("kv::increment", |h| h.kv_increment(key, delta));
    #[cfg(target_arch = "wasm32")]
    Ok(wit::increment(key, delta)?)
}

/// Sets `key` to `new` (`None` deletes it) only if it currently holds
/// `expected` (`None`: absent); returns whether it did.
pub fn compare_and_swap(
    key: &str,
    expected: Option<&[u8]>,
    new: Option<&[u8]>,
) -> Result<bool, KvError> {
    #[cfg(not(target_arch = "wasm32"))]
    return crate::native("kv::compare_and_swap", |h| h.kv_cas(key, expected, new));
    #[cfg(target_arch = "wasm32")]
    Ok(wit::compare_and_swap(key, expected, new)?)
}

/// Up to `limit` keys (at most 1000) that start with `prefix`, in byte order,
/// after `after` if given: pass the last key of a page to get the next one.
/// See [`keys`] to walk them all.
pub fn list_keys(prefix: &str, after: Option<&str>, limit: u32) -> Result<Vec<String>, KvError> {
    #[cfg(not(target_arch = "wasm32"))]
    return crate::native("kv::list_keys", |h| h.kv_list(prefix, after, limit));
    #[cfg(target_arch = "wasm32")]
    Ok(wit::list_keys(prefix, after, limit)?)
}

/// Every key that starts with `prefix`, in byte order, fetched a page at a
/// time.
pub fn keys(prefix: &str) -> Keys {
    Keys {
        prefix: prefix.to_string(),
        after: None,
        page: Vec::new().into_iter(),
        done: false,
    }
}

/// The iterator [`keys`] returns.
#[derive(Debug)]
pub struct Keys {
    prefix: String,
    after: Option<String>,
    page: std::vec::IntoIter<String>,
    done: bool,
}

impl Iterator for Keys {
    type Item = Result<String, KvError>;

    fn next(&mut self) -> Option<Self::Item> {
        const PAGE: u32 = 256;
        if let Some(k) = self.page.next() {
            self.after = Some(k.clone());
            return Some(Ok(k));
        }
        if self.done {
            return None;
        }
        match list_keys(&self.prefix, self.after.as_deref(), PAGE) {
            Ok(page) => {
                self.done = page.len() < PAGE as usize;
                self.page = page.into_iter();
                let k = self.page.next()?;
                self.after = Some(k.clone());
                Some(Ok(k))
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// The value under `key` deserialized from JSON, or `None` if there is none.
pub fn get_json<T: DeserializeOwned>(key: &str) -> Result<Option<T>, KvError> {
    get(key)?
        .map(|bytes| {
            serde_json::from_slice(&bytes).map_err(|e| {
                KvError::Encoding(format!(
                    "value under {key:?} is not a valid {}: {e}",
                    std::any::type_name::<T>()
                ))
            })
        })
        .transpose()
}

/// Stores `value` under `key` as JSON.
pub fn set_json<T: Serialize + ?Sized>(key: &str, value: &T) -> Result<(), KvError> {
    let bytes = serde_json::to_vec(value).map_err(|e| {
        KvError::Encoding(format!("cannot encode the value for {key:?} as JSON: {e}"))
    })?;
    set(key, &bytes)
}

/// The value under `key` as UTF-8 text, or `None` if there is none.
pub fn get_string(key: &str) -> Result<Option<String>, KvError> {
    get(key)?
        .map(|bytes| {
            String::from_utf8(bytes)
                .map_err(|e| KvError::Encoding(format!("value under {key:?} is not UTF-8: {e}")))
        })
        .transpose()
}

/// Stores the UTF-8 bytes of `value` under `key`.
pub fn set_string(key: &str, value: &str) -> Result<(), KvError> {
    set(key, value.as_bytes())
}

/// Runs `work` once per event id: if a delivery of this event already
/// succeeded through `once` (the marker under `key_prefix` + id is set), it
/// returns `Ok(false)` without running `work`; else it runs `work` and sets the
/// marker, returning `Ok(true)`.
///
/// The marker is written like every other kv write: it becomes visible only
/// if the delivery succeeds, together with `work`'s own writes. So a failed or
/// cut-off delivery leaves no marker and runs again, and one that succeeded is
/// never applied twice, even when the router delivers the event again (it
/// delivers at least once). Side effects outside kv (an HTTP call) can still
/// happen twice.
///
/// ```no_run
/// # fn demo(event: switchyard_sdk::Event) -> Result<(), switchyard_sdk::Failure> {
/// use switchyard_sdk::kv;
/// kv::once("seen/", &event.id, || {
///     let n: u64 = kv::get_json("count")?.unwrap_or(0);
///     kv::set_json("count", &(n + 1))?;
///     Ok::<(), switchyard_sdk::Failure>(())
/// })?;
/// # Ok(()) }
/// ```
pub fn once<E>(key_prefix: &str, id: &str, work: impl FnOnce() -> Result<(), E>) -> Result<bool, E>
where
    E: From<KvError>,
{
    let marker = format!("{key_prefix}{id}");
    if get(&marker)?.is_some() {
        return Ok(false);
    }
    work()?;
    set(&marker, b"1")?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailable_means_retry_and_invalid_means_reject() {
        assert_eq!(
            Failure::from(KvError::from(wit::Error::Unavailable("down".into()))),
            Failure::retry()
        );
        assert_eq!(
            Failure::from(KvError::from(wit::Error::Invalid("key too long".into()))),
            Failure::reject("kv: invalid key or value: key too long")
        );
        assert!(matches!(
            Failure::from(KvError::Encoding("x".into())),
            Failure::Reject(_)
        ));
    }

    #[test]
    #[should_panic(expected = "needs the Switchyard host")]
    fn host_calls_panic_clearly_in_native_builds() {
        let _ = get("k");
    }
}
