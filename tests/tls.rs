//! `amqps://` end to end: a local RabbitMQ node with a TLS listener and a CA made by the test
//! setup (`scripts/rabbitmq-tls-node`, `scripts/test-ca`). A trusted chain connects and moves
//! jobs, with and without a client certificate; an untrusted CA, an expired certificate and a
//! certificate for another host name each fail with a clear reason, and are retried.

mod support;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::daemon::{Bin, Daemon, TempDir, TestConfig, toml_str};

const WAIT: Duration = Duration::from_secs(60);
use support::nodes::{TLS_NODE_PLAIN_URL, TLS_NODE_TLS_PORT as TLS_PORT};

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name)
}

fn path_str(path: &Path) -> String {
    toml_str(path.to_str().expect("utf-8 path"))
}

/// A worker and queuer moving `jobs` jobs over TLS to `url`; returns the worker's log.
fn jobs_flow(what: &str, url: &str, client_cert: bool) -> String {
    let certs = support::nodes::tls_node();
    let dir = TempDir::new(what);
    let queue = support::broker::unique_name(what);
    let mut config = TestConfig::new(&queue)
        .set("broker", "url", &toml_str(url))
        .set("broker", "tls_ca_file", &path_str(&certs.join("ca.pem")))
        .set("queuer", "max_jobs", "100")
        .set("queuer", "work_ms", "0")
        .flag_file(
            &dir,
            r#"{"flagValues": {"task-rate": 500, "skip-rate": 0}}"#,
        );
    if client_cert {
        config = config
            .set(
                "broker",
                "tls_cert_file",
                &path_str(&certs.join("client.pem")),
            )
            .set(
                "broker",
                "tls_key_file",
                &path_str(&certs.join("client.key")),
            );
    }
    let config = config.write(&dir, "flagshed.toml");
    let mut worker = Daemon::start(Bin::Worker, &config);
    worker.wait_for_line("consuming from queue", WAIT);
    let mut queuer = Daemon::start(Bin::Queuer, &config);
    assert!(queuer.wait_exit(WAIT).success(), "{}", queuer.log());
    assert_eq!(queuer.final_ledger().get("published"), 100);
    let stats = worker.wait_settled(100);
    assert_eq!(
        stats.text("broker_node"),
        format!("{}:{TLS_PORT}", url_host(url))
    );
    let ledger = worker.stop();
    ledger.assert_balanced();
    assert_eq!(ledger.get("done"), 100, "{ledger:?}");
    // The queue was declared over TLS too; delete it the same way tests always do.
    delete_queue_on_tls_node(&queue);
    worker.log()
}

fn url_host(url: &str) -> &str {
    let rest = url.split_once('@').map_or(url, |(_, r)| r);
    rest.split(':').next().unwrap_or(rest)
}

/// The TLS node also listens on plain AMQP (5682) for housekeeping like this.
fn delete_queue_on_tls_node(queue: &str) {
    let mut broker = support::broker::TestBroker::connect_to(TLS_NODE_PLAIN_URL);
    broker.owns_queue(queue);
}

#[test]
fn a_trusted_chain_connects_by_name_and_moves_jobs() {
    jobs_flow(
        "tls-name",
        &format!("amqps://guest:guest@localhost:{TLS_PORT}/%2f"),
        false,
    );
}

#[test]
fn a_trusted_chain_connects_by_ip_address_with_a_client_certificate() {
    jobs_flow(
        "tls-ip-client",
        &format!("amqps://guest:guest@127.0.0.1:{TLS_PORT}/%2f"),
        true,
    );
}

/// Runs a worker against `url` trusting `ca`, expects it to log `reason` and keep retrying,
/// then stops it.
fn refused_handshake(what: &str, url: &str, ca: &Path, reason: &str) {
    let dir = TempDir::new(what);
    let config = TestConfig::new(&support::broker::unique_name(what))
        .set("broker", "url", &toml_str(url))
        .set("broker", "tls_ca_file", &path_str(ca))
        .write(&dir, "flagshed.toml");
    let mut worker = Daemon::start(Bin::Worker, &config);
    let line = worker.wait_for_line(reason, WAIT);
    assert!(line.contains("retrying"), "retried, not refused: {line}");
    let stats = worker.wait_for_stats(|s| s.text("broker") == "down");
    assert_eq!(stats.get("received"), 0);
    let ledger = worker.stop();
    ledger.assert_balanced();
}

#[test]
fn an_untrusted_ca_fails_clearly() {
    let certs = support::nodes::tls_node();
    refused_handshake(
        "tls-wrong-ca",
        &format!("amqps://guest:guest@localhost:{TLS_PORT}/%2f"),
        &certs.join("other-ca.pem"),
        "not signed by a trusted CA",
    );
}

/// A TLS server on a loopback port that presents `cert`/`key` to every client, then hangs up;
/// enough to see what the client makes of the certificate.
fn tls_server(cert: &Path, key: &Path) -> u16 {
    let identity = native_tls::Identity::from_pkcs8(
        &std::fs::read(cert).expect("read certificate"),
        &std::fs::read(key).expect("read key"),
    )
    .expect("an identity");
    let acceptor = native_tls::TlsAcceptor::new(identity).expect("a TLS acceptor");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    let port = listener.local_addr().expect("local address").port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let _ = acceptor.accept(stream);
        }
    });
    port
}

/// Certificates of a CA of this test's own, made by scripts/test-ca.
fn own_ca(dir: &TempDir) -> PathBuf {
    let out = Command::new(script("test-ca"))
        .arg(dir.path())
        .output()
        .expect("run scripts/test-ca");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir.path().to_owned()
}

#[test]
fn an_expired_certificate_fails_clearly() {
    let certs_dir = TempDir::new("tls-expired-ca");
    let certs = own_ca(&certs_dir);
    let port = tls_server(&certs.join("expired.pem"), &certs.join("expired.key"));
    refused_handshake(
        "tls-expired",
        &format!("amqps://guest:guest@localhost:{port}/%2f"),
        &certs.join("ca.pem"),
        "certificate has expired",
    );
}

#[test]
fn a_certificate_for_another_host_fails_clearly() {
    let certs_dir = TempDir::new("tls-host-ca");
    let certs = own_ca(&certs_dir);
    let port = tls_server(&certs.join("wrong-host.pem"), &certs.join("wrong-host.key"));
    refused_handshake(
        "tls-wrong-host",
        &format!("amqps://guest:guest@localhost:{port}/%2f"),
        &certs.join("ca.pem"),
        "does not name this host",
    );
}
