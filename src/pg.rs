//! PostgreSQL connection settings shared by the `postgres` sink and the PostgreSQL journal:
//! reading a `postgres://` URL (with libpq's `sslmode`, which the driver only partly knows),
//! the TLS connector (rustls with ring, the system's trust store) and starting a connection.

use tokio_postgres::config::SslMode;

/// How the connection is encrypted, from the URL's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tls {
    /// No `sslmode`, or `disable`.
    Off,
    /// `prefer`: TLS when the server offers it, else plain.
    Prefer,
    /// `require`, `verify-ca`, `verify-full`: TLS with the certificate and host name verified.
    Require,
}

/// The driver's config and the TLS mode from a `postgres://` URL. `sslmode` is read here (the
/// driver knows only disable/prefer/require); the messages never echo the URL.
pub(crate) fn connect_config(url: &str) -> Result<(tokio_postgres::Config, Tls), String> {
    let mut parsed = reqwest::Url::parse(url).map_err(|e| {
        format!("invalid URL ({e}); write postgres://user:password@host:5432/database")
    })?;
    if !matches!(parsed.scheme(), "postgres" | "postgresql") {
        return Err(format!(
            "unsupported scheme {:?}; write postgres://user:password@host:5432/database",
            parsed.scheme()
        ));
    }
    let mut tls = Tls::Off;
    let mut rest = Vec::new();
    for (key, value) in parsed.query_pairs() {
        if key == "sslmode" {
            tls = match value.as_ref() {
                "disable" => Tls::Off,
                "prefer" | "allow" => Tls::Prefer,
                "require" | "verify-ca" | "verify-full" => Tls::Require,
                other => {
                    return Err(format!(
                        "unknown sslmode {other:?}; use disable, prefer, require or verify-full"
                    ));
                }
            };
        } else {
            rest.push((key.into_owned(), value.into_owned()));
        }
    }
    if rest.is_empty() {
        parsed.set_query(None);
    } else {
        parsed.query_pairs_mut().clear().extend_pairs(rest);
    }
    let mut config: tokio_postgres::Config = parsed
        .as_str()
        .parse()
        .map_err(|e| format!("invalid connection URL: {e}"))?;
    if config.get_hosts().is_empty() {
        return Err(
            "the URL has no host; write postgres://user:password@host:5432/database".into(),
        );
    }
    if config.get_dbname().is_none() {
        return Err("the URL names no database; write postgres://user@host:5432/database".into());
    }
    config.ssl_mode(match tls {
        Tls::Off => SslMode::Disable,
        Tls::Prefer => SslMode::Prefer,
        Tls::Require => SslMode::Require,
    });
    // The URL's `application_name` names the connections (e.g. one name per instance of a
    // cluster, to tell them apart in `pg_stat_activity`); "b24eventd" otherwise.
    if config.get_application_name().is_none() {
        config.application_name("b24eventd");
    }
    Ok((config, tls))
}

/// Connects and spawns the driver's connection task.
pub(crate) async fn start<T>(
    config: &tokio_postgres::Config,
    tls: T,
) -> Result<tokio_postgres::Client, tokio_postgres::Error>
where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>,
    T::Stream: Send + 'static,
{
    let (client, connection) = config.connect(tls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "postgres connection ended");
        }
    });
    Ok(client)
}

/// Connects with `config` and `LISTEN`s on `channel` (a plain identifier), calling
/// `on_notify` for every notification until the connection ends: its error, or `Ok` when the
/// server closed it. The connection is driven here (a pooled one drops its notifications).
pub(crate) async fn listen<T>(
    config: &tokio_postgres::Config,
    tls: T,
    channel: &str,
    on_notify: impl Fn() + Send + 'static,
) -> Result<(), tokio_postgres::Error>
where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>,
    T::Stream: Send + 'static,
{
    use futures_util::StreamExt;
    let (client, mut connection) = config.connect(tls).await?;
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(_) = message? {
                on_notify();
            }
        }
        Ok(())
    });
    if let Err(e) = client.batch_execute(&format!("LISTEN {channel}")).await {
        driver.abort();
        return Err(e);
    }
    // The client is kept until the connection ends: dropping it would close the connection.
    let ended = driver.await;
    drop(client);
    match ended {
        Ok(result) => result,
        // Only an abort or a panic ends the task otherwise; either way the listening is over.
        Err(_) => Ok(()),
    }
}

/// rustls (ring) with the system's trust store; verifies the chain and the host name.
pub(crate) fn tls_connector() -> Result<tokio_postgres_rustls::MakeRustlsConnect, String> {
    use rustls_platform_verifier::BuilderVerifierExt;
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    let config = rustls::ClientConfig::builder()
        .with_platform_verifier()
        .map_err(|e| format!("cannot set up TLS: {e}"))?
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_named_b24eventd_unless_the_url_names_them() {
        let (config, tls) = connect_config("postgres://u@h:5432/db").unwrap();
        assert_eq!(config.get_application_name(), Some("b24eventd"));
        assert_eq!(tls, Tls::Off);
        let (config, tls) =
            connect_config("postgres://u@h:5432/db?sslmode=require&application_name=node-2")
                .unwrap();
        assert_eq!(config.get_application_name(), Some("node-2"));
        assert_eq!(tls, Tls::Require);
    }
}
