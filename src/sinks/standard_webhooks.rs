//! Standard Webhooks request signing (<https://www.standardwebhooks.com/>): the `whsec_` secret
//! format and the `webhook-id` / `webhook-timestamp` / `webhook-signature` headers an http sink
//! adds when `signing_secret` is set.
//!
//! The signature is `v1,` + base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}")), where the key
//! is the base64-decoded part of the secret after `whsec_`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use std::fmt;

/// The prefix of a Standard Webhooks secret.
pub(crate) const SECRET_PREFIX: &str = "whsec_";
/// The shortest key the spec allows (24 bytes); shorter keys are refused.
pub(crate) const MIN_KEY_BYTES: usize = 24;
/// The longest key the spec allows (64 bytes).
pub(crate) const MAX_KEY_BYTES: usize = 64;

/// The header carrying the message id (the envelope id: the same on every retry).
pub const HEADER_ID: &str = "webhook-id";
/// The header carrying the unix seconds at send time.
pub const HEADER_TIMESTAMP: &str = "webhook-timestamp";
/// The header carrying the signature(s).
pub const HEADER_SIGNATURE: &str = "webhook-signature";

/// How to make a valid secret, for error messages.
const HOW_TO_MAKE: &str = "generate one with: echo \"whsec_$(openssl rand -base64 32)\"";

/// A decoded signing key. `Debug` never prints it.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct SigningKey(Vec<u8>);

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey([redacted; {} bytes])", self.0.len())
    }
}

/// Reads a secret as written in the config: `whsec_` followed by base64 of 24 to 64 random
/// bytes (the `whsec_` prefix may be left out, as the reference libraries allow). The error
/// says what is wrong and how to make a good one, and never repeats the secret.
pub(crate) fn parse_secret(text: &str) -> Result<SigningKey, String> {
    let text = text.trim();
    let encoded = text.strip_prefix(SECRET_PREFIX).unwrap_or(text);
    if encoded.is_empty() {
        return Err(format!(
            "empty signing secret; expected \"whsec_\" followed by base64; {HOW_TO_MAKE}"
        ));
    }
    let key = STANDARD.decode(encoded).map_err(|_| {
        format!(
            "malformed signing secret: the part after \"whsec_\" is not valid base64 \
             (standard alphabet with padding); {HOW_TO_MAKE}"
        )
    })?;
    if !(MIN_KEY_BYTES..=MAX_KEY_BYTES).contains(&key.len()) {
        return Err(format!(
            "signing secret decodes to {} bytes; Standard Webhooks keys are {MIN_KEY_BYTES} to \
             {MAX_KEY_BYTES} random bytes; {HOW_TO_MAKE}",
            key.len()
        ));
    }
    Ok(SigningKey(key))
}

/// The three Standard Webhooks headers for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SignatureHeaders {
    pub id: String,
    pub timestamp: String,
    pub signature: String,
}

/// Signs `body` sent as message `id` at `timestamp` (unix seconds).
pub(crate) fn sign(key: &SigningKey, id: &str, timestamp: i64, body: &[u8]) -> SignatureHeaders {
    let timestamp = timestamp.to_string();
    let hmac_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key.0);
    let mut context = ring::hmac::Context::with_key(&hmac_key);
    context.update(id.as_bytes());
    context.update(b".");
    context.update(timestamp.as_bytes());
    context.update(b".");
    context.update(body);
    let tag = context.sign();
    SignatureHeaders {
        id: id.to_string(),
        timestamp,
        signature: format!("v1,{}", STANDARD.encode(tag.as_ref())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worked example of the Standard Webhooks reference libraries (the spec's test vector).
    #[test]
    fn matches_the_reference_test_vector() {
        let key = parse_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let headers = sign(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(
            headers.signature,
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        assert_eq!(headers.timestamp, "1614265330");
        assert_eq!(headers.id, "msg_p5jXN8AQM9LWM0D4loKWxJek");
    }

    #[test]
    fn prefix_is_optional_and_whitespace_ignored() {
        let with = parse_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let without = parse_secret(" MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n").unwrap();
        assert_eq!(with, without);
    }

    #[test]
    fn malformed_secrets_say_what_is_wrong_without_echoing_it() {
        let err = parse_secret("whsec_not*base64!").unwrap_err();
        assert!(err.contains("not valid base64"), "{err}");
        assert!(err.contains("openssl rand"), "{err}");
        assert!(!err.contains("not*base64"), "{err}");

        let err = parse_secret("whsec_").unwrap_err();
        assert!(err.contains("empty"), "{err}");

        let err = parse_secret("whsec_c2hvcnQ=").unwrap_err();
        assert!(err.contains("decodes to 5 bytes"), "{err}");

        let long = STANDARD.encode([7u8; 65]);
        let err = parse_secret(&format!("whsec_{long}")).unwrap_err();
        assert!(err.contains("65 bytes"), "{err}");
    }

    #[test]
    fn debug_hides_the_key() {
        let key = parse_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(format!("{key:?}"), "SigningKey([redacted; 24 bytes])");
    }
}
