//! The integration tests, one binary (one link): a module per area, all driving the library and
//! the real `b24eventd` binary against the portal simulator, with the shared harness in
//! `support`. Tests that need a local service or tool are `#[ignore]`d with what they need; run
//! them with `cargo test --release -- --include-ignored` (`.ci/run` does), and a missing service
//! then fails them naming it.

mod support;

mod admin;
mod alerts;
mod amqp_sink;
mod cli;
mod clock;
mod cluster;
mod cluster_failover;
mod cluster_faults;
mod conformance;
mod crash;
mod disk_full;
mod economy;
mod enrichment;
mod exec_sink;
mod faults;
mod http_sink;
mod idempotency;
mod journal_migrate;
mod journal_safety;
mod many_portals;
mod mqtt_sink;
mod nats_sink;
mod operator;
mod pipeline;
mod portal_ops;
mod postgres_sink;
mod redis_sink;
mod secrets;
mod status_page;
mod systemd;
mod tls_sinks;
