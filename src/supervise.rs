//! Supervision: every long-lived task of `amibus run` is a stage, and a stage that ends before
//! it was asked to (an error it cannot recover from, or a panic) ends the run, visibly.
//!
//! Owns: which stage failed first and why; the signal the run waits on to stop; the liveness
//! answer behind `/healthz`.
//!
//! Stages that can recover by themselves (the sink while the broker is away, the spool while its
//! disk is full) do not end: they say so in metrics and readiness. What ends is what cannot go
//! on: then the log names the stage and its cause, `/healthz` fails, and `amibus run` exits
//! non-zero after its usual orderly stop, so an orchestrator restarts it.
//!
//! Must never: let a stage die silently, or keep reporting healthy after one did.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::FutureExt;
use tokio_util::sync::CancellationToken;

/// The first stage that failed, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub stage: String,
    pub cause: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stage {} failed: {}", self.stage, self.cause)
    }
}

/// Shared by every stage of one run. Cheap to clone.
#[derive(Clone, Default)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    failed: CancellationToken,
    first: Mutex<Option<Failure>>,
    stopping: AtomicBool,
}

impl Supervisor {
    pub fn new() -> Self {
        Self::default()
    }

    /// Record that `stage` cannot go on. The first failure is the one reported; every one is
    /// logged.
    pub fn fail(&self, stage: &str, cause: impl std::fmt::Display) {
        let failure = Failure {
            stage: stage.to_owned(),
            cause: cause.to_string(),
        };
        tracing::error!(stage, cause = %failure.cause, "a stage failed; amibus stops and exits non-zero");
        let mut first = self
            .inner
            .first
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if first.is_none() {
            *first = Some(failure);
        }
        drop(first);
        self.inner.failed.cancel();
    }

    /// Resolves once a stage has failed.
    pub async fn failed(&self) {
        self.inner.failed.cancelled().await;
    }

    /// The first failure, if any.
    pub fn failure(&self) -> Option<Failure> {
        self.inner
            .first
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// From now on stages are expected to end: the orderly stop has begun.
    pub fn stopping(&self) {
        self.inner.stopping.store(true, Ordering::Release);
    }

    fn is_stopping(&self) -> bool {
        self.inner.stopping.load(Ordering::Acquire)
    }

    /// Run `stage` as a task. It fails the run if it panics, returns an error, or returns at
    /// all before [`Supervisor::stopping`] (a stage runs until it is told to stop). Its output
    /// is handed back through the handle either way (`None` after a panic).
    pub fn spawn<T, E, F>(
        &self,
        stage: impl Into<String>,
        fut: F,
    ) -> tokio::task::JoinHandle<Option<Result<T, E>>>
    where
        F: Future<Output = Result<T, E>> + Send + 'static,
        T: Send + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        self.spawn_until(stage, None, fut)
    }

    /// [`Supervisor::spawn`] for a stage with a stop of its own (a connection a reload removes):
    /// it may also end once `stop` is cancelled.
    pub fn spawn_until<T, E, F>(
        &self,
        stage: impl Into<String>,
        stop: Option<CancellationToken>,
        fut: F,
    ) -> tokio::task::JoinHandle<Option<Result<T, E>>>
    where
        F: Future<Output = Result<T, E>> + Send + 'static,
        T: Send + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        let sup = self.clone();
        let stage = stage.into();
        let fail_after = failpoint(&stage);
        tokio::spawn(async move {
            let fut = async move {
                let Some(after) = fail_after else {
                    return fut.await;
                };
                tokio::select! {
                    out = fut => out,
                    () = tokio::time::sleep(after) => panic!("{FAILPOINT_ENV} made it fail"),
                }
            };
            match AssertUnwindSafe(fut).catch_unwind().await {
                Ok(Ok(out)) => {
                    let told = stop.as_ref().is_some_and(CancellationToken::is_cancelled);
                    if !told && !sup.is_stopping() {
                        sup.fail(&stage, "ended before it was told to stop");
                    }
                    Some(Ok(out))
                }
                Ok(Err(e)) => {
                    sup.fail(&stage, &e);
                    Some(Err(e))
                }
                Err(panic) => {
                    sup.fail(&stage, format!("panicked: {}", panic_message(&panic)));
                    None
                }
            }
        })
    }
}

/// `AMIBUS_FAILPOINT=<stage>@<seconds>` makes that stage panic that long after it starts: how
/// the fault tests prove that a stage that dies ends the run, visibly, through the real binary.
pub const FAILPOINT_ENV: &str = "AMIBUS_FAILPOINT";

fn failpoint(stage: &str) -> Option<std::time::Duration> {
    let spec = std::env::var(FAILPOINT_ENV).ok()?;
    let (name, secs) = spec.rsplit_once('@')?;
    if name != stage {
        return None;
    }
    let secs: f64 = secs.parse().ok()?;
    tracing::warn!(
        stage,
        secs,
        "{FAILPOINT_ENV}: this stage will fail on purpose"
    );
    Some(std::time::Duration::from_secs_f64(secs.max(0.0)))
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stage_that_ends_early_errs_or_panics_fails_the_run() {
        let sup = Supervisor::new();
        let ok = sup.spawn("quiet", async { Ok::<_, String>(1) });
        assert_eq!(ok.await.expect("join"), Some(Ok(1)));
        sup.failed().await;
        assert_eq!(
            sup.failure(),
            Some(Failure {
                stage: "quiet".into(),
                cause: "ended before it was told to stop".into()
            })
        );

        let sup = Supervisor::new();
        let panicked = sup.spawn("loud", async {
            if true {
                panic!("spool gone");
            }
            Ok::<(), String>(())
        });
        assert_eq!(panicked.await.expect("join"), None);
        let failure = sup.failure().expect("failed");
        assert_eq!(failure.stage, "loud");
        assert!(failure.cause.contains("spool gone"), "{failure}");

        // After the stop began, ending is what a stage should do; an error still counts.
        let sup = Supervisor::new();
        sup.stopping();
        let done = sup.spawn("done", async { Ok::<_, String>(()) });
        assert_eq!(done.await.expect("join"), Some(Ok(())));
        assert_eq!(sup.failure(), None);
        // A stage with a stop of its own may end once that stop is cancelled.
        let sup = Supervisor::new();
        let stop = CancellationToken::new();
        stop.cancel();
        let removed = sup.spawn_until("connection pbx1", Some(stop), async { Ok::<_, String>(()) });
        assert_eq!(removed.await.expect("join"), Some(Ok(())));
        assert_eq!(sup.failure(), None);
        let kept = sup.spawn_until("connection pbx2", Some(CancellationToken::new()), async {
            Ok::<_, String>(())
        });
        assert_eq!(kept.await.expect("join"), Some(Ok(())));
        assert_eq!(
            sup.failure().map(|f| f.stage),
            Some("connection pbx2".into())
        );

        let sup = Supervisor::new();
        sup.stopping();
        let err = sup.spawn("err", async { Err::<(), _>("disk gone".to_owned()) });
        assert!(matches!(err.await.expect("join"), Some(Err(_))));
        assert_eq!(sup.failure().map(|f| f.stage), Some("err".into()));
    }
}
