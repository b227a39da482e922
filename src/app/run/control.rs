//! The action consumer of a run: its transport, its targets, and what a reload changes.

use super::*;

/// A running action consumer, and what a reload changes in it.
pub(super) struct Control {
    pub(super) task: tokio::task::JoinHandle<Option<Result<(), std::convert::Infallible>>>,
    pub(super) stats: Arc<ControlStats>,
    pub(super) targets: Targets,
    /// Core NATS: the request subjects follow the server list (subject template, handle).
    pub(super) subjects: Option<(String, Resubscriber)>,
}

impl Control {
    /// Before the connections change: stop taking requests for servers that go (they are
    /// answered `unknown_server` from now on).
    pub(super) fn before_reload(&self, servers: &[ServerConfig], running: &Running) {
        self.targets.replace(control_targets(servers, running));
    }

    /// After the connections changed: act on the new servers (their handles are new) and
    /// subscribe to their request subjects, unsubscribing from the removed ones'.
    pub(super) async fn after_reload(&self, servers: &[ServerConfig], running: &Running) {
        self.targets.replace(control_targets(servers, running));
        if let Some((template, resubscriber)) = &self.subjects {
            let subjects = servers
                .iter()
                .map(|s| subject_for(template, &s.id))
                .collect();
            // The source applies the change when it next looks for a request, which waits
            // while every in-flight slot is taken; the main loop must not wait that long.
            match tokio::time::timeout(RESUBSCRIBE_WAIT, resubscriber.set(subjects)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "control: the request subscriptions do not follow the reload")
                }
                Err(_) => tracing::warn!(
                    "control: the request subscriptions change once a request slot is free"
                ),
            }
        }
    }
}

/// The servers of `servers` that have a running connection, with their allow-lists.
pub(super) fn control_targets(
    servers: &[ServerConfig],
    running: &Running,
) -> HashMap<String, Target> {
    servers
        .iter()
        .filter_map(|s| {
            let r = running.tasks.get(&s.id)?;
            let allow = AllowList::new(s.allow_actions.iter().map(String::as_str));
            Some((
                s.id.clone(),
                Target {
                    handle: r.handle.clone(),
                    allow,
                },
            ))
        })
        .collect()
}

/// Start the action consumer on the configured transport: NATS (a subscription to the request
/// subject of every configured server, or a JetStream consumer) or Kafka (a consumer group on
/// the request topic).
pub(super) async fn start_control(
    ctl: &ControlSection,
    servers: &[ServerConfig],
    running: &Running,
    shard: crate::shard::Shard,
    stop: CancellationToken,
    sup: &Supervisor,
) -> anyhow::Result<Control> {
    let targets = control_targets(servers, running);
    // Rendezvous hashing is defined for any id, so exactly one replica answers requests for
    // servers nobody configured.
    let owns: Owns = Arc::new(move |id: &str| shard.owns(id));
    match &ctl.transport {
        ControlTransport::Nats(n) => {
            let client = crate::broker::nats::connect(&n.nats).await?;
            let publisher = NatsResultPublisher::new(client.clone(), n.result_subject.clone());
            let controller = Controller::new(targets, owns, ctl.consumer.clone(), publisher)
                .with_journal(&ctl.journal)
                .with_context(|| journal_context(&ctl.journal))?;
            let stats = controller.stats();
            let targets = controller.targets();
            if let Some(js) = &n.jetstream {
                let source =
                    JetStreamRequestSource::new(&client, &n.subject, js, stats.clone()).await?;
                tracing::info!(
                    stream = %js.stream,
                    durable = %js.durable,
                    "control: taking action requests from JetStream"
                );
                let task = supervised_control(sup, controller.run(source, stop));
                return Ok(Control {
                    task,
                    stats,
                    targets,
                    subjects: None,
                });
            }
            let subjects: Vec<String> = servers
                .iter()
                .map(|s| subject_for(&n.subject, &s.id))
                .collect();
            let mut source =
                NatsRequestSource::subscribe(&client, &subjects, n.queue_group.as_deref())
                    .await?
                    .with_template(&n.subject);
            let resubscriber = source.resubscriber();
            tracing::info!(
                subjects = subjects.len(),
                "control: taking action requests from NATS"
            );
            Ok(Control {
                task: supervised_control(sup, controller.run(source, stop)),
                stats,
                targets,
                subjects: Some((n.subject.clone(), resubscriber)),
            })
        }
        ControlTransport::Kafka(k) => {
            let publisher = KafkaResultPublisher::new(k)?;
            let controller = Controller::new(targets, owns, ctl.consumer.clone(), publisher)
                .with_journal(&ctl.journal)
                .with_context(|| journal_context(&ctl.journal))?;
            let stats = controller.stats();
            let targets = controller.targets();
            let source = KafkaRequestSource::new(k, stats.clone())?;
            tracing::info!(
                topic = %k.request_topic,
                group = %k.group_id,
                "control: taking action requests from Kafka"
            );
            Ok(Control {
                task: supervised_control(sup, controller.run(source, stop)),
                stats,
                targets,
                subjects: None,
            })
        }
    }
}

/// The action consumer as a supervised stage: it runs until told to stop.
pub(super) fn supervised_control(
    sup: &Supervisor,
    run: impl std::future::Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<Option<Result<(), std::convert::Infallible>>> {
    sup.spawn("action consumer", async move {
        run.await;
        Ok(())
    })
}

pub(super) fn journal_context(j: &crate::control::journal::JournalConfig) -> String {
    format!(
        "cannot open the control journal {} (set [control] journal to a writable file)",
        j.path.display()
    )
}
