//! The extra local RabbitMQ nodes some tests and benches need beside the default broker,
//! started on first use by the project's scripts (`scripts/rabbitmq-tls-node`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The TLS node listens for AMQP over TLS here, and for plain AMQP on [`TLS_NODE_PLAIN_URL`].
pub const TLS_NODE_TLS_PORT: u16 = 5681;
/// The TLS node's plain listener, for housekeeping and for comparisons.
pub const TLS_NODE_PLAIN_URL: &str = "amqp://guest:guest@127.0.0.1:5682/%2f";

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name)
}

/// The TLS node's certificate directory, starting the node if it is not running. A node that
/// cannot start fails the test, saying why: these tests never skip.
pub fn tls_node() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // Test processes run in parallel: one checks and starts the node at a time.
        let _lock = super::daemon::FileLock::take("/var/tmp/flagshed-rabbitmq-tls-node.lock");
        let dir = PathBuf::from("/var/tmp/flagshed-rabbitmq/tls-certs");
        let running = Command::new(script("rabbitmq-tls-node"))
            .args(["status", dir.to_str().expect("utf-8 path")])
            .output()
            .is_ok_and(|o| o.status.success())
            && dir.join("ca.pem").exists();
        if !running {
            let out = Command::new(script("rabbitmq-tls-node"))
                .args(["start", dir.to_str().expect("utf-8 path")])
                .output()
                .expect("run scripts/rabbitmq-tls-node");
            assert!(
                out.status.success(),
                "the TLS node did not start (needs root and rabbitmq-server): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        dir
    })
}
