//! The layering of `bitrix/` (ARCHITECTURE.md, `bitrix/`) as a test read from the sources:
//! which module may import which, so that no two modules use each other. A new module of
//! `bitrix/` or of `bitrix/client/` fails this test until it is given its place here.

/// The modules of `bitrix/` beside `client`, with the siblings each may import (whole files,
/// unit tests included). `client` may import all of them; none imports `client`.
const MODULES: &[(&str, &str, &[&str])] = &[
    ("body", include_str!("body.rs"), &[]),
    ("entities", include_str!("entities.rs"), &[]),
    ("error", include_str!("error.rs"), &[]),
    ("form", include_str!("form.rs"), &[]),
    ("ratelimit", include_str!("ratelimit.rs"), &[]),
    ("types", include_str!("types.rs"), &[]),
    ("operating", include_str!("operating.rs"), &["types"]),
    (
        "oauth",
        include_str!("oauth.rs"),
        &["body", "error", "form", "types"],
    ),
];

/// The children of `client` by rank: a child's code (its unit tests aside) uses its parent and
/// children of a lower rank only, by import or by calling a `PortalClient` method they define.
const CLIENT_CHILDREN: &[(&str, u8, &str)] = &[
    ("stats", 0, include_str!("client/stats.rs")),
    ("limits", 1, include_str!("client/limits.rs")),
    ("tokens", 1, include_str!("client/tokens.rs")),
    ("transport", 2, include_str!("client/transport.rs")),
    ("offline", 3, include_str!("client/offline.rs")),
    ("operator", 3, include_str!("client/operator.rs")),
];

/// A source file without its unit tests.
fn code(source: &str) -> &str {
    source
        .split("#[cfg(test)]\nmod tests")
        .next()
        .unwrap_or(source)
}

/// The identifier `text` starts with (after blanks); empty for `*` or `{`.
fn ident(text: &str) -> &str {
    let text = text.trim_start();
    let end = text
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(text.len());
    &text[..end]
}

/// The first segment of every path after `prefix`: `a` of `prefix a::b`, and `a` and `c` of
/// `prefix {a::{b, d}, c}`.
fn first_segments<'a>(source: &'a str, prefix: &str) -> Vec<&'a str> {
    let mut names = Vec::new();
    for (at, _) in source.match_indices(prefix) {
        let rest = &source[at + prefix.len()..];
        let Some(group) = rest.strip_prefix('{') else {
            names.push(ident(rest));
            continue;
        };
        let (mut depth, mut start) = (0, 0);
        for (i, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    names.push(ident(&group[start..i]));
                    break;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    names.push(ident(&group[start..i]));
                    start = i + 1;
                }
                _ => {}
            }
        }
    }
    names.retain(|name| !name.is_empty() && *name != "self");
    names
}

/// The modules `mod.rs` declares, test-only ones aside.
fn declared(mod_rs: &str) -> Vec<&str> {
    let mut lines = mod_rs.lines().peekable();
    let mut names = Vec::new();
    while let Some(line) = lines.next() {
        if line.trim() == "#[cfg(test)]" {
            lines.next();
            continue;
        }
        if let Some(rest) = line.strip_prefix("pub mod ").or(line.strip_prefix("mod ")) {
            names.push(ident(rest));
        }
    }
    names
}

/// The methods a file defines in `impl PortalClient` blocks (its unit tests aside).
fn client_methods(source: &str) -> Vec<&str> {
    let mut names = Vec::new();
    for block in code(source).split("impl PortalClient {").skip(1) {
        let body = &block[..block.find("\n}\n").unwrap_or(block.len())];
        names.extend(
            body.match_indices("fn ")
                .map(|(at, _)| ident(&body[at + 3..])),
        );
    }
    names
}

#[test]
fn every_module_has_its_place() {
    let known: Vec<&str> = MODULES.iter().map(|(name, ..)| *name).collect();
    for name in declared(include_str!("mod.rs")) {
        assert!(
            name == "client" || known.contains(&name),
            "bitrix::{name} has no place in MODULES"
        );
    }
    let children: Vec<&str> = CLIENT_CHILDREN.iter().map(|(name, ..)| *name).collect();
    for name in declared(include_str!("client/mod.rs")) {
        assert!(
            children.contains(&name),
            "bitrix::client::{name} has no place in CLIENT_CHILDREN"
        );
    }
}

#[test]
fn modules_import_only_the_modules_below_them() {
    let mut siblings: Vec<&str> = MODULES.iter().map(|(name, ..)| *name).collect();
    siblings.push("client");
    let mut wrong = Vec::new();
    for (name, source, allowed) in MODULES {
        for prefix in ["super::", "crate::bitrix::"] {
            for used in first_segments(source, prefix) {
                let sibling = siblings.contains(&used) && used != *name;
                let facade = used.starts_with(char::is_uppercase);
                if (sibling && !allowed.contains(&used)) || facade {
                    wrong.push(format!("{name} uses {prefix}{used}"));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn client_children_use_only_lower_ranks() {
    let mut wrong = Vec::new();
    for (name, rank, source) in CLIENT_CHILDREN {
        let code = code(source);
        for (other, other_rank, other_source) in CLIENT_CHILDREN {
            if other == name || other_rank < rank {
                continue;
            }
            for prefix in ["super::", "crate::bitrix::client::"] {
                if first_segments(code, prefix).contains(other) {
                    wrong.push(format!("{name} imports {other}"));
                }
            }
            for method in client_methods(other_source) {
                if code.contains(&format!(".{method}(")) {
                    wrong.push(format!("{name} calls {other}'s {method}"));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn the_checks_see_what_they_look_for() {
    let source = "use super::{error::{A, B}, form};\nuse crate::bitrix::client::X;\n";
    assert_eq!(first_segments(source, "super::"), ["error", "form"]);
    assert_eq!(first_segments(source, "crate::bitrix::"), ["client"]);
    assert_eq!(
        declared("mod a;\npub mod b;\n#[cfg(test)]\nmod c;\n"),
        ["a", "b"]
    );
    let methods = client_methods(include_str!("client/stats.rs"));
    assert!(methods.contains(&"stat"), "{methods:?}");
    assert!(client_methods(include_str!("client/transport.rs")).contains(&"call"));
}
