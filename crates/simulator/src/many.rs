//! Many simulated portals on one listener (`Simulator::start_many`): each portal's own router
//! is reached under `/p/NAME/...`, the prefix taken off before it sees the request, so its
//! routes and answers are those of a portal served alone.

use super::Inner;
use super::http::{json_value, router as portal_router};
use axum::Router;
use axum::extract::Request;
use axum::http::Uri;
use axum::response::Response;
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use tower_service::Service as _;

/// What every portal's path starts with, before its name.
pub(crate) const PREFIX: &str = "/p/";

/// A portal name usable in a path: letters, digits, `_` and `-`.
pub(crate) fn check_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        anyhow::bail!("portal name {name:?} cannot be a path segment");
    }
    Ok(())
}

/// One router in front of every portal's: finds the portal by the segment after `/p/` (one
/// hash lookup, whatever their number) and hands it the request with the rest of the path.
pub(crate) fn router(portals: impl Iterator<Item = (String, Arc<Inner>)>) -> Router {
    let routers: Arc<HashMap<String, Router>> = Arc::new(
        portals
            .map(|(name, inner)| (name, portal_router(inner)))
            .collect(),
    );
    Router::new().fallback(move |request: Request| {
        let routers = routers.clone();
        async move { dispatch(&routers, request).await }
    })
}

async fn dispatch(routers: &HashMap<String, Router>, mut request: Request) -> Response {
    let Some((name, rest)) = split(request.uri()) else {
        return unknown_portal();
    };
    let Some(portal) = routers.get(&name) else {
        return unknown_portal();
    };
    *request.uri_mut() = rest;
    match portal.clone().call(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

/// `/p/NAME/rest/x?q` → `NAME` and `/rest/x?q`.
fn split(uri: &Uri) -> Option<(String, Uri)> {
    let path = uri.path().strip_prefix(PREFIX)?;
    let (name, rest) = match path.find('/') {
        Some(i) => (&path[..i], &path[i..]),
        None => (path, "/"),
    };
    let rest = match uri.query() {
        Some(query) => format!("{rest}?{query}"),
        None => rest.to_string(),
    };
    Some((name.to_string(), rest.parse().ok()?))
}

fn unknown_portal() -> Response {
    json_value(
        404,
        &json!({"error": "NOT_FOUND", "error_description": "no such portal on this listener"}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefix_and_name_are_taken_off_the_path() {
        let uri: Uri = "/p/p00042/rest/event.offline.get.json?auth=x"
            .parse()
            .unwrap();
        let (name, rest) = split(&uri).unwrap();
        assert_eq!(name, "p00042");
        assert_eq!(rest.path(), "/rest/event.offline.get.json");
        assert_eq!(rest.query(), Some("auth=x"));
        let (name, rest) = split(&"/p/a".parse().unwrap()).unwrap();
        assert_eq!((name.as_str(), rest.path()), ("a", "/"));
        assert!(split(&"/rest/x".parse().unwrap()).is_none());
    }

    #[test]
    fn names_must_be_path_segments() {
        assert!(check_name("p00001").is_ok());
        assert!(check_name("a-b_c").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_name("a?b").is_err());
    }
}
