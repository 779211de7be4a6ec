//! The supervisor of the daemon's long-running tasks (pollers, dispatchers, the prune job, the
//! alerts, the clock watch, the systemd notifier, the admin endpoint): a task that dies (panics
//! or returns an error) is logged at error with its cause, counted
//! (`b24eventd_task_restarts_total`), reported as not running (`/readyz`, the systemd watchdog)
//! and started again after a backoff; a task that keeps dying ([`GIVE_UP_DEATHS`] deaths within
//! [`GIVE_UP_WINDOW`]) makes the daemon stop and exit 70 ([`GaveUp`]), so that the service
//! manager restarts the whole process. A task that returns `Ok` has finished (at shutdown, or
//! for good, as a poller whose portal refused its mode): it is not restarted and not counted.

use crate::metrics::Metrics;
use futures_util::FutureExt;
use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The first pause before a dead task is started again; it doubles with each death within
/// [`GIVE_UP_WINDOW`], up to [`RESTART_BACKOFF_MAX`].
pub const RESTART_BACKOFF: Duration = Duration::from_secs(1);
pub const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// This many deaths of one task within [`GIVE_UP_WINDOW`] and the daemon gives up (exit 70).
pub const GIVE_UP_DEATHS: usize = 5;
pub const GIVE_UP_WINDOW: Duration = Duration::from_secs(10 * 60);
/// The exit code of a daemon that gave up on a task (sysexits `EX_SOFTWARE`).
pub const EXIT_SOFTWARE: u8 = 70;

/// When to restart and when to give up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    pub backoff: Duration,
    pub backoff_max: Duration,
    pub give_up_deaths: usize,
    pub give_up_window: Duration,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            backoff: RESTART_BACKOFF,
            backoff_max: RESTART_BACKOFF_MAX,
            give_up_deaths: GIVE_UP_DEATHS,
            give_up_window: GIVE_UP_WINDOW,
        }
    }
}

impl Policy {
    /// The pause before the restart that follows the `deaths`-th death within the window.
    pub fn backoff_after(&self, deaths: usize) -> Duration {
        let doublings = deaths.saturating_sub(1).min(16) as u32;
        self.backoff
            .saturating_mul(1u32 << doublings)
            .min(self.backoff_max)
    }
}

/// A task died too often: the daemon stops (draining as at a signal) and exits
/// [`EXIT_SOFTWARE`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "task {task} died {deaths} times within {window}: stopping so that the service manager restarts the daemon; last cause: {cause}"
)]
pub struct GaveUp {
    pub task: String,
    pub deaths: usize,
    pub window: String,
    pub cause: String,
}

/// A supervised task that is not running, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadTask {
    pub task: String,
    pub cause: String,
    /// Deaths within the window so far.
    pub deaths: usize,
}

#[derive(Debug)]
struct TaskState {
    /// Tells this registration from a later one of the same name.
    id: u64,
    /// `None` while running, else the cause of the death it is recovering from.
    dead: Option<String>,
    deaths: VecDeque<Instant>,
}

struct Inner {
    policy: Policy,
    metrics: Metrics,
    tasks: Mutex<BTreeMap<String, TaskState>>,
    next_id: AtomicU64,
    gave_up: Mutex<Option<GaveUp>>,
    /// Cancelled when a task gave up.
    gave_up_token: CancellationToken,
}

/// The supervisor; clones share it.
#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

impl Supervisor {
    /// A supervisor with the default [`Policy`], counting restarts in `metrics`.
    pub fn new(metrics: Metrics) -> Supervisor {
        Supervisor::with_policy(metrics, Policy::default())
    }

    pub fn with_policy(metrics: Metrics, policy: Policy) -> Supervisor {
        Supervisor {
            inner: Arc::new(Inner {
                policy,
                metrics,
                tasks: Mutex::new(BTreeMap::new()),
                next_id: AtomicU64::new(1),
                gave_up: Mutex::new(None),
                gave_up_token: CancellationToken::new(),
            }),
        }
    }

    fn tasks(&self) -> MutexGuard<'_, BTreeMap<String, TaskState>> {
        self.inner.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `make()` under supervision until it returns `Ok` (its value is returned) or `stop`
    /// is cancelled (then `None`: a task that ends, or dies, after `stop` was cancelled has
    /// finished, and is not restarted). A panic or an `Err` is a death: logged, counted,
    /// reported by [`Supervisor::dead`], and `make()` runs again after a backoff, unless the
    /// task died too often (then `None`, and [`Supervisor::gave_up`] fires). The returned
    /// future is meant to be spawned; dropping it drops the running task.
    pub fn supervise<T, F, Fut>(
        &self,
        name: impl Into<String>,
        stop: CancellationToken,
        mut make: F,
    ) -> impl Future<Output = Option<T>> + Send + 'static
    where
        T: Send + 'static,
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<T>> + Send + 'static,
    {
        let name = name.into();
        let this = self.clone();
        let id = this.inner.next_id.fetch_add(1, Ordering::Relaxed);
        this.tasks().insert(
            name.clone(),
            TaskState {
                id,
                dead: None,
                deaths: VecDeque::new(),
            },
        );
        async move {
            let result = this.run(&name, id, &stop, &mut make).await;
            let mut tasks = this.tasks();
            if tasks.get(&name).is_some_and(|t| t.id == id) {
                tasks.remove(&name);
            }
            result
        }
    }

    async fn run<T, F, Fut>(
        &self,
        name: &str,
        id: u64,
        stop: &CancellationToken,
        make: &mut F,
    ) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = anyhow::Result<T>>,
    {
        loop {
            let outcome = AssertUnwindSafe(make()).catch_unwind().await;
            let cause = match outcome {
                Ok(Ok(value)) => return Some(value),
                Ok(Err(e)) => format!("{e:#}"),
                Err(panic) => format!("panicked: {}", panic_message(panic.as_ref())),
            };
            if stop.is_cancelled() {
                tracing::warn!(task = name, cause = %cause, "a task failed while stopping");
                return None;
            }
            let policy = self.inner.policy;
            let deaths = self.died(name, id, &cause);
            if deaths >= policy.give_up_deaths {
                let gave_up = GaveUp {
                    task: name.to_string(),
                    deaths,
                    window: humantime::format_duration(policy.give_up_window).to_string(),
                    cause,
                };
                tracing::error!(task = name, deaths, error = %gave_up, "a task keeps dying: giving up");
                self.give_up(gave_up);
                return None;
            }
            let backoff = policy.backoff_after(deaths);
            tracing::error!(
                task = name,
                cause = %cause,
                deaths_in_window = deaths,
                restart_in = ?backoff,
                "a task died; restarting it"
            );
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.cancelled() => return None,
            }
            self.inner.metrics.task_restarted(name);
            if let Some(task) = self.tasks().get_mut(name).filter(|t| t.id == id) {
                task.dead = None;
            }
            tracing::info!(task = name, "task restarted");
        }
    }

    /// Records a death; returns the deaths within the window, this one included.
    fn died(&self, name: &str, id: u64, cause: &str) -> usize {
        let window = self.inner.policy.give_up_window;
        let now = Instant::now();
        let mut tasks = self.tasks();
        let Some(task) = tasks.get_mut(name).filter(|t| t.id == id) else {
            return 1;
        };
        task.dead = Some(cause.to_string());
        task.deaths.push_back(now);
        while task
            .deaths
            .front()
            .is_some_and(|at| now.duration_since(*at) > window)
        {
            task.deaths.pop_front();
        }
        task.deaths.len()
    }

    fn give_up(&self, gave_up: GaveUp) {
        let mut slot = self.inner.gave_up.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(gave_up);
        self.inner.gave_up_token.cancel();
    }

    /// The supervised tasks not running now (waiting for their restart, or given up on).
    pub fn dead(&self) -> Vec<DeadTask> {
        self.tasks()
            .iter()
            .filter_map(|(task, state)| {
                state.dead.as_ref().map(|cause| DeadTask {
                    task: task.clone(),
                    cause: cause.clone(),
                    deaths: state.deaths.len(),
                })
            })
            .collect()
    }

    /// Whether every supervised task is running.
    pub fn all_alive(&self) -> bool {
        self.tasks().values().all(|t| t.dead.is_none())
    }

    /// The names of the supervised tasks (running or waiting for a restart).
    pub fn names(&self) -> Vec<String> {
        self.tasks().keys().cloned().collect()
    }

    /// Waits until a task died too often, and says which.
    pub async fn gave_up(&self) -> GaveUp {
        self.inner.gave_up_token.cancelled().await;
        self.given_up().unwrap_or_else(|| GaveUp {
            task: "unknown".to_string(),
            deaths: 0,
            window: String::new(),
            cause: String::new(),
        })
    }

    /// The task given up on, if any.
    pub fn given_up(&self) -> Option<GaveUp> {
        self.inner
            .gave_up
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The message of a panic payload (`panic!("...")` gives a `&str` or a `String`).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    fn fast() -> Policy {
        Policy {
            backoff: Duration::from_millis(20),
            backoff_max: Duration::from_millis(80),
            give_up_deaths: 3,
            give_up_window: Duration::from_secs(60),
        }
    }

    fn restarts(metrics: &Metrics, task: &str) -> Option<String> {
        let needle = format!("b24eventd_task_restarts_total{{task=\"{task}\"}} ");
        metrics
            .render()
            .lines()
            .find_map(|l| l.strip_prefix(&needle).map(str::to_string))
    }

    async fn until(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[test]
    fn the_backoff_doubles_up_to_its_cap() {
        let p = Policy::default();
        let waits: Vec<u64> = (1..=8).map(|d| p.backoff_after(d).as_secs()).collect();
        assert_eq!(waits, vec![1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(p.backoff_after(usize::MAX), RESTART_BACKOFF_MAX);
    }

    #[tokio::test]
    async fn a_task_that_panics_is_reported_dead_counted_and_restarted() {
        let metrics = Metrics::new(Vec::new());
        let policy = Policy {
            backoff: Duration::from_millis(300),
            ..fast()
        };
        let sup = Supervisor::with_policy(metrics.clone(), policy);
        let runs = Arc::new(AtomicU32::new(0));
        let stop = CancellationToken::new();
        let task = {
            let runs = runs.clone();
            let stop = stop.clone();
            tokio::spawn(sup.supervise("poller/main", stop.clone(), move || {
                let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
                let stop = stop.clone();
                async move {
                    if run == 1 {
                        panic!("operating_reset_at out of range");
                    }
                    stop.cancelled().await;
                    Ok(run)
                }
            }))
        };
        until("the death", || !sup.dead().is_empty()).await;
        let dead = sup.dead();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].task, "poller/main");
        assert_eq!(dead[0].cause, "panicked: operating_reset_at out of range");
        assert!(!sup.all_alive());
        assert_eq!(restarts(&metrics, "poller/main"), None, "not restarted yet");
        until("the restart", || runs.load(Ordering::SeqCst) == 2).await;
        assert!(sup.all_alive(), "running again");
        assert_eq!(restarts(&metrics, "poller/main").as_deref(), Some("1"));
        assert_eq!(sup.names(), vec!["poller/main".to_string()]);
        // Shutdown: the task finishes, which is not a death.
        stop.cancel();
        assert_eq!(task.await.unwrap(), Some(2));
        assert!(
            sup.names().is_empty(),
            "a finished task is no longer supervised"
        );
        assert_eq!(restarts(&metrics, "poller/main").as_deref(), Some("1"));
        assert_eq!(sup.given_up(), None);
    }

    #[tokio::test]
    async fn an_error_return_is_a_death_and_a_task_that_keeps_dying_gives_up() {
        let metrics = Metrics::new(Vec::new());
        let sup = Supervisor::with_policy(metrics.clone(), fast());
        let runs = Arc::new(AtomicU32::new(0));
        let counted = runs.clone();
        let result = sup
            .supervise("prune", CancellationToken::new(), move || {
                counted.fetch_add(1, Ordering::SeqCst);
                async { Err::<(), _>(anyhow::anyhow!("journal /x: disk I/O error")) }
            })
            .await;
        assert_eq!(result, None);
        assert_eq!(
            runs.load(Ordering::SeqCst),
            3,
            "two restarts, then it gave up"
        );
        assert_eq!(restarts(&metrics, "prune").as_deref(), Some("2"));
        let gave_up = tokio::time::timeout(Duration::from_secs(1), sup.gave_up())
            .await
            .expect("gave up");
        assert_eq!(gave_up.task, "prune");
        assert_eq!(gave_up.deaths, 3);
        assert_eq!(gave_up.cause, "journal /x: disk I/O error");
        assert!(
            gave_up
                .to_string()
                .contains("task prune died 3 times within 1m")
        );
    }

    #[tokio::test]
    async fn stopping_during_the_backoff_or_a_failure_while_stopping_is_no_death() {
        let metrics = Metrics::new(Vec::new());
        let policy = Policy {
            backoff: Duration::from_secs(3600),
            ..fast()
        };
        let sup = Supervisor::with_policy(metrics.clone(), policy);
        let stop = CancellationToken::new();
        let task = tokio::spawn(sup.supervise("alerts", stop.clone(), || async {
            Err::<(), _>(anyhow::anyhow!("sink ops: gone"))
        }));
        until("the death", || !sup.all_alive()).await;
        stop.cancel();
        let ended = tokio::time::timeout(Duration::from_secs(1), task).await;
        assert_eq!(ended.expect("no hour-long wait").unwrap(), None);
        assert_eq!(restarts(&metrics, "alerts"), None);

        // A task that fails after its stop was asked for is not restarted nor counted.
        let stop = CancellationToken::new();
        stop.cancel();
        let result = sup
            .supervise("clock", stop, || async {
                Err::<(), _>(anyhow::anyhow!("cut short"))
            })
            .await;
        assert_eq!(result, None);
        assert!(sup.all_alive() && sup.names().is_empty());
        assert_eq!(sup.given_up(), None);
    }

    #[test]
    fn panic_messages_are_read_from_either_payload() {
        assert_eq!(panic_message(&"static"), "static");
        assert_eq!(panic_message(&String::from("owned")), "owned");
        assert_eq!(panic_message(&42u8), "a panic without a message");
    }
}
