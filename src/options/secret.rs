//! `Secret` (redacted in `Debug`, registered with the scrubber), where a secret comes from
//! (`SecretSource`), and reading it from a file or a systemd credential.

use super::{ConfigError, env_var_name};
use serde::{Deserialize, Deserializer};
use std::fmt;
use std::path::{Path, PathBuf};

/// Where a portal's client secret comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// `client_secret = "..."` in the file or `B24EVENTD_PORTALS__<NAME>__CLIENT_SECRET`.
    Inline(Secret),
    /// `client_secret_file = "/path"`.
    File(PathBuf),
    /// Neither was given: a file of this name in `$CREDENTIALS_DIRECTORY` (systemd
    /// `LoadCredential=<portal>.client_secret:...`).
    Credential(String),
}

/// A secret string. `Debug` and `Display` print `[redacted]`; only [`Secret::expose`] shows it.
/// Making one registers it with [`crate::redact`], so no log line or output shows it either.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        let secret = s.into();
        crate::redact::register(&secret);
        Secret(secret)
    }

    /// The secret itself: for building a request, never for a log line or an error message.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Secret, D::Error> {
        String::deserialize(deserializer).map(Secret::new)
    }
}

/// `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`), when set.
pub(crate) fn credentials_directory() -> Option<PathBuf> {
    std::env::var_os("CREDENTIALS_DIRECTORY")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
}

/// Names for the messages about one secret: what it is and its two keys in `[table.NAME]`.
pub(crate) struct SecretKeys<'a> {
    pub(crate) what: &'a str,
    pub(crate) table: [&'a str; 2],
    pub(crate) inline: &'a str,
    pub(crate) file: &'a str,
}

impl SecretKeys<'_> {
    fn key(&self, leaf: &str) -> String {
        format!("{}.{}.{leaf}", self.table[0], self.table[1])
    }

    /// An error about the secret's content, on the key it came from.
    pub(crate) fn error(&self, source: &SecretSource, message: String) -> ConfigError {
        match source {
            SecretSource::File(path) => {
                ConfigError::new(path.display().to_string(), self.key(self.file), message)
            }
            SecretSource::Inline(_) => {
                ConfigError::new("the config", self.key(self.inline), message)
            }
            SecretSource::Credential(credential) => {
                ConfigError::new(credential.clone(), self.key(self.inline), message)
            }
        }
    }
}

/// Reads a secret from where `source` says it is; errors name `keys`.
pub(crate) fn read_secret(
    source: &SecretSource,
    keys: &SecretKeys<'_>,
    credentials_dir: Option<&Path>,
) -> Result<Secret, ConfigError> {
    match source {
        SecretSource::Inline(secret) => Ok(secret.clone()),
        SecretSource::File(path) => {
            let key = keys.key(keys.file);
            let secret = read_secret_file(path, &key, keys.what)?;
            warn_if_shared(&key, path);
            Ok(secret)
        }
        SecretSource::Credential(credential) => {
            let key = keys.key(keys.inline);
            let env_var = env_var_name(&[keys.table[0], keys.table[1], keys.inline]);
            let tried = format!(
                "tried {} (or {env_var}), {}, and the systemd credential {credential:?}",
                keys.inline, keys.file
            );
            let what = keys.what;
            let Some(dir) = credentials_dir else {
                return Err(ConfigError::new(
                    "$CREDENTIALS_DIRECTORY",
                    key,
                    format!("no {what} configured: {tried}, but $CREDENTIALS_DIRECTORY is not set"),
                ));
            };
            let path = dir.join(credential);
            if !path.exists() {
                return Err(ConfigError::new(
                    path.display().to_string(),
                    key,
                    format!("no {what} configured: {tried}, which does not exist"),
                ));
            }
            read_secret_file(&path, &key, what)
        }
    }
}

/// The largest secret file read (a client secret is 50 characters, a signing key well under
/// 1 KiB); a bigger file is refused, not read.
pub(crate) const MAX_SECRET_FILE: u64 = 64 * 1024;

/// Reads a secret file: a regular file (a FIFO would block, a device like `/dev/zero` never
/// ends: both refused without reading) of at most [`MAX_SECRET_FILE`] bytes, UTF-8, holding the
/// secret and at most one final newline.
pub(crate) fn read_secret_file(path: &Path, key: &str, what: &str) -> Result<Secret, ConfigError> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = path.display().to_string();
    let err = |message: String| ConfigError::new(&file, key, message);
    // Non-blocking, so that opening a FIFO returns at once; the type is checked on the opened
    // file, so nothing can be swapped in between.
    let handle = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
        .map_err(|e| err(format!("cannot read the {what}: {e}")))?;
    let meta = handle
        .metadata()
        .map_err(|e| err(format!("cannot read the {what}: {e}")))?;
    if !meta.is_file() {
        let kind = file_kind(&meta);
        return Err(err(format!(
            "the {what} file is {kind}, not a regular file: point the key at a file holding only the {what}"
        )));
    }
    if meta.len() > MAX_SECRET_FILE {
        return Err(err(format!(
            "the {what} file is {} bytes; a secret file holds at most {MAX_SECRET_FILE} bytes",
            meta.len()
        )));
    }
    let mut bytes = Vec::new();
    handle
        .take(MAX_SECRET_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| err(format!("cannot read the {what}: {e}")))?;
    if bytes.len() as u64 > MAX_SECRET_FILE {
        return Err(err(format!(
            "the {what} file grew past {MAX_SECRET_FILE} bytes while it was read"
        )));
    }
    let text =
        String::from_utf8(bytes).map_err(|_| err(format!("the {what} file is not UTF-8 text")))?;
    let secret = text
        .strip_suffix('\n')
        .map(|s| s.strip_suffix('\r').unwrap_or(s))
        .unwrap_or(&text);
    if secret.trim().is_empty() {
        return Err(err(format!("the {what} file is empty")));
    }
    check_secret_text(secret, what).map_err(|problem| {
        err(format!(
            "{problem} (a secret file holds the secret and at most one final newline)"
        ))
    })?;
    Ok(Secret::new(secret))
}

/// What a file is, for the message refusing it as a secret file.
fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt as _;
    let kind = meta.file_type();
    if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() || kind.is_block_device() {
        "a device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// A secret holds no line break and no NUL: it goes into headers, query strings and URLs, where
/// either would cut it or smuggle something in.
pub(crate) fn check_secret_text(secret: &str, what: &str) -> Result<(), String> {
    if secret.contains(['\n', '\r']) {
        return Err(format!("the {what} holds a line break"));
    }
    if secret.contains('\0') {
        return Err(format!("the {what} holds a NUL character"));
    }
    Ok(())
}

fn warn_if_shared(key: &str, path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                key,
                path = %path.display(),
                mode = format_args!("{mode:04o}"),
                "secret file is readable by group or others; chmod 0600 it"
            );
        }
    }
}
