//! Secret scrubbing: the one registry of every secret this process knows (client secrets, OAuth
//! tokens, sink passwords and credentials, signing keys), and [`scrub`], which replaces each of
//! them, in every encoding the daemon itself produces, by `[redacted]`.
//!
//! Secrets are registered where they become known: a `config::Secret` when it is made, the
//! credentials in sink URLs and headers when the config is loaded (`config::load`), OAuth tokens when a client receives them ([`register_rotating`], which
//! forgets a portal's old tokens after a few rotations). Text from elsewhere is scrubbed where it
//! enters an error (`bitrix::error::sanitize_snippet`) and again where the process shows it: every
//! log line ([`Scrubbed`]), every line a command prints, `/readyz` and the status page.
//!
//! The encodings: the secret as is; percent-encoded (`%2B`, query strings and forms of the
//! daemon's requests, either case of hex digits); form-encoded (a space as `+`); escaped inside a
//! JSON string, a Rust debug string and HTML text; and for a user and password, the `Basic`
//! credentials (`base64(user:password)`). Matching ignores ASCII case. A secret shorter than
//! [`MIN_SECRET_LEN`] characters is not scrubbed: it would blank out ordinary words.

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt::Write as _;
use std::io;
use std::sync::{LazyLock, RwLock};

/// What a secret is replaced by.
pub const REDACTED: &str = "[redacted]";
/// Secrets shorter than this are not scrubbed.
pub const MIN_SECRET_LEN: usize = 4;
/// Needles are at most this long: a longer form is matched as the consecutive pieces it is cut
/// into (a 64 KiB secret would make a matcher of 64 Ki states).
const MAX_NEEDLE: usize = 256;
/// How many values of one rotating slot (a portal's access token, its refresh token) are kept:
/// the current one and the ones before it, which may still be in flight.
const ROTATING_KEEP: usize = 3;

/// Every form of `secret` the daemon may write: raw; percent-encoded (RFC 3986, as the OAuth
/// query and the REST forms are written); form-encoded with a space as `+` (WHATWG forms, and
/// PHP's `urlencode` of the bitrix-form body); escaped for JSON, Rust debug output and HTML.
/// Duplicates and forms shorter than [`MIN_SECRET_LEN`] are left out (an empty list for a short
/// secret).
pub fn encodings(secret: &str) -> Vec<String> {
    if secret.chars().count() < MIN_SECRET_LEN {
        return Vec::new();
    }
    let json = serde_json::to_string(secret).unwrap_or_default();
    let debug = format!("{secret:?}");
    let forms = [
        secret.to_string(),
        escape_bytes(secret, b"-._~", false),
        escape_bytes(secret, b"*-._", true),
        escape_bytes(secret, b"-._", true),
        strip_quotes(&json).to_string(),
        strip_quotes(&debug).to_string(),
        html_escape(secret),
    ];
    let mut out: Vec<String> = Vec::with_capacity(forms.len());
    for form in forms {
        if !form.is_empty() && !out.contains(&form) {
            out.push(form);
        }
    }
    out
}

/// The needles that find every form of `secret`: its [`encodings`], a long one cut into
/// consecutive pieces of even length, at most [`MAX_NEEDLE`] bytes and more than half that, so
/// every occurrence is replaced whole (piece by piece).
fn needles(secret: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for form in encodings(secret) {
        let count = form.len().div_ceil(MAX_NEEDLE);
        let size = form.len().div_ceil(count.max(1));
        let mut start = 0;
        while start < form.len() {
            let mut end = (start + size).min(form.len());
            while !form.is_char_boundary(end) {
                end -= 1;
            }
            let piece = form[start..end].to_string();
            if !out.contains(&piece) {
                out.push(piece);
            }
            start = end;
        }
    }
    out
}

/// The value of an HTTP `Authorization: Basic` header's credentials: `base64(user:password)`.
pub fn basic_credentials(user: &str, password: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
}

/// `s` with every byte but ASCII letters, digits and `keep` written as `%XX` (upper-case hex),
/// and a space as `+` when `space_as_plus`.
fn escape_bytes(s: &str, keep: &[u8], space_as_plus: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || keep.contains(&b) {
            out.push(char::from(b));
        } else if b == b' ' && space_as_plus {
            out.push('+');
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn strip_quotes(quoted: &str) -> &str {
    quoted
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(quoted)
}

/// Escapes text for HTML content and attribute values. The status page writes with this very
/// function, so the HTML-escaped form of a secret the scrubber looks for is the one shown.
pub(crate) fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A set of needles (secrets in all their forms) compiled for fast matching.
struct Matcher {
    ac: Option<AhoCorasick>,
}

impl Matcher {
    fn new<'a>(needles: impl IntoIterator<Item = &'a String>) -> Matcher {
        let needles: Vec<&String> = needles.into_iter().collect();
        if needles.is_empty() {
            return Matcher { ac: None };
        }
        let ac = AhoCorasickBuilder::new()
            .match_kind(MatchKind::Standard)
            .ascii_case_insensitive(true)
            .build(needles)
            .ok();
        Matcher { ac }
    }

    /// Every occurrence of every needle, overlapping ones included.
    fn spans(&self, text: &str, out: &mut Vec<(usize, usize)>) {
        if let Some(ac) = &self.ac {
            out.extend(ac.find_overlapping_iter(text).map(|m| (m.start(), m.end())));
        }
    }
}

/// Every occurrence of `needle` in `text` (ASCII case ignored), overlapping ones included.
fn naive_spans(text: &str, needle: &str, out: &mut Vec<(usize, usize)>) {
    let mut from = 0;
    while let Some(at) = find_ignore_ascii_case(text, needle, from) {
        out.push((at, at + needle.len()));
        from = at + 1;
    }
}

/// `text` with the union of `spans` replaced: overlapping or touching occurrences (one secret
/// inside another, pieces of a long one) become one `[redacted]`, so no part of any survives.
fn redact_spans<'t>(text: &'t str, mut spans: Vec<(usize, usize)>) -> Cow<'t, str> {
    if spans.is_empty() {
        return Cow::Borrowed(text);
    }
    spans.sort_unstable();
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    let mut current: Option<(usize, usize)> = None;
    for (start, end) in spans {
        match &mut current {
            Some((_, cur_end)) if start <= *cur_end => *cur_end = (*cur_end).max(end),
            _ => {
                if let Some((s, e)) = current.take() {
                    out.push_str(&text[at..s]);
                    out.push_str(REDACTED);
                    at = e;
                }
                current = Some((start, end));
            }
        }
    }
    if let Some((s, e)) = current {
        out.push_str(&text[at..s]);
        out.push_str(REDACTED);
        at = e;
    }
    out.push_str(&text[at..]);
    Cow::Owned(out)
}

/// Every needle of the process. Needles added since the last compilation sit in `pending` and
/// are searched one by one until there are enough of them to compile again (so registering the
/// tokens of a thousand portals does not compile a thousand automatons). A rotated-out token
/// stays in the compiled matcher until the next compilation.
#[derive(Default)]
struct Registry {
    /// Needles of the secrets that stay for the life of the process.
    fixed: BTreeSet<String>,
    /// Slot (portal and token kind) → the needles of its last values, newest last.
    rotating: HashMap<String, VecDeque<Vec<String>>>,
    compiled: Option<Matcher>,
    /// How many needles `compiled` holds.
    compiled_count: usize,
    /// Needles not in `compiled` yet.
    pending: Vec<String>,
}

impl Registry {
    fn add_pending(&mut self, needle: &str) {
        if !self.pending.iter().any(|p| p == needle) {
            self.pending.push(needle.to_string());
        }
    }

    fn maybe_compile(&mut self) {
        if self.pending.len() <= 16 + self.compiled_count / 4 {
            return;
        }
        let mut all: BTreeSet<&String> = self.fixed.iter().collect();
        all.extend(self.rotating.values().flatten().flatten());
        self.compiled_count = all.len();
        self.compiled = Some(Matcher::new(all));
        self.pending.clear();
    }

    /// Where registered secrets occur in `text`.
    fn spans(&self, text: &str, out: &mut Vec<(usize, usize)>) {
        if let Some(matcher) = &self.compiled {
            matcher.spans(text, out);
        }
        for needle in &self.pending {
            naive_spans(text, needle, out);
        }
    }
}

fn find_ignore_ascii_case(haystack: &str, needle: &str, from: usize) -> Option<usize> {
    let (h, n) = (haystack.as_bytes(), needle.as_bytes());
    if n.is_empty() || h.len() < n.len() {
        return None;
    }
    (from..=h.len() - n.len()).find(|&i| h[i..i + n.len()].eq_ignore_ascii_case(n))
}

static REGISTRY: LazyLock<RwLock<Registry>> = LazyLock::new(|| RwLock::new(Registry::default()));

fn write_registry(f: impl FnOnce(&mut Registry)) {
    let mut registry = REGISTRY.write().unwrap_or_else(|p| p.into_inner());
    f(&mut registry);
    registry.maybe_compile();
}

/// Registers a secret that stays for the life of the process (from the config, a secret file,
/// a systemd credential).
pub fn register(secret: &str) {
    if secret.chars().count() < MIN_SECRET_LEN {
        return;
    }
    write_registry(|r| {
        for form in needles(secret) {
            if !r.fixed.contains(&form) {
                r.add_pending(&form);
                r.fixed.insert(form);
            }
        }
    });
}

/// Registers a password with its user: the password, and the `Basic` credentials an HTTP
/// client makes of the pair. An empty password registers the user, which some URL schemes use
/// as a token (`nats://TOKEN@host`).
pub fn register_credentials(user: &str, password: &str) {
    if password.is_empty() {
        register(user);
    } else {
        register(password);
    }
    if !password.is_empty() || !user.is_empty() {
        register(&basic_credentials(user, password));
    }
}

/// Registers the current value of a secret that rotates (an OAuth token of one portal): the
/// last [`ROTATING_KEEP`] values of `slot` are scrubbed, older ones are forgotten.
pub fn register_rotating(slot: &str, secret: &str) {
    if secret.chars().count() < MIN_SECRET_LEN {
        return;
    }
    write_registry(|r| {
        let forms = needles(secret);
        let values = r.rotating.entry(slot.to_string()).or_default();
        if values.iter().any(|v| *v == forms) {
            return;
        }
        values.push_back(forms.clone());
        while values.len() > ROTATING_KEEP {
            values.pop_front();
        }
        for form in &forms {
            r.add_pending(form);
        }
    });
}

/// Whether a header's value is a credential: `Authorization`, `Cookie`, and any name that
/// says key, token, secret, password, signature, session or auth.
pub fn is_credential_header(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    [
        "auth",
        "cookie",
        "key",
        "token",
        "secret",
        "pass",
        "signature",
        "session",
    ]
    .iter()
    .any(|word| name.contains(word))
}

/// `text` with every registered secret, in every encoding, replaced by `[redacted]`.
pub fn scrub(text: &str) -> Cow<'_, str> {
    scrub_spans(text, &[])
}

/// [`scrub`], and `extra` secrets (those a caller holds but did not register) in every
/// encoding too.
pub fn scrub_with(text: &str, extra: &[&str]) -> String {
    scrub_spans(text, extra).into_owned()
}

fn scrub_spans<'t>(text: &'t str, extra: &[&str]) -> Cow<'t, str> {
    let mut spans = Vec::new();
    {
        let registry = REGISTRY.read().unwrap_or_else(|p| p.into_inner());
        registry.spans(text, &mut spans);
    }
    for needle in extra.iter().flat_map(|s| needles(s)) {
        naive_spans(text, &needle, &mut spans);
    }
    redact_spans(text, spans)
}

/// A [`MakeWriter`](tracing_subscriber::fmt::MakeWriter) whose writers [`scrub`] what they
/// write: every log line passes through it. (The formatter writes each event with one call.)
pub struct Scrubbed<M>(pub M);

impl<'a, M: tracing_subscriber::fmt::MakeWriter<'a>> tracing_subscriber::fmt::MakeWriter<'a>
    for Scrubbed<M>
{
    type Writer = ScrubWriter<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        ScrubWriter(self.0.make_writer())
    }
}

/// A writer that scrubs each buffer before passing it on.
pub struct ScrubWriter<W>(W);

impl<W: io::Write> io::Write for ScrubWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        match scrub(&text) {
            Cow::Borrowed(_) => self.0.write_all(buf)?,
            Cow::Owned(scrubbed) => self.0.write_all(scrubbed.as_bytes())?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_encoding_of_a_secret() {
        let forms = encodings("a b+c/\"d<é");
        assert_eq!(
            forms,
            vec![
                "a b+c/\"d<é".to_string(),
                "a%20b%2Bc%2F%22d%3C%C3%A9".to_string(),
                "a+b%2Bc%2F%22d%3C%C3%A9".to_string(),
                "a b+c/\\\"d<é".to_string(),
                "a b+c/\"d&lt;é".to_string().replace('"', "&quot;"),
            ]
        );
        assert_eq!(encodings("abcdef123"), vec!["abcdef123".to_string()]);
        assert!(encodings("abc").is_empty());
        assert_eq!(basic_credentials("erp", "pass"), "ZXJwOnBhc3M=");
    }

    #[test]
    fn scrub_with_replaces_every_form_in_any_hex_case() {
        let secret = "s3cr3t +/&x";
        let text = format!(
            "raw {secret} pct {} form {} lower {} json {}",
            escape_bytes(secret, b"-._~", false),
            escape_bytes(secret, b"*-._", true),
            escape_bytes(secret, b"-._~", false).to_ascii_lowercase(),
            serde_json::to_string(secret).unwrap()
        );
        let out = scrub_with(&text, &[secret]);
        assert!(!out.contains("s3cr3t"), "{out}");
        assert_eq!(out.matches(REDACTED).count(), 5, "{out}");
    }

    #[test]
    fn registered_secrets_are_scrubbed_in_logs() {
        register("registered-S3cret+1");
        register_credentials("erp", "p@ss-word");
        let text = format!(
            "a registered-S3cret%2B1 b registered-S3cret+1 c p@ss-word d {}",
            basic_credentials("erp", "p@ss-word")
        );
        let out = scrub(&text).into_owned();
        assert_eq!(
            out, "a [redacted] b [redacted] c [redacted] d [redacted]",
            "{out}"
        );
        let mut sink = Vec::new();
        let mut writer = ScrubWriter(&mut sink);
        io::Write::write_all(&mut writer, b"token registered-S3cret+1\n").unwrap();
        assert_eq!(String::from_utf8(sink).unwrap(), "token [redacted]\n");
    }

    #[test]
    fn rotating_secrets_keep_the_last_few() {
        for i in 0..(ROTATING_KEEP + 40) {
            register_rotating("test.access", &format!("rotating-token-{i:04}"));
        }
        let newest = format!("rotating-token-{:04}", ROTATING_KEEP + 39);
        assert_eq!(scrub(&newest), REDACTED);
        // Compiled away after enough rotations: the oldest is no longer a secret.
        let registry = REGISTRY.read().unwrap();
        assert!(registry.rotating["test.access"].len() == ROTATING_KEEP);
    }

    #[test]
    fn many_secrets_compile_and_pending_ones_match_too() {
        for i in 0..200 {
            register(&format!("bulk-secret-{i:03}-x"));
        }
        let out = scrub("bulk-secret-000-x and BULK-SECRET-199-X");
        assert_eq!(out, "[redacted] and [redacted]");
        assert!(REGISTRY.read().unwrap().compiled.is_some());
    }

    #[test]
    fn long_secrets_are_matched_in_covering_pieces() {
        let long: String = (0..3000)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let long = format!("é{long}");
        let pieces = needles(&long);
        assert!(
            pieces
                .iter()
                .all(|p| p.len() <= MAX_NEEDLE && p.len() > MAX_NEEDLE / 2),
            "{pieces:?}"
        );
        register(&long);
        register(&"q9".repeat(32 * 1024));
        let text = format!("before {long} after {}", "q9".repeat(32 * 1024));
        let out = scrub(&text);
        assert!(out.starts_with("before [redacted]"), "{out}");
        assert!(!out.contains("abc") && !out.contains("q9"), "{out}");
        assert!(out.contains(" after [redacted]"), "{out}");
    }

    #[test]
    fn short_secrets_are_not_scrubbed() {
        register("abc");
        assert_eq!(scrub("abc abc"), "abc abc");
    }

    #[test]
    fn credential_headers() {
        assert!(is_credential_header("Authorization"));
        assert!(is_credential_header("X-Api-Key"));
        assert!(is_credential_header("x-auth-token"));
        assert!(!is_credential_header("Content-Type"));
        assert!(!is_credential_header("X-Tenant"));
    }
}
