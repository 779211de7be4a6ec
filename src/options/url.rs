//! URLs and host names in config values: hiding a URL's credentials, checking an http(s) URL,
//! a host name with its port.

/// `url` with any `user:password@` removed, for logs and error messages.
pub(crate) fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) => {
            if !parsed.username().is_empty() || parsed.password().is_some() {
                let _ = parsed.set_username("");
                let _ = parsed.set_password(None);
            }
            parsed.to_string()
        }
        // Not a URL: drop everything up to an `@` that could be userinfo.
        Err(_) => match (url.find("://"), url.rfind('@')) {
            (Some(scheme_end), Some(at)) if at > scheme_end => {
                format!("{}{}", &url[..scheme_end + 3], &url[at + 1..])
            }
            _ => url.to_string(),
        },
    }
}

/// `value` as an `http://` or `https://` URL with a host; the problem, naming the URL without
/// its credentials, otherwise.
pub(crate) fn parse_http_url(value: &str) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(value)
        .map_err(|e| format!("invalid URL {:?}: {e}", redact_url(value)))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
        return Err(format!(
            "must be an http:// or https:// URL, got {:?}",
            redact_url(value)
        ));
    }
    Ok(url)
}

/// `host[:port]` of a URL (the port only when it is not the scheme's default).
pub(crate) fn host_of(url: &str) -> Option<String> {
    let url = reqwest::Url::parse(url).ok()?;
    let host = url.host_str()?;
    Some(match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    })
}

/// A host name (with an optional port) and nothing else.
pub(crate) fn valid_domain(domain: &str) -> bool {
    !domain.is_empty()
        && !domain.contains(['/', '@', '?', '#', ' '])
        && reqwest::Url::parse(&format!("https://{domain}/"))
            .ok()
            .and_then(|url| host_of(url.as_str()))
            .is_some_and(|parsed| parsed.eq_ignore_ascii_case(domain))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_url_strips_userinfo() {
        assert_eq!(
            redact_url("https://user:pw@host:8080/p?q=1"),
            "https://host:8080/p?q=1"
        );
        assert_eq!(redact_url("http://host/p"), "http://host/p");
        assert_eq!(redact_url("weird://user:pw@"), "weird://");
    }

    #[test]
    fn http_urls_hosts_and_domains() {
        assert!(parse_http_url("https://erp:8080/ev").is_ok());
        let problem = parse_http_url("ftp://u:hunter2@x/").unwrap_err();
        assert!(problem.contains("http:// or https://"), "{problem}");
        assert!(!problem.contains("hunter2"), "{problem}");
        assert!(
            parse_http_url("not a url")
                .unwrap_err()
                .starts_with("invalid URL")
        );
        assert_eq!(
            host_of("https://a.example.com/rest/").as_deref(),
            Some("a.example.com")
        );
        assert_eq!(
            host_of("https://a.example.com:8443/").as_deref(),
            Some("a.example.com:8443")
        );
        assert!(valid_domain("crm.example.com"));
        assert!(valid_domain("crm.example.com:8443"));
        assert!(!valid_domain("https://crm.example.com/"));
        assert!(!valid_domain(""));
    }
}
