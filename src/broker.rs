//! Opening a connection to RabbitMQ, declaring the job queue, and keeping a daemon on one
//! connection after another ([`supervise`]) when the broker goes away.
//!
//! We open the TCP socket ourselves instead of letting amiquip do it, for one reason: amiquip
//! leaves Nagle's algorithm on, and then every publisher confirm and every ack waits out the
//! peer's delayed ACK (about 40 ms), which caps a confirm-per-publish loop near 28 messages/s.
//! With `TCP_NODELAY` the same loop runs at over a thousand per second. For `amqps://` the TLS
//! session runs over that same socket.
//!
//! With several nodes (`broker.urls`, a cluster's members), [`supervise`] owns the address
//! list: it tries the nodes in a shuffled order, as RabbitMQ's own clients do, and when a
//! connection is lost it moves on to the next node before it backs off. Refusals that no
//! retry can heal (wrong credentials, a missing vhost, no permission on the queue, a queue
//! declared with other arguments) end the daemon with [`BrokerError::Refused`] instead.
//!
//! Errors never carry the broker URL, only host, port and vhost: the URL may hold a password.

use crate::backoff::{Backoff, XorShift};
use crate::broker_address::BrokerAddress;
use crate::config::{BrokerConfig, QueueType, TlsFiles};
use amiquip::{
    AmqpValue, Auth, Channel, Connection, ConnectionOptions, ConnectionTuning, FieldTable,
    QueueDeclareOptions,
};
use std::fmt;
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// AMQP reply codes that mean "this will not work until someone changes a setting".
const ACCESS_REFUSED: u16 = 403;
const NOT_ALLOWED: u16 = 530;
const PRECONDITION_FAILED: u16 = 406;

/// Why the broker could not be used. Each variant says which step failed and where.
#[derive(Debug)]
pub enum BrokerError {
    /// The host name did not resolve, or no address accepted a TCP connection.
    Connect { endpoint: String, reason: String },
    /// TLS could not be set up: a certificate file, or the handshake (an untrusted or expired
    /// certificate, a host name the certificate does not name).
    Tls { endpoint: String, reason: String },
    /// The broker refused us for a reason that retrying will not heal.
    Refused {
        endpoint: String,
        reason: String,
        /// What the broker said.
        detail: String,
    },
    /// The AMQP handshake, a channel, a declaration or a later operation failed.
    Amqp {
        endpoint: String,
        step: &'static str,
        source: Box<amiquip::Error>,
    },
}

impl fmt::Display for BrokerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BrokerError::Connect { endpoint, reason } => {
                write!(f, "cannot connect to RabbitMQ at {endpoint}: {reason}")
            }
            BrokerError::Tls { endpoint, reason } => {
                write!(f, "TLS with RabbitMQ at {endpoint} failed: {reason}")
            }
            BrokerError::Refused {
                endpoint,
                reason,
                detail,
            } => {
                write!(f, "RabbitMQ at {endpoint} refused: {reason} ({detail})")
            }
            BrokerError::Amqp {
                endpoint,
                step,
                source,
            } => {
                write!(f, "RabbitMQ at {endpoint}: {step} failed: {source}")
            }
        }
    }
}

impl std::error::Error for BrokerError {}

impl BrokerError {
    /// Sorts an amiquip error from `step` into a refusal that will not heal, a TLS failure,
    /// or an ordinary (retryable) failure.
    fn classify(endpoint: &str, step: &'static str, source: amiquip::Error) -> BrokerError {
        let refused = |reason: String| BrokerError::Refused {
            endpoint: endpoint.to_owned(),
            reason,
            detail: source.to_string(),
        };
        let refusal = match &source {
            amiquip::Error::InvalidCredentials => {
                Some(refused("the user name or password is wrong".into()))
            }
            amiquip::Error::ServerClosedConnection { code, .. }
                if *code == NOT_ALLOWED || *code == ACCESS_REFUSED =>
            {
                Some(refused(
                    "the virtual host does not exist or this user may not use it".into(),
                ))
            }
            amiquip::Error::ServerClosedChannel { code, .. } if *code == ACCESS_REFUSED => Some(
                refused(format!("{step}: this user has no permission on the queue")),
            ),
            amiquip::Error::ServerClosedChannel { code, .. } if *code == PRECONDITION_FAILED => {
                Some(refused(format!(
                    "{step}: the queue exists with other arguments than [broker] asks for"
                )))
            }
            _ => None,
        };
        if let Some(refusal) = refusal {
            return refusal;
        }
        match source {
            amiquip::Error::TlsHandshake { source } => BrokerError::Tls {
                endpoint: endpoint.to_owned(),
                reason: tls_reason(&source),
            },
            source => BrokerError::Amqp {
                endpoint: endpoint.to_owned(),
                step,
                source: Box::new(source),
            },
        }
    }

    /// Whether retrying cannot help: the daemon should stop with EX_CONFIG.
    pub fn is_refusal(&self) -> bool {
        matches!(self, BrokerError::Refused { .. })
    }
}

/// OpenSSL's verdict in words an operator can act on.
fn tls_reason(e: &native_tls::Error) -> String {
    let text = e.to_string();
    let hint = if text.contains("certificate has expired") {
        "the broker's certificate has expired"
    } else if text.contains("certificate is not yet valid") {
        "the broker's certificate is not valid yet (is this host's clock right?)"
    } else if text.contains("ostname mismatch") || text.contains("IP address mismatch") {
        "the broker's certificate does not name this host (use the name the certificate has in the URL)"
    } else if text.contains("unable to get local issuer certificate")
        || text.contains("self-signed certificate")
        || text.contains("self signed certificate")
        || text.contains("certificate verify failed")
    {
        "the broker's certificate is not signed by a trusted CA (set broker.tls_ca_file)"
    } else {
        "TLS handshake failed"
    };
    format!("{hint}: {text}")
}

/// An open connection with one channel: what each daemon's broker thread owns.
pub struct Session {
    pub connection: Connection,
    pub channel: Channel,
    /// The node, for logs: host, port and vhost, never credentials.
    pub endpoint: String,
    /// The node as `host:port`, for the stats line.
    pub node: String,
}

impl Session {
    /// Wraps an amiquip error with where it happened; a refusal stays a refusal.
    pub fn error(&self, step: &'static str, source: amiquip::Error) -> BrokerError {
        BrokerError::classify(&self.endpoint, step, source)
    }

    /// Closes channel then connection; errors here only mean the broker already went away.
    pub fn close(self) {
        if let Err(e) = self.channel.close() {
            log::debug!("closing channel: {e}");
        }
        if let Err(e) = self.connection.close() {
            log::debug!("closing connection: {e}");
        }
    }
}

/// The reconnection schedule both daemons use: quick first retries (250 ms) so a restarted
/// broker is used again within seconds, doubling to a low cap (5 s) because only our own
/// broker is at stake, starting over after a connection lasted 30 s.
pub fn reconnect_backoff() -> Backoff {
    Backoff::new(
        Duration::from_millis(250),
        Duration::from_secs(5),
        Duration::from_secs(30),
    )
}

/// Why a daemon's loop on one connection (or between connections) ended.
pub enum SessionEnd {
    /// The daemon is done: drained, told to stop, or out of work.
    Stop,
    /// The connection or channel went away; says why.
    Lost(String),
    /// A broker operation failed; a refusal ends the daemon, anything else is a loss.
    Failed(BrokerError),
    /// The wait before reconnecting is over.
    Retry,
}

/// A daemon that works on one broker connection at a time and outlives them.
pub trait Supervised {
    /// Works on a live session until it is lost or the daemon stops.
    fn use_session(&mut self, session: &Session) -> SessionEnd;
    /// The session is gone (or could not be opened): account for what it held, log the
    /// outage once.
    fn session_lost(&mut self, reason: &str);
    /// Whether to stop instead of reconnecting after a loss (e.g. already stopping).
    fn stop_after_loss(&self) -> bool;
    /// Serves signals and timers while disconnected, until `retry_at`.
    fn wait_to_reconnect(&mut self, retry_at: Instant) -> SessionEnd;
}

/// The cluster's members in the order this daemon tries them: shuffled once, so that daemons
/// spread over the nodes, then taken round-robin.
struct NodeRotation {
    order: Vec<usize>,
    cursor: usize,
}

impl NodeRotation {
    fn shuffled(nodes: usize) -> NodeRotation {
        let mut order: Vec<usize> = (0..nodes).collect();
        let mut random = XorShift::from_time_and_pid();
        for i in (1..order.len()).rev() {
            let j = (random.next() % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        NodeRotation { order, cursor: 0 }
    }

    /// The next node to try.
    fn next(&mut self) -> usize {
        let node = self.order[self.cursor % self.order.len()];
        self.cursor = (self.cursor + 1) % self.order.len();
        node
    }
}

/// A connection that lasted this long was healthy: when it is lost, the next node is tried at
/// once instead of after a backoff delay.
const HEALTHY_SESSION: Duration = Duration::from_secs(5);

/// Runs `daemon` on one connection after another until it stops. When a healthy connection
/// is lost, the next node is tried at once; otherwise each round over the nodes is followed
/// by a [`reconnect_backoff`] delay. A refusal stops the daemon only when the next attempt
/// is refused too: amiquip reports any failure during the login step as bad credentials, so
/// a connection cut at that moment must not pass for a wrong password. Returns the refusal
/// that ended it, if one did: the caller exits with EX_CONFIG.
pub fn supervise(
    config: &BrokerConfig,
    program: &str,
    daemon: &mut impl Supervised,
) -> Result<(), BrokerError> {
    let mut backoff = reconnect_backoff();
    let mut nodes = NodeRotation::shuffled(config.addresses.len());
    let mut refused_before = false;
    loop {
        let connected_at = Instant::now();
        let mut healthy = false;
        let end = match connect_any(config, program, &mut nodes) {
            Ok(session) => {
                let end = daemon.use_session(&session);
                session.close();
                healthy = connected_at.elapsed() >= HEALTHY_SESSION;
                backoff.connection_ended(connected_at.elapsed());
                end
            }
            Err(e) => SessionEnd::Failed(e),
        };
        let (reason, refusal) = match end {
            SessionEnd::Stop => return Ok(()),
            SessionEnd::Retry => continue,
            // Nothing is held: refusals come while connecting or setting up a session.
            SessionEnd::Failed(e) if e.is_refusal() && refused_before => return Err(e),
            SessionEnd::Failed(e) => (e.to_string(), e.is_refusal()),
            SessionEnd::Lost(reason) => (reason, false),
        };
        refused_before = refusal;
        daemon.session_lost(&reason);
        if daemon.stop_after_loss() {
            return Ok(());
        }
        if healthy {
            continue;
        }
        let retry_at = Instant::now() + backoff.next_delay();
        if let SessionEnd::Stop = daemon.wait_to_reconnect(retry_at) {
            return Ok(());
        }
    }
}

/// Tries each node once, starting with the next in the rotation; the first that works wins.
/// A refusal ends the round at once: the members of a cluster share users and permissions.
fn connect_any(
    config: &BrokerConfig,
    program: &str,
    nodes: &mut NodeRotation,
) -> Result<Session, BrokerError> {
    let mut last = None;
    for _ in 0..config.addresses.len() {
        let address = &config.addresses[nodes.next()];
        match connect(config, address, program) {
            Ok(session) => return Ok(session),
            Err(e) if e.is_refusal() => return Err(e),
            Err(e) => {
                if config.addresses.len() > 1 {
                    log::debug!("{e}; trying the next node");
                }
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| BrokerError::Connect {
        endpoint: "(no node)".into(),
        reason: "broker.urls is empty".into(),
    }))
}

/// Connects to `address` with `TCP_NODELAY` (and TLS for `amqps://`), opens a channel and
/// declares the job queue. `program` names the connection in RabbitMQ's management tools,
/// with the queue and the process id, so an operator can tell the daemons' connections apart.
pub fn connect(
    config: &BrokerConfig,
    address: &BrokerAddress,
    program: &str,
) -> Result<Session, BrokerError> {
    let connection_name = format!(
        "{program} queue={} pid={}",
        config.queue,
        std::process::id()
    );
    let endpoint = address.to_string();
    let stream = open_tcp(address, config.connect_timeout)?;
    let options = ConnectionOptions::<Auth>::default()
        .auth(Auth::Plain {
            username: address.user.clone(),
            password: address.password().to_owned(),
        })
        .virtual_host(address.vhost.clone())
        .heartbeat(config.heartbeat_secs)
        .connection_timeout(Some(config.connect_timeout))
        .information(Some(connection_name));
    let opened = if address.tls {
        let connector = tls_connector(&config.tls, &endpoint)?;
        Connection::open_tls_stream(
            connector,
            &address.host,
            stream,
            options,
            ConnectionTuning::default(),
        )
    } else {
        Connection::insecure_open_stream(stream, options, ConnectionTuning::default())
    };
    let mut connection =
        opened.map_err(|e| BrokerError::classify(&endpoint, "AMQP handshake", e))?;
    let channel = connection
        .open_channel(None)
        .map_err(|e| BrokerError::classify(&endpoint, "opening a channel", e))?;
    let session = Session {
        connection,
        channel,
        endpoint,
        node: address.node(),
    };
    declare_queue(&session, config)?;
    Ok(session)
}

/// A TLS connector trusting the system's CAs and `broker.tls_ca_file`, presenting the client
/// certificate if one is configured. The files are read at each connect, so renewed
/// certificates are used without a restart.
fn tls_connector(
    files: &TlsFiles,
    endpoint: &str,
) -> Result<native_tls::TlsConnector, BrokerError> {
    let failed = |reason: String| BrokerError::Tls {
        endpoint: endpoint.to_owned(),
        reason,
    };
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| failed(format!("cannot read {}: {e}", path.display())))
    };
    let mut builder = native_tls::TlsConnector::builder();
    if let Some(ca_file) = &files.ca_file {
        let pem = read(ca_file)?;
        for block in pem_certificates(&pem) {
            let certificate = native_tls::Certificate::from_pem(block).map_err(|e| {
                failed(format!(
                    "{} holds a bad certificate: {e}",
                    ca_file.display()
                ))
            })?;
            builder.add_root_certificate(certificate);
        }
    }
    if let Some((cert_file, key_file)) = &files.client {
        let identity = native_tls::Identity::from_pkcs8(&read(cert_file)?, &read(key_file)?)
            .map_err(|e| {
                failed(format!(
                    "the client certificate {} and key {} do not make an identity: {e}",
                    cert_file.display(),
                    key_file.display()
                ))
            })?;
        builder.identity(identity);
    }
    builder
        .build()
        .map_err(|e| failed(format!("setting up TLS: {e}")))
}

/// Each `-----BEGIN CERTIFICATE-----` block of a PEM bundle.
fn pem_certificates(pem: &[u8]) -> Vec<&[u8]> {
    const END: &[u8] = b"-----END CERTIFICATE-----";
    let mut blocks = Vec::new();
    let mut rest = pem;
    while let Some(end) = rest.windows(END.len()).position(|w| w == END) {
        blocks.push(&rest[..end + END.len()]);
        rest = &rest[end + END.len()..];
    }
    blocks
}

fn open_tcp(
    address: &BrokerAddress,
    timeout: Duration,
) -> Result<mio::net::TcpStream, BrokerError> {
    let endpoint = address.to_string();
    let addrs = (address.host.as_str(), address.port)
        .to_socket_addrs()
        .map_err(|e| BrokerError::Connect {
            endpoint: endpoint.clone(),
            reason: format!("cannot resolve host: {e}"),
        })?;
    let mut last = String::from("host resolved to no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(stream) => {
                stream.set_nodelay(true).map_err(|e| BrokerError::Connect {
                    endpoint: endpoint.clone(),
                    reason: format!("setting TCP_NODELAY: {e}"),
                })?;
                return mio::net::TcpStream::from_stream(stream).map_err(|e| {
                    BrokerError::Connect {
                        endpoint: endpoint.clone(),
                        reason: format!("registering socket: {e}"),
                    }
                });
            }
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    Err(BrokerError::Connect {
        endpoint,
        reason: last,
    })
}

/// The queue arguments both daemons declare; they must agree or RabbitMQ refuses the second.
pub fn queue_arguments(config: &BrokerConfig) -> FieldTable {
    let mut args = FieldTable::new();
    if config.queue_type == QueueType::Quorum {
        args.insert(
            "x-queue-type".into(),
            AmqpValue::LongString("quorum".into()),
        );
    }
    if let Some(limit) = config.delivery_limit {
        args.insert(
            "x-delivery-limit".into(),
            AmqpValue::LongLongInt(i64::from(limit)),
        );
    }
    if let Some(dlx) = &config.dead_letter_exchange {
        args.insert(
            "x-dead-letter-exchange".into(),
            AmqpValue::LongString(dlx.clone()),
        );
    }
    if let Some(max) = config.max_length {
        args.insert(
            "x-max-length".into(),
            AmqpValue::LongLongInt(i64::try_from(max).unwrap_or(i64::MAX)),
        );
        args.insert(
            "x-overflow".into(),
            AmqpValue::LongString(config.overflow.as_amqp().into()),
        );
    }
    args
}

fn declare_queue(session: &Session, config: &BrokerConfig) -> Result<(), BrokerError> {
    let options = QueueDeclareOptions {
        durable: config.durable,
        exclusive: false,
        auto_delete: false,
        arguments: queue_arguments(config),
    };
    session
        .channel
        .queue_declare(config.queue.clone(), options)
        .map_err(|e| session.error("declaring the queue", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rotation_visits_every_node_once_per_round() {
        let mut nodes = NodeRotation::shuffled(3);
        let mut round: Vec<usize> = (0..3).map(|_| nodes.next()).collect();
        let again: Vec<usize> = (0..3).map(|_| nodes.next()).collect();
        assert_eq!(round, again, "round-robin after the shuffle");
        round.sort_unstable();
        assert_eq!(round, [0, 1, 2]);
    }

    #[test]
    fn a_bundle_splits_into_its_certificates() {
        let pem = b"-----BEGIN CERTIFICATE-----\nAA\n-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\nBB\n-----END CERTIFICATE-----\n";
        let blocks = pem_certificates(pem);
        assert_eq!(blocks.len(), 2);
        assert!(blocks[1].ends_with(b"-----END CERTIFICATE-----"));
    }
}
