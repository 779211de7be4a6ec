//! Reload (SIGHUP): what a reloaded config changes about the running one.

use super::types::Config;

// Reload (SIGHUP)
// ---------------------------------------------------------------------------------------------

/// What a reloaded configuration changes about the sinks of a running one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SinkChanges {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Same name, different settings (routes, retry, type-specific keys...).
    pub changed: Vec<String>,
}

impl SinkChanges {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// Compares the sinks of the running config with a reloaded one.
pub fn sink_changes(running: &Config, reloaded: &Config) -> SinkChanges {
    let mut changes = SinkChanges::default();
    for (name, sink) in &reloaded.sinks {
        match running.sinks.get(name) {
            None => changes.added.push(name.clone()),
            Some(old) if old != sink => changes.changed.push(name.clone()),
            Some(_) => {}
        }
    }
    for name in running.sinks.keys() {
        if !reloaded.sinks.contains_key(name) {
            changes.removed.push(name.clone());
        }
    }
    changes
}

/// The keys a reloaded config changes that only take effect after a restart: everything but
/// `[sinks.*]` (the journal, the admin endpoint, the shutdown timeout, and any portal).
pub fn changes_needing_restart(running: &Config, reloaded: &Config) -> Vec<String> {
    let mut keys = Vec::new();
    if running.journal != reloaded.journal {
        keys.push("journal".to_string());
    }
    if running.admin != reloaded.admin {
        keys.push("admin".to_string());
    }
    if running.shutdown_timeout != reloaded.shutdown_timeout {
        keys.push("shutdown_timeout".to_string());
    }
    if running.log_format != reloaded.log_format {
        keys.push("log_format".to_string());
    }
    if running.alerts != reloaded.alerts {
        keys.push("alerts".to_string());
    }
    for (name, portal) in &reloaded.portals {
        if running.portals.get(name) != Some(portal) {
            keys.push(format!("portals.{name}"));
        }
    }
    for name in running.portals.keys() {
        if !reloaded.portals.contains_key(name) {
            keys.push(format!("portals.{name}"));
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::*;

    #[test]
    fn reload_diff_names_sink_changes_and_restart_keys() {
        let base = format!(
            "{}\n[sinks.keep]\ntype = \"file\"\npath = \"/tmp/a.jsonl\"\n[sinks.edit]\ntype = \"file\"\npath = \"/tmp/b.jsonl\"\n[sinks.drop]\ntype = \"file\"\npath = \"/tmp/c.jsonl\"\n",
            portal("")
        );
        let running = load_str(&base, &[]).unwrap();
        let same = load_str(&base, &[]).unwrap();
        assert!(sink_changes(&running, &same).is_empty());
        assert!(changes_needing_restart(&running, &same).is_empty());

        let edited = base.replace("/tmp/b.jsonl", "/tmp/b2.jsonl").replace(
            "[sinks.drop]\ntype = \"file\"\npath = \"/tmp/c.jsonl\"\n",
            "",
        ) + "[sinks.new]\ntype = \"file\"\npath = \"/tmp/d.jsonl\"\n"
            + "[journal]\nretention = \"7d\"\n";
        let reloaded = load_str(&edited, &[]).unwrap();
        assert_eq!(
            sink_changes(&running, &reloaded),
            SinkChanges {
                added: vec!["new".into()],
                removed: vec!["drop".into()],
                changed: vec!["edit".into()],
            }
        );
        assert_eq!(
            changes_needing_restart(&running, &reloaded),
            vec!["journal"]
        );

        let portal_edit = base.replace("client_id = ", "batch_size = 10\nclient_id = ");
        let reloaded = load_str(&portal_edit, &[]).unwrap();
        assert_eq!(
            changes_needing_restart(&running, &reloaded),
            vec!["portals.main"]
        );
    }

    /// Every key a reload cannot apply is in the runbook's and the README's restart list
    /// (docs/OPERATIONS.md "Changing the configuration", README "SIGHUP").
    #[test]
    fn the_documented_restart_list_is_the_codes() {
        let sinks = "[sinks.keep]\ntype = \"file\"\npath = \"/tmp/a.jsonl\"\n";
        let running = load_str(&format!("{}{sinks}", portal("")), &[]).unwrap();
        let everything = format!(
            "shutdown_timeout = \"7s\"\nlog_format = \"json\"\n{}{sinks}\
             [journal]\nretention = \"7d\"\n[admin]\nlisten = \"\"\n[alerts]\nsink = \"keep\"\n",
            portal("batch_size = 10")
        );
        let reloaded = load_str(&everything, &[]).unwrap();
        let keys = changes_needing_restart(&running, &reloaded);
        assert_eq!(
            keys,
            [
                "journal",
                "admin",
                "shutdown_timeout",
                "log_format",
                "alerts",
                "portals.main"
            ]
        );
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        for doc in ["docs/OPERATIONS.md", "README.md"] {
            let text = std::fs::read_to_string(root.join(doc)).unwrap();
            let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
            let list = flat
                .split(". ")
                .find(|sentence| sentence.starts_with("Changes to `[journal]`"))
                .unwrap_or_else(|| panic!("{doc} has no restart list"));
            for key in &keys {
                let spelled = match key.as_str() {
                    "journal" | "admin" | "alerts" => format!("`[{key}]`"),
                    k if k.starts_with("portals.") => "`[portals.*]`".to_string(),
                    k => format!("`{k}`"),
                };
                assert!(list.contains(&spelled), "{doc}: {list:?} lacks {spelled}");
            }
        }
    }
}
