//! The real RabbitMQ, as tests use it: uniquely named queues (so tests run in parallel),
//! publishing hand-made jobs, counting and reading what is left, and cleaning up after.
//!
//! A broker that is not reachable fails the test loudly, saying how to start one: a test that
//! needs RabbitMQ never skips silently.

use amiquip::{
    AmqpProperties, AmqpValue, Channel, Connection, ExchangeDeclareOptions, ExchangeType,
    FieldTable, Publish, QueueDeclareOptions, QueueDeleteOptions,
};
use std::sync::atomic::{AtomicU64, Ordering};

/// Where the tests find RabbitMQ; `FLAGSHED_TEST_AMQP_URL` overrides.
pub fn amqp_url() -> String {
    std::env::var("FLAGSHED_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// A queue name no other test (or earlier run) uses.
pub fn unique_name(what: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "test.{what}.{}.{}.{}",
        std::process::id(),
        nanos % 1_000_000_000,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A connection for the test itself; deletes the queues and exchanges it was told about.
pub struct TestBroker {
    channel: Option<Channel>,
    connection: Option<Connection>,
    queues: Vec<String>,
    exchanges: Vec<String>,
}

impl TestBroker {
    /// Connects to the test broker, or panics with how to start one.
    pub fn connect() -> TestBroker {
        TestBroker::connect_to(&amqp_url())
    }

    /// Connects to `url`, or panics with how to start a broker.
    pub fn connect_to(url: &str) -> TestBroker {
        let mut connection = match Connection::insecure_open(url) {
            Ok(c) => c,
            Err(e) => panic!(
                "RabbitMQ is not reachable ({e}). These tests need a real broker on \
                 127.0.0.1:5672 (guest/guest): start it with `rabbitmq-server -detached` \
                 (install it with `apt-get install rabbitmq-server`), or run `make broker`; \
                 set FLAGSHED_TEST_AMQP_URL to use another one."
            ),
        };
        let channel = connection.open_channel(None).expect("open a channel");
        TestBroker {
            channel: Some(channel),
            connection: Some(connection),
            queues: Vec::new(),
            exchanges: Vec::new(),
        }
    }

    fn channel(&self) -> &Channel {
        self.channel.as_ref().expect("channel is open until drop")
    }

    /// Registers `queue` for deletion when the test ends.
    pub fn owns_queue(&mut self, queue: &str) {
        self.queues.push(queue.to_owned());
    }

    /// Registers `exchange` for deletion when the test ends.
    pub fn owns_exchange(&mut self, exchange: &str) {
        self.exchanges.push(exchange.to_owned());
    }

    /// Closes the connection but leaves the queues and exchanges in place (for a test that
    /// deletes them later through another connection).
    pub fn close_keeping_topology(mut self) {
        self.queues.clear();
        self.exchanges.clear();
    }

    /// Declares a fanout dead-letter exchange and a queue bound to it; returns
    /// (exchange, queue). Both are deleted when the test ends.
    pub fn dead_letter_pair(&mut self, what: &str) -> (String, String) {
        self.dead_letter_pair_with(what, false)
    }

    /// As [`TestBroker::dead_letter_pair`], optionally durable (to survive a broker restart).
    pub fn dead_letter_pair_with(&mut self, what: &str, durable: bool) -> (String, String) {
        let exchange = unique_name(&format!("{what}-dlx"));
        let queue = unique_name(&format!("{what}-dead"));
        let channel = self.channel();
        let ex = channel
            .exchange_declare(
                ExchangeType::Fanout,
                exchange.clone(),
                ExchangeDeclareOptions {
                    durable,
                    ..ExchangeDeclareOptions::default()
                },
            )
            .expect("declare dead-letter exchange");
        let q = channel
            .queue_declare(
                queue.clone(),
                QueueDeclareOptions {
                    durable,
                    ..QueueDeclareOptions::default()
                },
            )
            .expect("declare dead-letter queue");
        q.bind(&ex, "", FieldTable::new())
            .expect("bind dead-letter queue");
        self.exchanges.push(exchange.clone());
        self.queues.push(queue.clone());
        (exchange, queue)
    }

    /// Declares a plain, non-durable queue (for tests that publish before a daemon starts).
    pub fn declare(&mut self, queue: &str, arguments: FieldTable) {
        self.channel()
            .queue_declare(
                queue,
                QueueDeclareOptions {
                    arguments,
                    ..QueueDeclareOptions::default()
                },
            )
            .expect("declare queue");
        self.owns_queue(queue);
    }

    /// Publishes one job with the given message id and headers.
    pub fn publish(
        &self,
        queue: &str,
        id: Option<&str>,
        headers: &[(&str, AmqpValue)],
        body: &[u8],
    ) {
        let mut table = FieldTable::new();
        for (k, v) in headers {
            table.insert((*k).to_owned(), v.clone());
        }
        let mut properties = AmqpProperties::default().with_headers(table);
        if let Some(id) = id {
            properties = properties.with_message_id(id.to_owned());
        }
        self.channel()
            .basic_publish("", Publish::with_properties(body, queue, properties))
            .expect("publish");
    }

    /// Publishes one job with exactly these properties.
    pub fn publish_properties(&self, queue: &str, properties: AmqpProperties, body: &[u8]) {
        self.channel()
            .basic_publish("", Publish::with_properties(body, queue, properties))
            .expect("publish");
    }

    /// Messages ready in `queue` (not counting unacked ones).
    /// Waits until the number of ready messages in `queue` satisfies `done`; returns it.
    /// Panics, saying what was awaited, after `timeout`. The one poll loop the tests share:
    /// the broker does not push queue counts, so they are read every 50 ms.
    pub fn wait_for_ready(
        &self,
        queue: &str,
        what: &str,
        timeout: std::time::Duration,
        done: impl Fn(u32) -> bool,
    ) -> u32 {
        let end = std::time::Instant::now() + timeout;
        loop {
            let count = self.ready_count(queue);
            if done(count) {
                return count;
            }
            assert!(
                std::time::Instant::now() < end,
                "{queue}: {what} within {timeout:?}; {count} ready"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    pub fn ready_count(&self, queue: &str) -> u32 {
        self.channel()
            .queue_declare_passive(queue)
            .expect("queue exists")
            .declared_message_count()
            .unwrap_or(0)
    }

    /// Takes every ready message off `queue`, acking each; returns their properties.
    pub fn drain(&self, queue: &str) -> Vec<AmqpProperties> {
        let mut out = Vec::new();
        while let Some(get) = self.channel().basic_get(queue, true).expect("basic.get") {
            out.push(get.delivery.properties);
        }
        out
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(channel) = self.channel.take() {
            for queue in &self.queues {
                let _ = channel.queue_delete(queue.clone(), QueueDeleteOptions::default());
            }
            for exchange in &self.exchanges {
                let _ = channel.exchange_delete(exchange.clone(), false);
            }
            let _ = channel.close();
        }
        if let Some(connection) = self.connection.take() {
            let _ = connection.close();
        }
    }
}

/// The `reason` of a dead-lettered message's first `x-death` entry ("rejected", "expired",
/// "maxlen").
pub fn death_reason(properties: &AmqpProperties) -> Option<String> {
    let headers = properties.headers().as_ref()?;
    let AmqpValue::FieldArray(deaths) = headers.get("x-death")? else {
        return None;
    };
    let AmqpValue::FieldTable(first) = deaths.first()? else {
        return None;
    };
    match first.get("reason")? {
        AmqpValue::LongString(reason) => Some(reason.clone()),
        _ => None,
    }
}

/// An integer header, for reading jobs back.
pub fn header_u64(properties: &AmqpProperties, name: &str) -> Option<u64> {
    match properties.headers().as_ref()?.get(name)? {
        AmqpValue::LongLongInt(v) => u64::try_from(*v).ok(),
        AmqpValue::LongInt(v) => u64::try_from(*v).ok(),
        AmqpValue::Timestamp(v) => Some(*v),
        _ => None,
    }
}

/// Now in Unix epoch milliseconds, for building job headers.
pub fn now_ms() -> u64 {
    flagshed::clock::now_ms()
}

/// The timing headers a producer sets: `x-created-ms`, and `x-deadline-ms` `ttl_ms` after it.
pub fn timing_headers(created_ms: u64, ttl_ms: u64) -> FieldTable {
    let mut headers = FieldTable::new();
    headers.insert(
        "x-created-ms".into(),
        AmqpValue::LongLongInt(created_ms as i64),
    );
    headers.insert(
        "x-deadline-ms".into(),
        AmqpValue::LongLongInt((created_ms + ttl_ms) as i64),
    );
    headers
}

/// Closes, from the broker's side, every connection whose client properties contain `needle`
/// (the daemons name theirs `taskworker queue=Q pid=P`); returns how many it closed. This is
/// what an operator's `rabbitmqctl close_connection` or a broker failover does to a client.
pub fn close_connections_matching(needle: &str) -> usize {
    let output = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "pid", "client_properties"])
        .output()
        .expect("rabbitmqctl must be installed for this test (it comes with rabbitmq-server)");
    assert!(
        output.status.success(),
        "rabbitmqctl list_connections failed: {output:?}"
    );
    let listing = String::from_utf8_lossy(&output.stdout);
    let mut closed = 0;
    for line in listing.lines().filter(|l| l.contains(needle)) {
        let pid = line.split('\t').next().expect("a pid column");
        let status = std::process::Command::new("rabbitmqctl")
            .args(["-q", "close_connection", pid, "closed by a test"])
            .status()
            .expect("run rabbitmqctl close_connection");
        assert!(status.success(), "close_connection {pid}");
        closed += 1;
    }
    closed
}

/// Runs `rabbitmqctl ARGS` against the default node; panics with its output on failure.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let output = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl must be installed for this test (it comes with rabbitmq-server)");
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A RabbitMQ user made for one test, deleted when dropped.
pub struct TestUser {
    pub name: String,
}

impl TestUser {
    /// Creates `name` with `password` and the given configure, write and read permission
    /// patterns on vhost `/` (`".*"` for all, `"^$"` for none).
    pub fn create(what: &str, password: &str, permissions: [&str; 3]) -> TestUser {
        let name = unique_name(what);
        rabbitmqctl(&["-q", "add_user", &name, password]);
        rabbitmqctl(&[
            "-q",
            "set_permissions",
            "-p",
            "/",
            &name,
            permissions[0],
            permissions[1],
            permissions[2],
        ]);
        TestUser { name }
    }

    /// An `amqp://` URL for this user on the test broker, with `password` (or none).
    pub fn url(&self, password: Option<&str>, vhost: &str) -> String {
        match password {
            Some(password) => format!("amqp://{}:{password}@127.0.0.1:5672/{vhost}", self.name),
            None => format!("amqp://{}@127.0.0.1:5672/{vhost}", self.name),
        }
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["-q", "delete_user", &self.name])
            .output();
    }
}
