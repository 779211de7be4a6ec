//! Reading the secrets a config names (the build phase, with I/O): a portal's client secret and
//! a sink's secrets, so that a missing or malformed one is a configuration error (exit 78).

use super::types::PortalConfig;
use crate::options::{ConfigError, Secret, SecretKeys, credentials_directory, read_secret};
use crate::sinks::{SinkConfig, SinkKind};
use std::path::Path;

/// Reads a portal's client secret from where the config says it is, with `$CREDENTIALS_DIRECTORY`
/// from the process environment.
pub fn resolve_secret(portal: &PortalConfig) -> Result<Secret, ConfigError> {
    resolve_secret_in(portal, credentials_directory().as_deref())
}

/// [`resolve_secret`] with an explicit credentials directory.
fn resolve_secret_in(
    portal: &PortalConfig,
    credentials_dir: Option<&Path>,
) -> Result<Secret, ConfigError> {
    let keys = SecretKeys {
        what: "client secret",
        table: ["portals", &portal.name],
        inline: "client_secret",
        file: "client_secret_file",
    };
    read_secret(&portal.client_secret, &keys, credentials_dir)
}

/// Reads every secret a sink needs, so that a missing or malformed one is a configuration error
/// (exit 78) before anything starts.
pub fn resolve_sink_secrets(sink: &SinkConfig) -> Result<(), ConfigError> {
    match &sink.kind {
        SinkKind::Http(http) => {
            crate::sinks::http::resolve_http_secrets(&sink.name, http).map(|_| ())
        }
        // The broker and database sinks carry their credentials in their URL.
        _ => Ok(()),
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::*;
    use crate::options::read_secret_file;
    use crate::options::*;
    use crate::sinks::http::*;

    fn portal_with(source: SecretSource) -> PortalConfig {
        let mut config = load_str(MINIMAL, &[]).unwrap();
        let mut portal = config.portals.remove("main").unwrap();
        portal.client_secret = source;
        portal
    }

    #[test]
    fn resolve_secret_from_each_source() {
        let dir = tempfile::tempdir().unwrap();

        let inline = portal_with(SecretSource::Inline(Secret::new("inline")));
        assert_eq!(resolve_secret_in(&inline, None).unwrap().expose(), "inline");

        let file = dir.path().join("main.secret");
        std::fs::write(&file, "from-file\r\n").unwrap();
        let p = portal_with(SecretSource::File(file.clone()));
        assert_eq!(resolve_secret_in(&p, None).unwrap().expose(), "from-file");

        std::fs::write(&file, "\n").unwrap();
        let err = resolve_secret_in(&p, None).unwrap_err();
        assert_eq!(err.key, "portals.main.client_secret_file");
        assert!(err.message.contains("empty"));

        let missing = portal_with(SecretSource::File(dir.path().join("nope")));
        let err = resolve_secret_in(&missing, None).unwrap_err();
        assert!(err.file.ends_with("nope"), "{err}");
        assert!(err.message.contains("cannot read"), "{err}");

        std::fs::write(dir.path().join("main.client_secret"), "from-credential\n").unwrap();
        let cred = portal_with(SecretSource::Credential("main.client_secret".into()));
        assert_eq!(
            resolve_secret_in(&cred, Some(dir.path())).unwrap().expose(),
            "from-credential"
        );

        let err = resolve_secret_in(&cred, None).unwrap_err();
        assert_eq!(err.key, "portals.main.client_secret");
        for needle in [
            "client_secret",
            "B24EVENTD_PORTALS__MAIN__CLIENT_SECRET",
            "client_secret_file",
            "\"main.client_secret\"",
            "$CREDENTIALS_DIRECTORY is not set",
        ] {
            assert!(err.message.contains(needle), "{needle:?} not in {err}");
        }

        let empty_dir = tempfile::tempdir().unwrap();
        let err = resolve_secret_in(&cred, Some(empty_dir.path())).unwrap_err();
        assert!(err.file.ends_with("main.client_secret"), "{err}");
        assert!(err.message.contains("does not exist"), "{err}");
    }

    #[test]
    fn secret_files_are_small_regular_files_of_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let read = |path: &Path| {
            read_secret_file(path, "portals.main.client_secret_file", "client secret")
        };
        let file = dir.path().join("main.secret");
        std::fs::write(&file, "q7".repeat(MAX_SECRET_FILE as usize / 2)).unwrap();
        assert_eq!(
            read(&file).unwrap().expose().len(),
            MAX_SECRET_FILE as usize
        );
        std::fs::write(&file, "q7".repeat(MAX_SECRET_FILE as usize / 2) + "q").unwrap();
        let err = read(&file).unwrap_err();
        assert!(
            err.message.contains("65537 bytes") && err.message.contains("65536"),
            "{err}"
        );
        assert_eq!(err.key, "portals.main.client_secret_file");
        let err = read(Path::new("/dev/zero")).unwrap_err();
        assert_eq!(err.file, "/dev/zero");
        assert!(
            err.message.contains("a device, not a regular file"),
            "{err}"
        );
        let err = read(dir.path()).unwrap_err();
        assert!(err.message.contains("a directory"), "{err}");
        for (content, expected) in [
            ("s3cret\n", Ok("s3cret")),
            ("s3cret\r\n", Ok("s3cret")),
            (" s3 cret ", Ok(" s3 cret ")),
            ("s3cret\n\n", Err("line break")),
            ("s3\ncret", Err("line break")),
            ("s3\rcret", Err("line break")),
            ("s3\0cret", Err("NUL")),
        ] {
            std::fs::write(&file, content).unwrap();
            match (read(&file), expected) {
                (Ok(secret), Ok(want)) => assert_eq!(secret.expose(), want),
                (Err(err), Err(why)) => assert!(
                    err.message.contains(why) && err.message.contains("one final newline"),
                    "{content:?}: {err}"
                ),
                (got, want) => panic!("{content:?}: {got:?}, expected {want:?}"),
            }
        }
        std::fs::write(&file, [0xff, 0xfe]).unwrap();
        assert!(read(&file).unwrap_err().message.contains("not UTF-8"));
    }

    #[test]
    fn inline_secrets_hold_no_line_break_or_nul() {
        for (value, why) in [("s3\\ncr3t", "line break"), ("s3\\u0000cr3t", "NUL")] {
            let text = portal("").replace(
                "client_secret = \"s3cr3t\"",
                &format!("client_secret = \"{value}\""),
            );
            assert_err(&text, "portals.main.client_secret", why);
        }
        assert_err(
            &sink(
                "type = \"http\"\nurl = \"https://u:p@erp.example/\"\nheaders = { Authorization = \"Bearer t0ken\" }",
            ),
            "sinks.erp.headers.Authorization",
            "keep one",
        );
    }

    #[test]
    fn http_secrets_resolve_from_files_and_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("erp.key");
        std::fs::write(&key_file, format!("{SIGNING_SECRET}\n")).unwrap();
        let text = bitrix(&format!("signing_secret_file = \"{}\"", key_file.display()))
            .replace("application_token = \"t0ken\"\n", "");
        let http = http_config(&text);

        let creds = tempfile::tempdir().unwrap();
        std::fs::write(creds.path().join("erp.application_token"), "from-cred\n").unwrap();
        let secrets = resolve_http_secrets_in("erp", &http, Some(creds.path())).unwrap();
        assert_eq!(
            secrets.application_token.as_ref().map(Secret::expose),
            Some("from-cred")
        );
        assert!(secrets.signing_key.is_some());
        assert!(!format!("{secrets:?}").contains("from-cred"));

        let err = resolve_http_secrets_in("erp", &http, None).unwrap_err();
        assert_eq!(err.key, "sinks.erp.application_token");
        for needle in [
            "no application token configured",
            "B24EVENTD_SINKS__ERP__APPLICATION_TOKEN",
            "application_token_file",
            "\"erp.application_token\"",
        ] {
            assert!(err.message.contains(needle), "{needle:?} not in {err}");
        }

        std::fs::write(&key_file, "whsec_c2hvcnQ=").unwrap();
        let err = resolve_http_secrets_in("erp", &http, Some(creds.path())).unwrap_err();
        assert_eq!(err.key, "sinks.erp.signing_secret_file");
        assert!(err.file.ends_with("erp.key"), "{err}");
        assert!(err.message.contains("decodes to 5 bytes"), "{err}");
        assert!(!err.message.contains("c2hvcnQ"), "{err}");

        std::fs::write(&key_file, "\n").unwrap();
        let err = resolve_http_secrets_in("erp", &http, Some(creds.path())).unwrap_err();
        assert!(
            err.message.contains("the signing secret file is empty"),
            "{err}"
        );

        // json sinks without signing need nothing.
        let plain = http_config(&http_toml(""));
        let secrets = resolve_http_secrets_in("erp", &plain, None).unwrap();
        assert!(secrets.signing_key.is_none() && secrets.application_token.is_none());
    }

    #[test]
    fn secret_never_prints() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret}"), "[redacted]");
        assert_eq!(format!("{secret:?}"), "[redacted]");
        let config = load_str(&with("[sinks.erp]\ntype = \"http\"\nurl = \"https://user:pw@erp.local/x\"\nheaders = { X-Api-Key = \"Bearer tok\" }"), &[]).unwrap();
        let debug = format!("{config:?}");
        for leaked in ["s3cr3t", "Bearer tok", ":pw@"] {
            assert!(!debug.contains(leaked), "{leaked} leaked in {debug}");
        }
    }
}
