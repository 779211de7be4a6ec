//! The TLS paths of the broker sinks against live TLS servers: `rediss://`, `mqtts://` and
//! NATS `tls://`, each served by a private instance of the real server (redis-server, mosquitto,
//! nats-server) on a free port with a certificate from a throwaway CA. The daemon binary trusts
//! that CA only through `SSL_CERT_FILE` (read by rustls-native-certs, as the system store is):
//! without it every delivery is refused for the unknown issuer and nothing is cleared; with it
//! every event reaches all three and is cleared.
//!
//! It needs `openssl`, `redis-server`, `mosquitto` and `nats-server` on `PATH` (Debian's
//! packages; the machine's services come from them): it is ignored unless asked for
//! (`--include-ignored`; `.ci/run` does) and then fails loudly when one is missing.

use crate::support::daemon::{spawn_daemon_with_env, stop_with_sigterm};
use crate::support::*;
use b24eventd_simulator::SimulatorConfig;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn run(cmd: &mut Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what} did not start (this test needs it on PATH): {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A self-signed CA: `{stem}.pem` and `{stem}.key` in `dir`.
fn make_ca(dir: &Path, stem: &str, name: &str) {
    let p = |ext: &str| {
        dir.join(format!("{stem}.{ext}"))
            .to_str()
            .unwrap()
            .to_string()
    };
    run(
        Command::new("openssl").args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &p("key"),
            "-out",
            &p("pem"),
        ]),
        &format!("openssl ({name})"),
    );
}

/// A CA, and a certificate for `localhost` / 127.0.0.1 signed by it.
fn make_certificates(dir: &Path) {
    let p = |name: &str| dir.join(name).to_str().unwrap().to_string();
    make_ca(dir, "ca", "b24eventd test CA");
    run(
        Command::new("openssl").args([
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            &p("server.key"),
            "-out",
            &p("server.csr"),
        ]),
        "openssl (server key)",
    );
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(
        Command::new("openssl").args([
            "x509",
            "-req",
            "-in",
            &p("server.csr"),
            "-CA",
            &p("ca.pem"),
            "-CAkey",
            &p("ca.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &p("san.ext"),
            "-out",
            &p("server.pem"),
        ]),
        "openssl (server certificate)",
    );
}

/// A server process, killed on drop.
struct Server(Child, &'static str);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(name: &'static str, cmd: &mut Command, log: &Path) -> Server {
    let log = std::fs::File::create(log).unwrap();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("{name} did not start (this test needs it on PATH): {e}"));
    Server(child, name)
}

async fn listening(server: &mut Server, port: u16) {
    wait_for(
        &format!("{} to listen on {port}", server.1),
        Duration::from_secs(20),
        || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
    )
    .await;
    assert!(
        server.0.try_wait().unwrap().is_none(),
        "{} exited at start",
        server.1
    );
}

#[ignore = "needs redis-server, mosquitto, nats-server and openssl: run with --include-ignored (.ci/run does)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_mqtt_and_nats_sinks_deliver_over_verified_tls() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_certificates(d);
    let path = |name: &str| d.join(name).to_str().unwrap().to_string();

    let redis_port = free_port();
    let mut redis = spawn(
        "redis-server",
        Command::new("redis-server").args([
            "--port",
            "0",
            "--tls-port",
            &redis_port.to_string(),
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            &path("server.pem"),
            "--tls-key-file",
            &path("server.key"),
            "--tls-ca-cert-file",
            &path("ca.pem"),
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &path(""),
        ]),
        &d.join("redis.log"),
    );
    let mqtt_port = free_port();
    // Started as root, mosquitto drops to its own user, which cannot read the key in our
    // private temporary directory: it stays the user that runs the test.
    let user = Command::new("id").arg("-un").output().unwrap();
    let user = String::from_utf8_lossy(&user.stdout).trim().to_string();
    std::fs::write(
        d.join("mosquitto.conf"),
        format!(
            "user {user}\nlistener {mqtt_port} 127.0.0.1\nallow_anonymous true\ncafile {}\ncertfile {}\nkeyfile {}\n",
            path("ca.pem"),
            path("server.pem"),
            path("server.key")
        ),
    )
    .unwrap();
    let mut mosquitto = spawn(
        "mosquitto",
        Command::new("mosquitto").args(["-c", &path("mosquitto.conf")]),
        &d.join("mosquitto.log"),
    );
    let nats_port = free_port();
    std::fs::create_dir(d.join("jetstream")).unwrap();
    let mut nats = spawn(
        "nats-server",
        Command::new("nats-server").args([
            "-a",
            "127.0.0.1",
            "-p",
            &nats_port.to_string(),
            "-js",
            "-sd",
            &path("jetstream"),
            "--tls",
            "--tlscert",
            &path("server.pem"),
            "--tlskey",
            &path("server.key"),
        ]),
        &d.join("nats.log"),
    );
    listening(&mut redis, redis_port).await;
    listening(&mut mosquitto, mqtt_port).await;
    listening(&mut nats, nats_port).await;

    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    let sinks = format!(
        r#"[sinks.stream]
type = "redis"
url = "rediss://localhost:{redis_port}"
stream = "bitrix:{{portal}}"
[sinks.stream.retry]
initial_backoff = "200ms"
max_backoff = "1s"
max_attempts = 1000

[sinks.bus]
type = "mqtt"
url = "mqtts://localhost:{mqtt_port}"
topic = "bitrix/{{portal}}/{{event}}"
[sinks.bus.retry]
initial_backoff = "200ms"
max_backoff = "1s"
max_attempts = 1000

[sinks.jet]
type = "nats"
url = "tls://localhost:{nats_port}"
subject = "bitrix.{{portal}}.{{event}}"
stream = "BITRIX"
create_stream = true
[sinks.jet.retry]
initial_backoff = "200ms"
max_backoff = "1s"
max_attempts = 1000
"#
    );
    let config = write_config(d, &sim, None, "", &sinks);
    open_journal(d)
        .await
        .save_tokens("main", &tokens)
        .await
        .unwrap();
    emit_deals(&sim, 1, 100);
    let log = d.join("daemon.log");
    // Trusting only a CA that signed nothing here: the servers' certificates do not verify.
    make_ca(d, "other", "some other CA");
    let mut child = spawn_daemon_with_env(&config, &log, &[("SSL_CERT_FILE", &path("other.pem"))]);
    wait_for("failed TLS deliveries", Duration::from_secs(30), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("sink failing")
            .count()
            >= 3
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        sim.stats().cleared,
        0,
        "nothing cleared over an untrusted certificate"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let refused = std::fs::read_to_string(&log).unwrap();
    let refusals: Vec<String> = ["stream", "bus", "jet"]
        .iter()
        .map(|sink| {
            let line = refused
                .lines()
                .find(|l| {
                    l.contains(&format!("sink={sink}")) && l.to_lowercase().contains("certificate")
                })
                .unwrap_or_else(|| panic!("sink {sink} failed for its certificate: {refused}"));
            line[line.find("error=").unwrap_or(0)..].to_string()
        })
        .collect();

    let mut child = spawn_daemon_with_env(&config, &log, &[("SSL_CERT_FILE", &path("ca.pem"))]);
    wait_for(
        "all 100 events delivered over TLS and cleared",
        Duration::from_secs(60),
        || upstream_empty(&sim) && sim.stats().cleared == 100,
    )
    .await;
    stop_with_sigterm(&mut child, &log);
    let text = std::fs::read_to_string(&log).unwrap();
    for refusal in &refusals {
        eprintln!("refused before the CA was trusted: {refusal}");
    }
    eprintln!(
        "tls sinks: 100/100 events delivered to rediss, mqtts and nats tls and cleared; before \
         the CA was trusted: {} sinks failing, 0 cleared",
        text.matches("sink failing").count()
    );
}
