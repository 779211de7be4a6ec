//! The cron schedules that wake the pollers and the prune job: one job per distinct schedule
//! (portals on the same schedule share it), planned again after the wall clock was set back.

use crate::config::Config;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::Notify;
use tokio_cron_scheduler::{Job, JobScheduler};

/// A wake-up flag set by a schedule (or by the poller itself) and taken by the poller.
#[derive(Default)]
pub(crate) struct Trigger {
    flag: AtomicBool,
    pub(super) notify: Notify,
}

impl Trigger {
    pub(crate) fn set(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.notify.notify_one();
    }

    /// Sets the flag without waking the poller (used by the poller on itself).
    pub(super) fn set_quietly(&self) {
        self.flag.store(true, Ordering::SeqCst);
    }

    pub(super) fn take(&self) -> bool {
        self.flag.swap(false, Ordering::SeqCst)
    }

    /// Waits until the trigger is set, and takes it.
    pub(crate) async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            if self.take() {
                return;
            }
            notified.await;
        }
    }
}

/// The schedule-driven work of one portal.
#[derive(Clone, Default)]
pub(crate) struct Triggers {
    pub(crate) error_lane: Arc<Trigger>,
    pub(crate) orphan_sweep: Arc<Trigger>,
    /// Set on SIGHUP: a portal stopped by an error that needed an operator tries again now,
    /// instead of at the end of its `FATAL_RETRY` wait.
    pub(crate) resume: Arc<Trigger>,
}

/// The cron schedules (tokio-cron-scheduler, local time, with seconds) of every portal.
pub(crate) struct Schedules {
    scheduler: JobScheduler,
    plan: Plan,
    /// The jobs now registered, one per cron plan.
    jobs: Vec<Job>,
}

/// What the schedules set: one cron job per distinct schedule, and each portal's triggers.
struct Plan {
    jobs: Vec<CronPlan>,
    triggers: HashMap<String, Triggers>,
    prune: Arc<Trigger>,
}

/// One cron job: its schedule, the config key that names it (for errors), the triggers it sets.
struct CronPlan {
    schedule: String,
    key: String,
    triggers: Arc<Vec<Arc<Trigger>>>,
}

/// One job per distinct schedule, setting the triggers of every portal on it (named for errors
/// by the first key that gives it), then the prune job. `portals`: each portal's name, error
/// lane schedule and orphan sweep schedule.
fn plan<'a>(
    portals: impl IntoIterator<Item = (&'a str, &'a str, &'a str)>,
    prune_schedule: &str,
) -> Plan {
    let mut triggers = HashMap::new();
    // schedule → (the first key that names it, for errors; the triggers it sets)
    let mut jobs: BTreeMap<String, (String, Vec<Arc<Trigger>>)> = BTreeMap::new();
    for (portal, error_lane, orphan_sweep) in portals {
        let t = Triggers::default();
        for (what, schedule, trigger) in [
            ("error_lane_schedule", error_lane, t.error_lane.clone()),
            (
                "orphan_sweep_schedule",
                orphan_sweep,
                t.orphan_sweep.clone(),
            ),
        ] {
            jobs.entry(schedule.to_string())
                .or_insert_with(|| (format!("portals.{portal}.{what}"), Vec::new()))
                .1
                .push(trigger);
        }
        triggers.insert(portal.to_string(), t);
    }
    let prune = Arc::new(Trigger::default());
    let mut jobs: Vec<_> = jobs
        .into_iter()
        .map(|(schedule, (key, set))| CronPlan {
            schedule,
            key,
            triggers: Arc::new(set),
        })
        .collect();
    jobs.push(CronPlan {
        schedule: prune_schedule.to_string(),
        key: "journal.prune_schedule".to_string(),
        triggers: Arc::new(vec![prune.clone()]),
    });
    Plan {
        jobs,
        triggers,
        prune,
    }
}

impl Schedules {
    /// One cron job per distinct schedule, setting the triggers of every portal on it: a
    /// thousand portals on the default schedules make two jobs, not two thousand.
    pub(crate) async fn start(config: &Config) -> anyhow::Result<Schedules> {
        let portals = config.portals.values().map(|p| {
            (
                p.name.as_str(),
                p.error_lane_schedule.as_str(),
                p.orphan_sweep_schedule.as_str(),
            )
        });
        Schedules::run(plan(portals, &config.journal.prune_schedule)).await
    }

    async fn run(plan: Plan) -> anyhow::Result<Schedules> {
        let mut schedules = Schedules {
            scheduler: JobScheduler::new().await?,
            plan,
            jobs: Vec::new(),
        };
        schedules.add_jobs().await?;
        schedules.scheduler.start().await?;
        Ok(schedules)
    }

    /// Registers one cron job per plan; each computes its next run from the wall clock now.
    async fn add_jobs(&mut self) -> anyhow::Result<()> {
        for plan in &self.plan.jobs {
            let set = plan.triggers.clone();
            let job = Job::new_async_tz(plan.schedule.as_str(), chrono::Local, move |_, _| {
                for trigger in set.iter() {
                    trigger.set();
                }
                Box::pin(async {})
            })
            .map_err(|e| anyhow::anyhow!("{}: invalid schedule: {e}", plan.key))?;
            self.scheduler.add(job.clone()).await?;
            self.jobs.push(job);
        }
        Ok(())
    }

    /// Plans every cron job again from the wall clock now. The scheduler computes a job's next
    /// run once, in wall time: after the clock was set back by an hour, every job would wait
    /// an hour longer than its schedule says.
    pub(crate) async fn replan(&mut self) {
        for job in std::mem::take(&mut self.jobs) {
            if let Err(e) = self.scheduler.remove(&job.guid()).await {
                tracing::warn!(error = %e, "cron job could not be removed for replanning");
            }
        }
        if let Err(e) = self.add_jobs().await {
            tracing::error!(
                error = format!("{e:#}"),
                "cron jobs could not be planned again"
            );
        }
    }

    /// Set on `journal.prune_schedule`.
    pub(crate) fn prune_trigger(&self) -> Arc<Trigger> {
        self.plan.prune.clone()
    }

    /// Wakes every portal stopped by an error that needed an operator (the operator says the
    /// cause is fixed by reloading).
    pub(crate) fn resume_stopped(&self) {
        for t in self.plan.triggers.values() {
            t.resume.set();
        }
    }

    pub(crate) fn triggers(&self, portal: &str) -> Triggers {
        self.plan.triggers.get(portal).cloned().unwrap_or_default()
    }

    pub(crate) async fn stop(mut self) {
        if let Err(e) = self.scheduler.shutdown().await {
            tracing::warn!(error = %e, "cron scheduler did not stop cleanly");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const HOURLY: &str = "0 0 * * * *";
    const NIGHTLY: &str = "0 30 3 * * *";
    const EVERY_SECOND: &str = "* * * * * *";

    fn keys(plan: &Plan) -> Vec<(&str, &str, usize)> {
        plan.jobs
            .iter()
            .map(|j| (j.schedule.as_str(), j.key.as_str(), j.triggers.len()))
            .collect()
    }

    #[test]
    fn portals_on_the_same_schedules_share_one_job_per_schedule_and_prune_comes_last() {
        let plan = plan(
            [
                ("a", HOURLY, NIGHTLY),
                ("b", HOURLY, NIGHTLY),
                ("c", HOURLY, NIGHTLY),
            ],
            NIGHTLY,
        );
        assert_eq!(
            keys(&plan),
            vec![
                (HOURLY, "portals.a.error_lane_schedule", 3),
                (NIGHTLY, "portals.a.orphan_sweep_schedule", 3),
                (NIGHTLY, "journal.prune_schedule", 1),
            ]
        );
        assert_eq!(plan.triggers.len(), 3);
    }

    #[test]
    fn an_error_lane_and_a_sweep_on_one_schedule_share_its_job() {
        let plan = plan([("a", HOURLY, HOURLY), ("b", NIGHTLY, HOURLY)], HOURLY);
        assert_eq!(
            keys(&plan),
            vec![
                (HOURLY, "portals.a.error_lane_schedule", 3),
                (NIGHTLY, "portals.b.error_lane_schedule", 1),
                (HOURLY, "journal.prune_schedule", 1),
            ]
        );
    }

    #[test]
    fn a_job_sets_exactly_the_triggers_of_the_portals_on_its_schedule() {
        let plan = plan([("a", HOURLY, NIGHTLY), ("b", NIGHTLY, HOURLY)], NIGHTLY);
        for trigger in plan.jobs[0].triggers.iter() {
            trigger.set();
        }
        let (a, b) = (&plan.triggers["a"], &plan.triggers["b"]);
        assert!(a.error_lane.take());
        assert!(b.orphan_sweep.take());
        assert!(!a.orphan_sweep.take());
        assert!(!b.error_lane.take());
        assert!(!plan.prune.take());
    }

    #[test]
    fn a_trigger_is_taken_once_and_a_quiet_set_is_taken_too() {
        let trigger = Trigger::default();
        assert!(!trigger.take());
        trigger.set();
        assert!(trigger.take());
        assert!(!trigger.take());
        trigger.set_quietly();
        assert!(trigger.take());
    }

    #[tokio::test]
    async fn an_invalid_schedule_is_refused_naming_its_key() {
        let refused = Schedules::run(plan([("a", "every hour", HOURLY)], NIGHTLY)).await;
        let error = format!("{:#}", refused.err().expect("refused"));
        assert!(
            error.starts_with("portals.a.error_lane_schedule: invalid schedule"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn jobs_fire_and_fire_again_after_a_replan_without_doubling() {
        let mut schedules = Schedules::run(plan([("a", EVERY_SECOND, HOURLY)], HOURLY))
            .await
            .unwrap();
        let lane = schedules.triggers("a").error_lane;
        tokio::time::timeout(Duration::from_secs(5), lane.wait())
            .await
            .expect("the every-second job fired");
        let before: Vec<_> = schedules.jobs.iter().map(Job::guid).collect();
        schedules.replan().await;
        let after: Vec<_> = schedules.jobs.iter().map(Job::guid).collect();
        assert_eq!(after.len(), 3, "one job per plan, the old ones removed");
        assert!(after.iter().all(|guid| !before.contains(guid)));
        lane.take();
        tokio::time::timeout(Duration::from_secs(5), lane.wait())
            .await
            .expect("the replanned job fired");
        assert!(!schedules.triggers("a").orphan_sweep.take());
        schedules.stop().await;
    }
}
