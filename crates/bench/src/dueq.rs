//! The dispatcher's owned-portal query on PostgreSQL (`due_deliveries`, the journal's own SQL
//! text) timed with `EXPLAIN ANALYZE` on the cluster bench's journal after its daemons
//! stopped: every delivery made pending again, the filter one instance's share of the portal
//! names (a third), all of them, or none (`NULL`, as a daemon alone). Two layouts: every
//! portal's deliveries due, and only the other instances' (the share has nothing due, so the
//! query walks every due row of the others before it answers empty), each with the plan
//! PostgreSQL makes for these values (custom) and the one it reuses for any (generic), since
//! the daemon's statement is prepared once and run again and again.

use super::Report;

/// The file sink's name in the bench configs, and its batch (`MAX_BATCH`): the query's limit.
const SINK: &str = "archive";
const LIMIT: i64 = 500;
/// Runs per measurement; the fastest is kept (the machine is shared).
const RUNS: usize = 3;

/// `ARRAY['a','b']::text[]` (names are `pNNNNN`, no quoting needed beyond the quotes).
fn array_literal(names: &[&String]) -> String {
    let mut text = String::from("ARRAY[");
    for (i, name) in names.iter().enumerate() {
        if i > 0 {
            text.push(',');
        }
        text.push('\'');
        text.push_str(name);
        text.push('\'');
    }
    text.push_str("]::text[]");
    text
}

/// `Execution Time: 12.345 ms` of an `EXPLAIN ANALYZE` text.
pub fn execution_ms(plan: &[String]) -> Option<f64> {
    plan.iter().find_map(|line| {
        line.trim()
            .strip_prefix("Execution Time:")?
            .trim()
            .strip_suffix("ms")?
            .trim()
            .parse()
            .ok()
    })
}

/// The fastest of [`RUNS`] executions of the prepared `due` with `filter`, in ms, and the plan
/// of the last one.
async fn time(client: &tokio_postgres::Client, filter: &str) -> anyhow::Result<(f64, Vec<String>)> {
    let mut best = f64::MAX;
    let mut plan = Vec::new();
    for _ in 0..RUNS {
        let rows = client
            .simple_query(&format!(
                "EXPLAIN (ANALYZE, BUFFERS) EXECUTE due('{SINK}', now(), {LIMIT}, {filter})"
            ))
            .await?;
        plan = rows
            .iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            })
            .collect();
        best = best.min(
            execution_ms(&plan).ok_or_else(|| anyhow::anyhow!("no execution time in {plan:?}"))?,
        );
    }
    Ok((best, plan))
}

/// Measures the query on the journal `client`'s `search_path` names (the daemons stopped).
pub async fn measure(
    client: &tokio_postgres::Client,
    names: &[String],
    report: &mut Report,
) -> anyhow::Result<()> {
    let share: Vec<&String> = names.iter().step_by(3).collect();
    let all: Vec<&String> = names.iter().collect();
    let share_literal = array_literal(&share);
    let all_literal = array_literal(&all);
    let rows: i64 = client
        .query_one("SELECT count(*) FROM deliveries", &[])
        .await?
        .get(0);
    report.setup.push(format!(
        "dueq: due_deliveries' statement (the journal's text) prepared once, EXPLAIN (ANALYZE) of \
{RUNS} runs each (fastest kept), limit {LIMIT}, on the {rows} deliveries of the run made pending \
again; filter: one instance's share ({} names), all {} names, or NULL",
        share.len(),
        all.len()
    ));
    client
        .batch_execute(&format!(
            "PREPARE due(text, timestamptz, bigint, text[]) AS {}",
            b24eventd::journal::due_deliveries_sql()
        ))
        .await?;
    let layouts = [
        ("every portal due", None),
        ("only the others' portals due", Some(&share_literal)),
    ];
    for (layout, not_due) in layouts {
        client
            .batch_execute(
                "UPDATE deliveries SET status = 'pending',
                        next_attempt_at = now() - interval '1 minute'",
            )
            .await?;
        if let Some(not_due) = not_due {
            client
                .batch_execute(&format!(
                    "UPDATE deliveries SET status = 'delivered' WHERE event_id IN
                     (SELECT id FROM events WHERE portal = ANY({not_due}))"
                ))
                .await?;
        }
        client
            .batch_execute("ANALYZE deliveries; ANALYZE events")
            .await?;
        for mode in ["force_custom_plan", "force_generic_plan"] {
            client
                .batch_execute(&format!("SET plan_cache_mode = {mode}"))
                .await?;
            let plan_name = mode.trim_start_matches("force_").trim_end_matches("_plan");
            for (filter_name, filter) in [
                ("share", share_literal.as_str()),
                ("all names", all_literal.as_str()),
                ("NULL", "NULL"),
            ] {
                let (ms, plan) = time(client, filter).await?;
                report.row(
                    &format!("due query, {layout}"),
                    &format!("filter {filter_name}, {plan_name} plan"),
                    ms,
                    "ms",
                );
                if filter_name == "share" && not_due.is_some() && plan_name == "generic" {
                    eprintln!("dueq plan ({layout}, {filter_name}, {plan_name}):");
                    for line in &plan {
                        eprintln!("  {line}");
                    }
                }
            }
        }
    }
    client
        .batch_execute("RESET plan_cache_mode; DEALLOCATE due")
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_execution_time_is_read_from_the_plan() {
        let plan = vec![
            "Limit  (cost=0.29..1.00 rows=1 width=8) (actual time=0.010..0.011 rows=0 loops=1)"
                .to_string(),
            "Planning Time: 0.100 ms".to_string(),
            "Execution Time: 12.345 ms".to_string(),
        ];
        assert_eq!(execution_ms(&plan), Some(12.345));
        assert_eq!(execution_ms(&plan[..2]), None);
    }

    #[test]
    fn names_become_a_text_array() {
        let (a, b) = ("p00001".to_string(), "p00002".to_string());
        assert_eq!(array_literal(&[&a, &b]), "ARRAY['p00001','p00002']::text[]");
    }
}
