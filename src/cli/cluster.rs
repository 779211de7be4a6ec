//! `b24eventd cluster status`: the instances sharing a PostgreSQL journal, their heartbeats, and
//! each portal's lease (owner, epoch, time left, handovers), as a table or one JSON document.

use super::report::{self, Table};
use crate::config::Config;
use crate::journal::{InstanceRow, Journal, LeaseRow};

/// The `--json` document.
#[derive(serde::Serialize)]
struct ClusterReport {
    journal: String,
    /// Whether several instances can share this journal (PostgreSQL).
    shared: bool,
    instances: Vec<InstanceReport>,
    leases: Vec<LeaseRow>,
}

#[derive(serde::Serialize)]
struct InstanceReport {
    #[serde(flatten)]
    row: InstanceRow,
    /// Seconds since its last heartbeat.
    heartbeat_age: f64,
    /// Its heartbeat has not run out.
    live: bool,
}

pub(super) async fn status(config: Config, json: bool) -> anyhow::Result<()> {
    let location = config.journal.location();
    if config.journal.postgres.is_none() {
        if json {
            return report::print_json(&ClusterReport {
                journal: location,
                shared: false,
                instances: Vec::new(),
                leases: Vec::new(),
            });
        }
        outln!(
            "journal {location} is SQLite: it is not shared, one daemon works every portal (set [journal] url to run several instances)"
        )?;
        return Ok(());
    }
    // A command that only looks must not create the journal.
    let Some(journal) = Journal::open_existing(&config.journal).await? else {
        outln!("there is no journal in {location} yet: no instance has run")?;
        return Ok(());
    };
    let table = journal
        .lease_table()
        .ok_or_else(|| anyhow::anyhow!("journal {location} has no lease table"))?;
    let (instances, leases) = table.status().await?;
    let now = chrono::Utc::now();
    let instances: Vec<InstanceReport> = instances
        .into_iter()
        .map(|row| InstanceReport {
            heartbeat_age: (now - row.heartbeat_at).num_milliseconds().max(0) as f64 / 1000.0,
            live: row.expires_in > 0.0,
            row,
        })
        .collect();
    let report = ClusterReport {
        journal: location,
        shared: true,
        instances,
        leases,
    };
    if json {
        return report::print_json(&report);
    }
    outln!("journal {}", report.journal)?;
    let mut table = Table::new(&[
        "INSTANCE",
        "HOST",
        "PID",
        "VERSION",
        "HEARTBEAT",
        "LIVE",
        "PORTALS",
    ]);
    for i in &report.instances {
        let owned = report
            .leases
            .iter()
            .filter(|l| l.owner.as_deref() == Some(i.row.id.as_str()) && !l.expired())
            .count();
        table.row(vec![
            i.row.id.clone(),
            i.row.host.clone(),
            i.row.pid.to_string(),
            i.row.version.clone(),
            format!("{:.1} s ago", i.heartbeat_age),
            if i.live { "yes" } else { "no" }.to_string(),
            owned.to_string(),
        ]);
    }
    out!("{}", table.render())?;
    outln!()?;
    let mut table = Table::new(&["PORTAL", "OWNER", "EPOCH", "LEASE LEFT", "HANDOVERS"]);
    for l in &report.leases {
        let (owner, left) = if l.expired() {
            ("-".to_string(), "free".to_string())
        } else {
            (
                l.owner.clone().unwrap_or_default(),
                format!("{:.1} s", l.expires_in.unwrap_or_default()),
            )
        };
        table.row(vec![
            l.portal.clone(),
            owner,
            l.epoch.to_string(),
            left,
            l.handovers.to_string(),
        ]);
    }
    out!("{}", table.render())?;
    let unowned = report.leases.iter().filter(|l| l.expired()).count();
    if unowned > 0 {
        outln!(
            "\n{unowned} portals have no owner: no instance is live, or they are being handed over"
        )?;
    }
    Ok(())
}
