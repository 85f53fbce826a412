//! Webhook signature verification, per source: Standard Webhooks (`v1` HMAC,
//! `v1a` ed25519), GitHub, Stripe and a bearer token. Secrets come from
//! environment variables named in `rules.toml`; several per source allow key
//! rotation (any one that verifies passes). Every comparison of a secret or a
//! MAC is constant-time.
//!
//! Reasons given to the sender say what to fix without saying anything about
//! the secret: "signature mismatch", "timestamp outside tolerance", "missing
//! webhook-signature header".

use std::time::Duration;

use axum::http::HeaderMap;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::config::{VerifyConfig, VerifyScheme};

type HmacSha256 = Hmac<Sha256>;

/// Why a request failed verification (answered 401 with this text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("missing {0} header")]
    Missing(&'static str),
    #[error("the {0} header appears more than once")]
    Duplicated(&'static str),
    #[error("malformed {0} header")]
    Malformed(&'static str),
    #[error("timestamp outside tolerance")]
    Stale,
    #[error("signature mismatch")]
    Mismatch,
    #[error("no signature of a supported version (expected {0})")]
    UnsupportedVersion(&'static str),
}

/// Why a source's verification could not be set up (a startup or reload error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error(
        "source `{source_name}`: environment variable {var} is not set (it holds the {scheme} secret)"
    )]
    Missing {
        source_name: String,
        var: String,
        scheme: &'static str,
    },
    #[error("source `{source_name}`: environment variable {var}: {why}")]
    Invalid {
        source_name: String,
        var: String,
        why: String,
    },
}

/// One key of a Standard Webhooks source.
pub enum SwKey {
    /// `whsec_...`: an HMAC-SHA256 key (`v1`).
    Symmetric(Vec<u8>),
    /// `whpk_...`: an ed25519 public key (`v1a`).
    Public(ed25519_dalek::VerifyingKey),
}

/// A source's verifier, with its secrets resolved.
pub enum Verifier {
    StandardWebhooks {
        keys: Vec<SwKey>,
        tolerance: Duration,
    },
    Github {
        secrets: Vec<Vec<u8>>,
    },
    Stripe {
        secrets: Vec<Vec<u8>>,
        tolerance: Duration,
    },
    Bearer {
        tokens: Vec<Vec<u8>>,
    },
}

impl std::fmt::Debug for Verifier {
    /// Never prints a secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (scheme, n) = match self {
            Verifier::StandardWebhooks { keys, .. } => ("standard-webhooks", keys.len()),
            Verifier::Github { secrets } => ("github", secrets.len()),
            Verifier::Stripe { secrets, .. } => ("stripe", secrets.len()),
            Verifier::Bearer { tokens } => ("bearer", tokens.len()),
        };
        write!(f, "Verifier({scheme}, {n} secret(s))")
    }
}

impl Verifier {
    /// Resolves the secrets of `source`'s verification from `env`.
    pub fn new(
        source: &str,
        cfg: &VerifyConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Verifier, SecretError> {
        let scheme = cfg.scheme.name();
        let mut values = Vec::new();
        for var in &cfg.secret_env {
            match env(var).filter(|v| !v.trim().is_empty()) {
                Some(v) => values.push((var, v.trim().to_string())),
                None => {
                    return Err(SecretError::Missing {
                        source_name: source.to_string(),
                        var: var.clone(),
                        scheme,
                    });
                }
            }
        }
        let invalid = |var: &str, why: String| SecretError::Invalid {
            source_name: source.to_string(),
            var: var.to_string(),
            why,
        };
        Ok(match cfg.scheme {
            VerifyScheme::StandardWebhooks => {
                let mut keys = Vec::new();
                for (var, v) in values {
                    keys.push(sw_key(&v).map_err(|why| invalid(var, why))?);
                }
                Verifier::StandardWebhooks {
                    keys,
                    tolerance: cfg.tolerance,
                }
            }
            VerifyScheme::Github => Verifier::Github {
                secrets: values.into_iter().map(|(_, v)| v.into_bytes()).collect(),
            },
            VerifyScheme::Stripe => Verifier::Stripe {
                secrets: values.into_iter().map(|(_, v)| v.into_bytes()).collect(),
                tolerance: cfg.tolerance,
            },
            VerifyScheme::Bearer => Verifier::Bearer {
                tokens: values.into_iter().map(|(_, v)| v.into_bytes()).collect(),
            },
        })
    }

    /// Checks a request; `now` is Unix seconds.
    pub fn verify(&self, headers: &HeaderMap, body: &[u8], now: u64) -> Result<(), VerifyError> {
        match self {
            Verifier::StandardWebhooks { keys, tolerance } => {
                standard_webhooks(keys, *tolerance, headers, body, now)
            }
            Verifier::Github { secrets } => github(secrets, headers, body),
            Verifier::Stripe { secrets, tolerance } => {
                stripe(secrets, *tolerance, headers, body, now)
            }
            Verifier::Bearer { tokens } => bearer(tokens, headers),
        }
    }
}

/// Parses a Standard Webhooks key: `whsec_<base64>` (symmetric) or
/// `whpk_<base64>` (ed25519 public key). A bare base64 string is taken as
/// symmetric, as the reference libraries do.
fn sw_key(text: &str) -> Result<SwKey, String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    if let Some(pk) = text.strip_prefix("whpk_") {
        let bytes = b64
            .decode(pk)
            .map_err(|_| "the whpk_ key is not valid base64".to_string())?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| "an ed25519 public key is 32 bytes".to_string())?;
        let key = ed25519_dalek::VerifyingKey::from_bytes(&arr)
            .map_err(|_| "not a valid ed25519 public key".to_string())?;
        return Ok(SwKey::Public(key));
    }
    let secret = text.strip_prefix("whsec_").unwrap_or(text);
    let bytes = b64
        .decode(secret)
        .map_err(|_| "the whsec_ secret is not valid base64".to_string())?;
    if bytes.is_empty() {
        return Err("the secret is empty".into());
    }
    Ok(SwKey::Symmetric(bytes))
}

/// The one value of a header that must appear once.
fn single<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<&'a str, VerifyError> {
    let mut values = headers.get_all(name).iter();
    let first = values.next().ok_or(VerifyError::Missing(name))?;
    if values.next().is_some() {
        return Err(VerifyError::Duplicated(name));
    }
    first
        .to_str()
        .map(str::trim)
        .map_err(|_| VerifyError::Malformed(name))
}

fn within(ts: u64, now: u64, tolerance: Duration) -> Result<(), VerifyError> {
    if ts.abs_diff(now) > tolerance.as_secs() {
        Err(VerifyError::Stale)
    } else {
        Ok(())
    }
}

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    for p in parts {
        mac.update(p);
    }
    mac
}

fn standard_webhooks(
    keys: &[SwKey],
    tolerance: Duration,
    headers: &HeaderMap,
    body: &[u8],
    now: u64,
) -> Result<(), VerifyError> {
    let id = single(headers, "webhook-id")?;
    let ts_text = single(headers, "webhook-timestamp")?;
    let signatures = single(headers, "webhook-signature")?;
    let ts: u64 = ts_text
        .parse()
        .map_err(|_| VerifyError::Malformed("webhook-timestamp"))?;
    within(ts, now, tolerance)?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let signed = [id.as_bytes(), b".", ts_text.as_bytes(), b".", body];
    let mut saw_supported = false;
    for entry in signatures.split_whitespace() {
        let Some((version, sig)) = entry.split_once(',') else {
            continue;
        };
        let supported = keys.iter().any(|k| {
            matches!(
                (version, k),
                ("v1", SwKey::Symmetric(_)) | ("v1a", SwKey::Public(_))
            )
        });
        saw_supported |= supported;
        // A truncated or garbled signature is a mismatch, not a format error.
        let Ok(sig) = b64.decode(sig) else { continue };
        for key in keys {
            let valid = match (version, key) {
                ("v1", SwKey::Symmetric(k)) => hmac_sha256(k, &signed).verify_slice(&sig).is_ok(),
                ("v1a", SwKey::Public(pk)) => ed25519_dalek::Signature::from_slice(&sig)
                    .is_ok_and(|sig| pk.verify_strict(&signed.concat(), &sig).is_ok()),
                _ => false,
            };
            if valid {
                return Ok(());
            }
        }
    }
    if saw_supported {
        Err(VerifyError::Mismatch)
    } else {
        Err(VerifyError::UnsupportedVersion(
            if keys.iter().any(|k| matches!(k, SwKey::Public(_))) {
                "v1a,<base64>"
            } else {
                "v1,<base64>"
            },
        ))
    }
}

fn github(secrets: &[Vec<u8>], headers: &HeaderMap, body: &[u8]) -> Result<(), VerifyError> {
    const HEADER: &str = "x-hub-signature-256";
    let value = single(headers, HEADER)?;
    let hex_sig = value
        .strip_prefix("sha256=")
        .ok_or(VerifyError::Malformed(HEADER))?;
    let sig = hex::decode(hex_sig).map_err(|_| VerifyError::Malformed(HEADER))?;
    for s in secrets {
        if hmac_sha256(s, &[body]).verify_slice(&sig).is_ok() {
            return Ok(());
        }
    }
    Err(VerifyError::Mismatch)
}

fn stripe(
    secrets: &[Vec<u8>],
    tolerance: Duration,
    headers: &HeaderMap,
    body: &[u8],
    now: u64,
) -> Result<(), VerifyError> {
    const HEADER: &str = "stripe-signature";
    let value = single(headers, HEADER)?;
    let mut ts = None;
    let mut sigs = Vec::new();
    for part in value.split(',') {
        match part.trim().split_once('=') {
            Some(("t", t)) => ts = Some(t),
            Some(("v1", s)) => sigs.push(s),
            _ => {} // v0 and unknown schemes are ignored, as Stripe's libraries do
        }
    }
    let ts_text = ts.ok_or(VerifyError::Malformed(HEADER))?;
    let ts: u64 = ts_text
        .parse()
        .map_err(|_| VerifyError::Malformed(HEADER))?;
    if sigs.is_empty() {
        return Err(VerifyError::UnsupportedVersion("v1=<hex>"));
    }
    within(ts, now, tolerance)?;
    for s in secrets {
        let mac = hmac_sha256(s, &[ts_text.as_bytes(), b".", body]);
        let expected = mac.finalize().into_bytes();
        for sig in &sigs {
            if let Ok(sig) = hex::decode(sig)
                && bool::from(sig.as_slice().ct_eq(expected.as_slice()))
            {
                return Ok(());
            }
        }
    }
    Err(VerifyError::Mismatch)
}

fn bearer(tokens: &[Vec<u8>], headers: &HeaderMap) -> Result<(), VerifyError> {
    const HEADER: &str = "authorization";
    let value = single(headers, HEADER)?;
    let token = value
        .strip_prefix("Bearer ")
        .ok_or(VerifyError::Malformed(HEADER))?
        .trim();
    // Compare against every token, so the time does not say which one matched.
    let mut ok = subtle::Choice::from(0);
    for t in tokens {
        ok |= token.as_bytes().ct_eq(t);
    }
    if bool::from(ok) {
        Ok(())
    } else {
        Err(VerifyError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn cfg(scheme: VerifyScheme, vars: &[&str]) -> VerifyConfig {
        VerifyConfig {
            scheme,
            secret_env: vars.iter().map(|v| v.to_string()).collect(),
            tolerance: Duration::from_secs(300),
        }
    }

    fn verifier(scheme: VerifyScheme, secrets: &[&str]) -> Verifier {
        let vars: Vec<String> = (0..secrets.len()).map(|i| format!("S{i}")).collect();
        let refs: Vec<&str> = vars.iter().map(String::as_str).collect();
        Verifier::new("src", &cfg(scheme, &refs), |v| {
            let i: usize = v[1..].parse().ok()?;
            secrets.get(i).map(|s| s.to_string())
        })
        .unwrap()
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    /// The example of the Standard Webhooks reference libraries.
    const SW_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SW_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SW_TS: u64 = 1614265330;
    const SW_BODY: &str = r#"{"test": 2432232314}"#;
    const SW_SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn sw_headers(sig: &str, ts: u64) -> HeaderMap {
        headers(&[
            ("webhook-id", SW_ID),
            ("webhook-timestamp", &ts.to_string()),
            ("webhook-signature", sig),
        ])
    }

    #[test]
    fn standard_webhooks_v1_reference_vector_and_failures() {
        let v = verifier(VerifyScheme::StandardWebhooks, &[SW_SECRET]);
        let body = SW_BODY.as_bytes();
        assert_eq!(v.verify(&sw_headers(SW_SIG, SW_TS), body, SW_TS), Ok(()));
        // Several signatures, one valid (rotation on the sender's side).
        let several = format!("v1,Zm9v {SW_SIG} v1a,YmFy");
        assert_eq!(v.verify(&sw_headers(&several, SW_TS), body, SW_TS), Ok(()));
        // A different body, a truncated or empty signature, another version.
        let e = |sig: &str, body: &[u8], now| v.verify(&sw_headers(sig, SW_TS), body, now);
        assert_eq!(
            e(SW_SIG, b"{\"test\": 1}", SW_TS),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(e(&SW_SIG[..20], body, SW_TS), Err(VerifyError::Mismatch));
        assert_eq!(
            e("", body, SW_TS),
            Err(VerifyError::UnsupportedVersion("v1,<base64>"))
        );
        assert_eq!(
            e(&SW_SIG.replace("v1,", "v2,"), body, SW_TS),
            Err(VerifyError::UnsupportedVersion("v1,<base64>"))
        );
        // Stale and future timestamps.
        assert_eq!(e(SW_SIG, body, SW_TS + 301), Err(VerifyError::Stale));
        assert_eq!(e(SW_SIG, body, SW_TS - 301), Err(VerifyError::Stale));
        assert_eq!(e(SW_SIG, body, SW_TS + 299), Ok(()));
        // Missing and duplicated headers.
        let mut h = sw_headers(SW_SIG, SW_TS);
        h.remove("webhook-signature");
        assert_eq!(
            v.verify(&h, body, SW_TS),
            Err(VerifyError::Missing("webhook-signature"))
        );
        let mut h = sw_headers(SW_SIG, SW_TS);
        h.append("webhook-id", HeaderValue::from_static("msg_other"));
        assert_eq!(
            v.verify(&h, body, SW_TS),
            Err(VerifyError::Duplicated("webhook-id"))
        );
        let h = headers(&[
            ("webhook-id", SW_ID),
            ("webhook-timestamp", "soon"),
            ("webhook-signature", SW_SIG),
        ]);
        assert_eq!(
            v.verify(&h, body, SW_TS),
            Err(VerifyError::Malformed("webhook-timestamp"))
        );
    }

    #[test]
    fn standard_webhooks_rotation_and_ed25519() {
        // The old secret is still accepted while both are configured.
        let other = "whsec_c2VjcmV0LXR3by1zZWNyZXQtdHdvLXNlY3JldA==";
        let v = verifier(VerifyScheme::StandardWebhooks, &[other, SW_SECRET]);
        assert_eq!(
            v.verify(&sw_headers(SW_SIG, SW_TS), SW_BODY.as_bytes(), SW_TS),
            Ok(())
        );
        let only_other = verifier(VerifyScheme::StandardWebhooks, &[other]);
        assert_eq!(
            only_other.verify(&sw_headers(SW_SIG, SW_TS), SW_BODY.as_bytes(), SW_TS),
            Err(VerifyError::Mismatch)
        );

        use ed25519_dalek::Signer;
        let signing = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let b64 = base64::engine::general_purpose::STANDARD;
        let pk = format!("whpk_{}", b64.encode(signing.verifying_key().as_bytes()));
        let v = verifier(VerifyScheme::StandardWebhooks, &[&pk]);
        let signed = format!("{SW_ID}.{SW_TS}.{SW_BODY}");
        let sig = format!(
            "v1a,{}",
            b64.encode(signing.sign(signed.as_bytes()).to_bytes())
        );
        assert_eq!(
            v.verify(&sw_headers(&sig, SW_TS), SW_BODY.as_bytes(), SW_TS),
            Ok(())
        );
        assert_eq!(
            v.verify(&sw_headers(&sig, SW_TS), b"{}", SW_TS),
            Err(VerifyError::Mismatch)
        );
        // A v1 (HMAC) signature means nothing to an ed25519-only source.
        assert_eq!(
            v.verify(&sw_headers(SW_SIG, SW_TS), SW_BODY.as_bytes(), SW_TS),
            Err(VerifyError::UnsupportedVersion("v1a,<base64>"))
        );
    }

    /// GitHub's documented example ("Validating webhook deliveries").
    #[test]
    fn github_documented_example() {
        let v = verifier(VerifyScheme::Github, &["It's a Secret to Everybody"]);
        let sig = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        let h = headers(&[("x-hub-signature-256", sig)]);
        assert_eq!(v.verify(&h, b"Hello, World!", 0), Ok(()));
        assert_eq!(
            v.verify(&h, b"Hello, World?", 0),
            Err(VerifyError::Mismatch)
        );
        let h = headers(&[("x-hub-signature-256", &sig[7..])]);
        assert_eq!(
            v.verify(&h, b"Hello, World!", 0),
            Err(VerifyError::Malformed("x-hub-signature-256"))
        );
        let h = headers(&[("x-hub-signature-256", "sha256=zz")]);
        assert_eq!(
            v.verify(&h, b"Hello, World!", 0),
            Err(VerifyError::Malformed("x-hub-signature-256"))
        );
        assert_eq!(
            v.verify(&HeaderMap::new(), b"", 0),
            Err(VerifyError::Missing("x-hub-signature-256"))
        );
    }

    fn stripe_sig(secret: &str, t: u64, body: &str) -> String {
        let mac = hmac_sha256(
            secret.as_bytes(),
            &[t.to_string().as_bytes(), b".", body.as_bytes()],
        );
        hex::encode(mac.finalize().into_bytes())
    }

    #[test]
    fn stripe_signature_header() {
        let secret = "whsec_test_secret";
        let v = verifier(VerifyScheme::Stripe, &[secret]);
        let body = r#"{"id":"evt_1","type":"charge.succeeded"}"#;
        let t = 1_700_000_000;
        let good = stripe_sig(secret, t, body);
        let h = |v: &str| headers(&[("stripe-signature", v)]);
        let ok = h(&format!("t={t},v1={good},v0=6ffbb59b2300aae63f2723"));
        assert_eq!(v.verify(&ok, body.as_bytes(), t + 10), Ok(()));
        // Any of several v1 signatures (Stripe sends one per active secret).
        let two = h(&format!("t={t},v1=00ff,v1={good}"));
        assert_eq!(v.verify(&two, body.as_bytes(), t), Ok(()));
        assert_eq!(v.verify(&ok, b"{}", t), Err(VerifyError::Mismatch));
        assert_eq!(
            v.verify(&ok, body.as_bytes(), t + 301),
            Err(VerifyError::Stale)
        );
        assert_eq!(
            v.verify(&h(&format!("v1={good}")), body.as_bytes(), t),
            Err(VerifyError::Malformed("stripe-signature"))
        );
        assert_eq!(
            v.verify(&h(&format!("t={t},v0={good}")), body.as_bytes(), t),
            Err(VerifyError::UnsupportedVersion("v1=<hex>"))
        );
        // Signed with another secret: a mismatch, until that secret is added.
        let other = h(&format!("t={t},v1={}", stripe_sig("whsec_new", t, body)));
        assert_eq!(
            v.verify(&other, body.as_bytes(), t),
            Err(VerifyError::Mismatch)
        );
        let rotated = verifier(VerifyScheme::Stripe, &["whsec_new", secret]);
        assert_eq!(rotated.verify(&other, body.as_bytes(), t), Ok(()));
    }

    #[test]
    fn bearer_token() {
        let v = verifier(VerifyScheme::Bearer, &["t0ken", "older"]);
        let h = |v: &str| headers(&[("authorization", v)]);
        assert_eq!(v.verify(&h("Bearer t0ken"), b"", 0), Ok(()));
        assert_eq!(v.verify(&h("Bearer older"), b"", 0), Ok(()));
        assert_eq!(
            v.verify(&h("Bearer t0ke"), b"", 0),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            v.verify(&h("Bearer "), b"", 0),
            Err(VerifyError::Malformed("authorization"))
        );
        assert_eq!(
            v.verify(&h("Basic dDB rZW4="), b"", 0),
            Err(VerifyError::Malformed("authorization"))
        );
    }

    #[test]
    fn secrets_must_be_set_and_well_formed() {
        let missing = Verifier::new("shop", &cfg(VerifyScheme::Github, &["GH_SECRET"]), |_| None);
        assert_eq!(
            missing.unwrap_err().to_string(),
            "source `shop`: environment variable GH_SECRET is not set (it holds the github secret)"
        );
        let bad = Verifier::new(
            "shop",
            &cfg(VerifyScheme::StandardWebhooks, &["SW"]),
            |_| Some("whsec_***".into()),
        );
        assert_eq!(
            bad.unwrap_err().to_string(),
            "source `shop`: environment variable SW: the whsec_ secret is not valid base64"
        );
        let debug = format!("{:?}", verifier(VerifyScheme::Bearer, &["hunter2"]));
        assert!(!debug.contains("hunter2"), "{debug}");
    }
}
