//! Destination names with `{portal}` and `{event}` placeholders (a redis stream, an mqtt topic):
//! checking a template when the config is read, and filling it in per envelope.

/// The placeholders a template may use.
const PLACEHOLDERS: [&str; 2] = ["portal", "event"];

/// Checks a template: not empty, and every `{` opens one of [`PLACEHOLDERS`] closed by `}`.
/// The error is a lowercase message for [`crate::options::SinkOptions::err`].
pub fn check(template: &str) -> Result<(), String> {
    if template.is_empty() {
        return Err("must not be empty".to_string());
    }
    let mut rest = template;
    while let Some(open) = rest.find(['{', '}']) {
        if rest[open..].starts_with('}') {
            return Err(format!(
                "unmatched \"}}\" in {template:?}; placeholders are {{portal}} and {{event}}"
            ));
        }
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            return Err(format!(
                "unmatched \"{{\" in {template:?}; placeholders are {{portal}} and {{event}}"
            ));
        };
        let name = &after[..close];
        if !PLACEHOLDERS.contains(&name) {
            return Err(format!(
                "unknown placeholder {{{name}}} in {template:?}; only {{portal}} and {{event}} are replaced"
            ));
        }
        rest = &after[close + 1..];
    }
    Ok(())
}

/// Whether a (checked) template has placeholders, i.e. names a different destination per event.
pub fn has_placeholders(template: &str) -> bool {
    template.contains('{')
}

/// Fills in a checked template in one pass, so a portal or event name containing `{event}`
/// is copied as it is.
pub fn render(template: &str, portal: &str, event: &str) -> String {
    let mut out = String::with_capacity(template.len() + portal.len() + event.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open..];
        if let Some(tail) = after.strip_prefix("{portal}") {
            out.push_str(portal);
            rest = tail;
        } else if let Some(tail) = after.strip_prefix("{event}") {
            out.push_str(event);
            rest = tail;
        } else {
            out.push('{');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_placeholders_and_braces() {
        assert_eq!(check("bitrix/{portal}/{event}"), Ok(()));
        assert_eq!(check("plain"), Ok(()));
        assert!(check("").unwrap_err().contains("must not be empty"));
        let err = check("a/{Portal}").unwrap_err();
        assert!(err.contains("unknown placeholder {Portal}"), "{err}");
        assert!(check("a/{portal").unwrap_err().contains("unmatched \"{\""));
        assert!(check("a}/b").unwrap_err().contains("unmatched \"}\""));
        assert!(check("{}").unwrap_err().contains("unknown placeholder {}"));
        assert!(has_placeholders("x:{event}"));
        assert!(!has_placeholders("x:y"));
    }

    #[test]
    fn renders_in_one_pass() {
        assert_eq!(
            render("bitrix/{portal}/{event}", "main", "ONCRMDEALADD"),
            "bitrix/main/ONCRMDEALADD"
        );
        assert_eq!(render("s", "main", "E"), "s");
        assert_eq!(render("{event}{event}", "p", "E"), "EE");
        assert_eq!(
            render("{portal}-{event}", "{event}", "E"),
            "{event}-E",
            "values are not expanded again"
        );
    }
}
