//! Destination names with `{portal}` and `{event}` placeholders (a redis stream, an mqtt topic):
//! checking a template when the config is read, and filling it in per envelope.

/// One piece of a template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Piece<'a> {
    Text(&'a str),
    Portal,
    Event,
}

/// What is wrong with a template; each sink type words it for its own key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TemplateError<'a> {
    /// A `}` with no `{` before it.
    StrayClose,
    /// A `{` with no `}` after it.
    Unclosed,
    /// `{name}` with a name other than `portal` and `event`.
    Unknown(&'a str),
}

/// Splits a template into text and `{portal}`/`{event}`: the one parser of the `{portal}` and
/// `{event}` placeholders for every sink type.
pub(crate) fn parse(template: &str) -> Result<Vec<Piece<'_>>, TemplateError<'_>> {
    let mut pieces = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find(['{', '}']) {
        if rest[open..].starts_with('}') {
            return Err(TemplateError::StrayClose);
        }
        if open > 0 {
            pieces.push(Piece::Text(&rest[..open]));
        }
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            return Err(TemplateError::Unclosed);
        };
        pieces.push(match &after[..close] {
            "portal" => Piece::Portal,
            "event" => Piece::Event,
            other => return Err(TemplateError::Unknown(other)),
        });
        rest = &after[close + 1..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Text(rest));
    }
    Ok(pieces)
}

/// Checks a template: not empty, and every `{` opens `{portal}` or `{event}` closed by `}`.
/// The error is a lowercase message for [`crate::options::SinkOptions::err`].
pub(crate) fn check(template: &str) -> Result<(), String> {
    if template.is_empty() {
        return Err("must not be empty".to_string());
    }
    parse(template).map(|_| ()).map_err(|error| match error {
        TemplateError::StrayClose => format!(
            "unmatched \"}}\" in {template:?}; placeholders are {{portal}} and {{event}}"
        ),
        TemplateError::Unclosed => format!(
            "unmatched \"{{\" in {template:?}; placeholders are {{portal}} and {{event}}"
        ),
        TemplateError::Unknown(name) => format!(
            "unknown placeholder {{{name}}} in {template:?}; only {{portal}} and {{event}} are replaced"
        ),
    })
}

/// Whether a (checked) template has placeholders, i.e. names a different destination per event.
pub(crate) fn has_placeholders(template: &str) -> bool {
    template.contains('{')
}

/// Fills in a checked template in one pass, so a portal or event name containing `{event}`
/// is copied as it is. An unchecked template that does not parse is returned as it is.
pub(crate) fn render(template: &str, portal: &str, event: &str) -> String {
    let Ok(pieces) = parse(template) else {
        return template.to_string();
    };
    let mut out = String::with_capacity(template.len() + portal.len() + event.len());
    for piece in pieces {
        out.push_str(match piece {
            Piece::Text(text) => text,
            Piece::Portal => portal,
            Piece::Event => event,
        });
    }
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
        assert_eq!(
            parse("a{portal}b"),
            Ok(vec![Piece::Text("a"), Piece::Portal, Piece::Text("b")])
        );
        assert_eq!(parse("{x}"), Err(TemplateError::Unknown("x")));
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
