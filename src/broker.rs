//! Opening a connection to RabbitMQ, declaring the job queue, and keeping a daemon on one
//! connection after another ([`supervise`]) when the broker goes away.
//!
//! We open the TCP socket ourselves instead of letting amiquip do it, for one reason: amiquip
//! leaves Nagle's algorithm on, and then every publisher confirm and every ack waits out the
//! peer's delayed ACK (about 40 ms), which caps a confirm-per-publish loop near 28 messages/s.
//! With `TCP_NODELAY` the same loop runs at over a thousand per second.
//!
//! Errors never carry the broker URL, only host, port and vhost: the URL may hold a password.

use crate::backoff::Backoff;
use crate::config::{BrokerConfig, QueueType};
use amiquip::{
    AmqpValue, Auth, Channel, Connection, ConnectionOptions, ConnectionTuning, FieldTable,
    QueueDeclareOptions,
};
use std::fmt;
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Why the broker could not be used. Each variant says which step failed and where.
#[derive(Debug)]
pub enum BrokerError {
    /// `broker.url` is not an `amqp://` URL we can use.
    BadUrl(String),
    /// The host name did not resolve, or no address accepted a TCP connection.
    Connect { endpoint: String, reason: String },
    /// The AMQP handshake, a channel, a declaration or a later operation failed.
    Amqp {
        endpoint: String,
        step: &'static str,
        source: Box<amiquip::Error>,
    },
    /// An established connection or channel went away.
    Lost(String),
}

impl fmt::Display for BrokerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BrokerError::BadUrl(why) => write!(f, "bad broker URL: {why}"),
            BrokerError::Connect { endpoint, reason } => {
                write!(f, "cannot connect to RabbitMQ at {endpoint}: {reason}")
            }
            BrokerError::Amqp {
                endpoint,
                step,
                source,
            } => {
                write!(f, "RabbitMQ at {endpoint}: {step} failed: {source}")
            }
            BrokerError::Lost(why) => write!(f, "lost the broker: {why}"),
        }
    }
}

impl std::error::Error for BrokerError {}

/// The parts of an `amqp://` URL, parsed once; `Display` shows it without credentials.
#[derive(Clone, PartialEq)]
pub struct BrokerAddress {
    pub host: String,
    pub port: u16,
    pub vhost: String,
    user: String,
    password: String,
}

impl fmt::Display for BrokerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{} vhost {:?}", self.host, self.port, self.vhost)
    }
}

impl fmt::Debug for BrokerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BrokerAddress({self})")
    }
}

impl BrokerAddress {
    /// Parses `amqp://user:password@host:port/vhost`, with RabbitMQ's defaults for missing
    /// parts (guest/guest, port 5672, vhost `/`). The error text never repeats the URL.
    pub fn parse(url: &str) -> Result<BrokerAddress, BrokerError> {
        let parsed =
            url::Url::parse(url).map_err(|e| BrokerError::BadUrl(format!("not a URL ({e})")))?;
        match parsed.scheme() {
            "amqp" => {}
            "amqps" => {
                return Err(BrokerError::BadUrl(
                    "amqps:// (TLS) is not supported; use amqp://".into(),
                ));
            }
            other => {
                return Err(BrokerError::BadUrl(format!(
                    "scheme {other:?} is not amqp://"
                )));
            }
        }
        let decode = |s: &str| {
            url::form_urlencoded::parse(format!("x={s}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        };
        let host = match parsed.host_str() {
            Some(h) if !h.is_empty() => h.trim_matches(['[', ']']).to_owned(),
            _ => "localhost".to_owned(),
        };
        let path = parsed.path().trim_start_matches('/');
        if path.contains('/') {
            return Err(BrokerError::BadUrl(
                "the vhost must be one path segment (write / as %2f)".into(),
            ));
        }
        let vhost = if path.is_empty() {
            "/".to_owned()
        } else {
            decode(path)
        };
        let user = if parsed.username().is_empty() {
            "guest".to_owned()
        } else {
            decode(parsed.username())
        };
        let password = parsed
            .password()
            .map(decode)
            .unwrap_or_else(|| "guest".into());
        Ok(BrokerAddress {
            host,
            port: parsed.port().unwrap_or(5672),
            vhost,
            user,
            password,
        })
    }
}

/// An open connection with one channel: what each daemon's broker thread owns.
pub struct Session {
    pub connection: Connection,
    pub channel: Channel,
    pub endpoint: String,
}

impl Session {
    /// Wraps an amiquip error with where it happened.
    pub fn error(&self, step: &'static str, source: amiquip::Error) -> BrokerError {
        BrokerError::Amqp {
            endpoint: self.endpoint.clone(),
            step,
            source: Box::new(source),
        }
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

/// Runs `daemon` on one connection after another, with [`reconnect_backoff`] between them,
/// until it stops.
pub fn supervise(config: &BrokerConfig, program: &str, daemon: &mut impl Supervised) {
    let mut backoff = reconnect_backoff();
    loop {
        let connected_at = Instant::now();
        let end = match connect(config, program) {
            Ok(session) => {
                let end = daemon.use_session(&session);
                session.close();
                backoff.connection_ended(connected_at.elapsed());
                end
            }
            Err(e) => SessionEnd::Lost(e.to_string()),
        };
        match end {
            SessionEnd::Stop => return,
            SessionEnd::Retry => {}
            SessionEnd::Lost(reason) => {
                daemon.session_lost(&reason);
                if daemon.stop_after_loss() {
                    return;
                }
                let retry_at = Instant::now() + backoff.next_delay();
                if let SessionEnd::Stop = daemon.wait_to_reconnect(retry_at) {
                    return;
                }
            }
        }
    }
}

/// Connects with `TCP_NODELAY`, opens a channel and declares the job queue. `program` names
/// the connection in RabbitMQ's management tools, with the queue and the process id, so an
/// operator can tell the daemons' connections apart.
pub fn connect(config: &BrokerConfig, program: &str) -> Result<Session, BrokerError> {
    let connection_name = format!(
        "{program} queue={} pid={}",
        config.queue,
        std::process::id()
    );
    let address = BrokerAddress::parse(&config.url)?;
    let endpoint = address.to_string();
    let stream = open_tcp(&address, config.connect_timeout)?;
    let options = ConnectionOptions::<Auth>::default()
        .auth(Auth::Plain {
            username: address.user.clone(),
            password: address.password.clone(),
        })
        .virtual_host(address.vhost.clone())
        .heartbeat(config.heartbeat_secs)
        .connection_timeout(Some(config.connect_timeout))
        .information(Some(connection_name));
    let amqp_error = |step, source| BrokerError::Amqp {
        endpoint: endpoint.clone(),
        step,
        source: Box::new(source),
    };
    let mut connection =
        Connection::insecure_open_stream(stream, options, ConnectionTuning::default())
            .map_err(|e| amqp_error("AMQP handshake", e))?;
    let channel = connection
        .open_channel(None)
        .map_err(|e| amqp_error("opening a channel", e))?;
    let session = Session {
        connection,
        channel,
        endpoint,
    };
    declare_queue(&session, config)?;
    Ok(session)
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
    fn parses_full_url() {
        let a = BrokerAddress::parse("amqp://alice:s%40cret@rabbit.local:5673/prod").unwrap();
        assert_eq!(a.host, "rabbit.local");
        assert_eq!(a.port, 5673);
        assert_eq!(a.vhost, "prod");
        assert_eq!(a.user, "alice");
        assert_eq!(a.password, "s@cret");
    }

    #[test]
    fn defaults_match_rabbitmq() {
        let a = BrokerAddress::parse("amqp://localhost").unwrap();
        assert_eq!(
            (a.port, a.vhost.as_str(), a.user.as_str()),
            (5672, "/", "guest")
        );
        let b = BrokerAddress::parse("amqp://h/%2f").unwrap();
        assert_eq!(b.vhost, "/");
    }

    #[test]
    fn display_hides_credentials() {
        let a = BrokerAddress::parse("amqp://alice:hunter2@h:1/v").unwrap();
        let shown = format!("{a} {a:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("alice"),
            "{shown}"
        );
    }

    #[test]
    fn refuses_other_schemes() {
        assert!(BrokerAddress::parse("http://h/").is_err());
        assert!(BrokerAddress::parse("amqps://h/").is_err());
        assert!(BrokerAddress::parse("amqp://h/a/b").is_err());
    }
}
