//! Request → result latency (p50/p99) and throughput of the action consumer, through the
//! simulator, against a floor: a bare `Ping` round trip on the same AMI connection handle.
//!
//! The consumer is fed from an in-memory [`RequestSource`] and publishes to an in-memory
//! [`Publisher`], so the numbers are amibus's own cost (decode, checks, dedupe, rate, the
//! handle, result encoding) without a broker's.
//!
//! Run: `cargo bench --bench control` (prints a table). `cargo test --benches` runs a short
//! smoke pass so the bench keeps compiling and working.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use amibus::ami::server::ServerConfig;
use amibus::ami::{Action, Connection, Options};
use amibus::control::{
    AllowList, ControlConfig, Controller, Incoming, PublishError, Publisher, RequestSource, Target,
};
use amibus::model::pb::{ActionRequest, ActionResult};
use amibus::secret::Secret;
use amibus::sim::{Sim, SimConfig};
use prost::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

struct ChanSource(mpsc::Receiver<Incoming>);

impl RequestSource for ChanSource {
    async fn next(&mut self) -> Option<Incoming> {
        self.0.recv().await
    }
}

struct ChanPublisher(mpsc::UnboundedSender<(Instant, Vec<u8>)>);

impl Publisher for ChanPublisher {
    async fn publish(&self, _to: Option<&str>, r: &ActionResult) -> Result<(), PublishError> {
        let _ = self.0.send((Instant::now(), r.encode_to_vec()));
        Ok(())
    }
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let n: usize = if full { 20_000 } else { 200 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let sim = Sim::start(SimConfig {
            count: Some(0),
            ..SimConfig::default()
        })
        .await
        .expect("sim");
        let addr = sim.addrs()[0];
        let cfg = ServerConfig::new(
            "b",
            "127.0.0.1",
            addr.port(),
            "admin",
            Secret::new("amp111"),
        );
        let (tx, _rx) = amibus::ami::handoff::channel(1 << 16);
        let stop = CancellationToken::new();
        let conn = Connection::spawn(Arc::new(cfg), tx, stop.clone(), Options::default());
        while !conn.stats.snapshot().connected {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let t = Duration::from_secs(10);

        // Floor: one Ping at a time on the handle.
        let mut floor = Vec::with_capacity(n);
        for _ in 0..n {
            let t0 = Instant::now();
            conn.handle
                .send(Action::new("Ping"), t)
                .await
                .expect("ping");
            floor.push(t0.elapsed());
        }
        // Floor throughput: 64 Pings in flight.
        let t0 = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for i in 0..n {
            let h = conn.handle.clone();
            set.spawn(async move { h.send(Action::new("Ping"), t).await.map(|_| i) });
            if set.len() >= 64 {
                set.join_next().await;
            }
        }
        while set.join_next().await.is_some() {}
        let floor_rate = n as f64 / t0.elapsed().as_secs_f64();

        // Through the consumer.
        let (in_tx, in_rx) = mpsc::channel(1024);
        let (out_tx, mut out_rx) = mpsc::unbounded_channel();
        let mut targets = HashMap::new();
        targets.insert(
            "b".to_owned(),
            Target {
                handle: conn.handle.clone(),
                allow: AllowList::read_only(),
            },
        );
        let controller = Controller::new(
            targets,
            Arc::new(|_: &str| true),
            ControlConfig {
                rate: 0.0,
                ..ControlConfig::default()
            },
            ChanPublisher(out_tx),
        );
        let cstop = CancellationToken::new();
        let task = tokio::spawn(controller.run(ChanSource(in_rx), cstop.clone()));
        let req = |i: usize| {
            ActionRequest {
                request_id: format!("r-{i}"),
                server: "b".into(),
                action: "Ping".into(),
                deadline_ns: amibus::ami::record::now_ns() + 60_000_000_000,
                ..ActionRequest::default()
            }
            .encode_to_vec()
        };
        let mut lat = Vec::with_capacity(n);
        for i in 0..n {
            let payload = req(i).into();
            let t0 = Instant::now();
            let _ = in_tx
                .send(Incoming {
                    payload,
                    reply: None,
                    ack: None,
                    key: None,
                })
                .await;
            let (at, _) = out_rx.recv().await.expect("result");
            lat.push(at - t0);
        }
        let t0 = Instant::now();
        let feeder = {
            let in_tx = in_tx.clone();
            tokio::spawn(async move {
                for i in n..2 * n {
                    let payload = req(i).into();
                    let _ = in_tx
                        .send(Incoming {
                            payload,
                            reply: None,
                            ack: None,
                            key: None,
                        })
                        .await;
                }
            })
        };
        for _ in 0..n {
            out_rx.recv().await.expect("result");
        }
        let rate = n as f64 / t0.elapsed().as_secs_f64();
        let _ = feeder.await;
        cstop.cancel();
        let _ = task.await;

        let (f50, f99) = (pct(&mut floor, 0.5), pct(&mut floor, 0.99));
        let (c50, c99) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99));
        println!("control bench, {n} requests, Ping through the simulator");
        println!("                       p50         p99         throughput");
        println!(
            "floor (handle Ping)    {f50:>9.1?}  {f99:>9.1?}  {floor_rate:>9.0}/s (64 in flight)"
        );
        println!(
            "consumer (in-memory)   {c50:>9.1?}  {c99:>9.1?}  {rate:>9.0}/s (up to max_in_flight)"
        );
        println!(
            "ratio consumer/floor   {:>9.2}   {:>9.2}   {:>9.2} (floor/consumer)",
            c50.as_secs_f64() / f50.as_secs_f64(),
            c99.as_secs_f64() / f99.as_secs_f64(),
            floor_rate / rate
        );
        stop.cancel();
        let _ = conn.task.await;
        sim.shutdown().await;
    });
}
