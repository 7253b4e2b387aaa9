//! Jobs published by a bench itself, when taskqueuer's fixed work and paced rate are not the
//! workload: Poisson (or paced) arrivals of jobs whose work is drawn per job, carried in the
//! body, with publisher confirms, and a record of every job so the bench can account for each
//! one afterwards.
//!
//! The bench's connections declare the queue with flagshed's own `queue_arguments`, from the
//! same `[broker]` settings as the worker, so the two declarations always agree.

use super::random::{LogNormal, Rng};
use amiquip::{
    AmqpProperties, AmqpValue, Auth, Channel, Confirm, ConfirmSmoother, Connection,
    ConnectionOptions, ConnectionTuning, FieldTable, Publish, QueueDeclareOptions,
};
use crossbeam_channel::Receiver;
use flagshed::clock::now_ms;
use flagshed::config::BrokerConfig;
use std::time::{Duration, Instant};

/// The job queue as the worker declares it, and the broker it is on.
#[derive(Clone, Debug)]
pub struct Target {
    /// `amqp://user:password@host:port/vhost`.
    pub url: String,
    pub queue: String,
    pub durable: bool,
    pub arguments: FieldTable,
}

impl Target {
    /// The queue `[broker]` describes, on the test broker.
    pub fn from_config(broker: &BrokerConfig) -> Target {
        Target {
            url: crate::support::broker::amqp_url(),
            queue: broker.queue.clone(),
            durable: broker.durable,
            arguments: flagshed::broker::queue_arguments(broker),
        }
    }

    /// A connection with `TCP_NODELAY` (as the daemons open theirs: without it, small frames
    /// such as acks can wait for the peer's delayed ACK), a channel, and the queue declared.
    pub fn open(&self) -> (Connection, Channel) {
        let url = url::Url::parse(&self.url).expect("a valid AMQP URL");
        let host = url.host_str().unwrap_or("127.0.0.1");
        let port = url.port().unwrap_or(5672);
        let decode = |s: &str| {
            url::form_urlencoded::parse(format!("x={s}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        };
        let vhost = match decode(url.path().trim_start_matches('/')) {
            v if v.is_empty() => "/".to_owned(),
            v => v,
        };
        let user = match url.username() {
            "" => "guest".to_owned(),
            u => decode(u),
        };
        let password = url.password().map_or_else(|| "guest".to_owned(), decode);
        let stream = std::net::TcpStream::connect((host, port)).expect("connect to RabbitMQ");
        stream.set_nodelay(true).expect("set TCP_NODELAY");
        let stream = mio::net::TcpStream::from_stream(stream).expect("register the socket");
        let options = ConnectionOptions::<Auth>::default()
            .auth(Auth::Plain {
                username: user,
                password,
            })
            .virtual_host(vhost);
        let mut connection =
            Connection::insecure_open_stream(stream, options, ConnectionTuning::default())
                .expect("AMQP handshake");
        let channel = connection.open_channel(None).expect("open a channel");
        channel
            .queue_declare(
                self.queue.clone(),
                QueueDeclareOptions {
                    durable: self.durable,
                    exclusive: false,
                    auto_delete: false,
                    arguments: self.arguments.clone(),
                },
            )
            .expect("declare the queue");
        (connection, channel)
    }
}

/// Closes a channel and its connection; errors only mean the broker already went away.
pub fn close(connection: Connection, channel: Channel) {
    let _ = channel.close();
    let _ = connection.close();
}

/// How long the publisher waits for the last confirms before counting them as missing.
const CONFIRM_WAIT: Duration = Duration::from_secs(30);

/// What each job's work, in ms, is drawn from.
#[derive(Clone, Copy, Debug)]
pub enum Mix {
    /// One lognormal throughout.
    LogNormal(LogNormal),
    /// `long_share` of the jobs take `long_ms`, the rest `short_ms`.
    Bimodal {
        short_ms: f64,
        long_ms: f64,
        long_share: f64,
    },
    /// Half the jobs of type `short`, half of type `long`, each lognormal.
    TwoTypes { short: LogNormal, long: LogNormal },
    /// `base`, its work multiplied by `factor` from `from` until `until` after the start.
    Drift {
        base: LogNormal,
        factor: f64,
        from: Duration,
        until: Duration,
    },
}

impl Mix {
    /// The work of a job published `secs` after the start, and its type when the mix names
    /// one.
    pub fn draw(&self, secs: f64, rng: &mut Rng) -> (f64, Option<&'static str>) {
        match *self {
            Mix::LogNormal(work) => (work.sample(rng), None),
            Mix::Bimodal {
                short_ms,
                long_ms,
                long_share,
            } => {
                let ms = if rng.unit() < long_share {
                    long_ms
                } else {
                    short_ms
                };
                (ms, None)
            }
            Mix::TwoTypes { short, long } => {
                if rng.unit() < 0.5 {
                    (short.sample(rng), Some("short"))
                } else {
                    (long.sample(rng), Some("long"))
                }
            }
            Mix::Drift {
                base,
                factor,
                from,
                until,
            } => {
                let scale = if secs >= from.as_secs_f64() && secs < until.as_secs_f64() {
                    factor
                } else {
                    1.0
                };
                (base.sample(rng) * scale, None)
            }
        }
    }
}

/// What one run of the publisher sends.
#[derive(Clone, Debug)]
pub struct FeedOptions {
    /// Job ids are `<prefix>-<n>`, n from 1.
    pub id_prefix: String,
    pub rate_per_sec: f64,
    /// Exponential gaps between jobs (a Poisson process); `false`: evenly spaced.
    pub poisson: bool,
    /// Each job's deadline after its creation (`x-deadline-ms`), also its AMQP expiration;
    /// `None`: no deadline.
    pub ttl_ms: Option<u64>,
    /// Also declare each job's work in `x-work-ms` (otherwise it is only in the body).
    pub declare_work: bool,
    /// The AMQP `type` property of jobs whose mix names none.
    pub job_type: Option<String>,
    pub mix: Mix,
    /// How long to publish for.
    pub duration: Duration,
    pub seed: u64,
}

/// One job as it was published.
#[derive(Clone, Debug)]
pub struct Sent {
    pub id: String,
    pub created_ms: u64,
    pub deadline_ms: Option<u64>,
    pub work_ms: u64,
    /// `Some(true)`: the broker confirmed it; `Some(false)`: refused it; `None`: no word.
    pub confirmed: Option<bool>,
}

/// What the publisher did.
#[derive(Clone, Debug, Default)]
pub struct FeedReport {
    pub jobs: Vec<Sent>,
    /// When publishing started, Unix epoch ms.
    pub started_ms: u64,
}

impl FeedReport {
    /// Jobs the broker confirmed: the jobs that exist.
    pub fn published(&self) -> u64 {
        self.jobs
            .iter()
            .filter(|j| j.confirmed == Some(true))
            .count() as u64
    }

    pub fn nacked(&self) -> u64 {
        self.jobs
            .iter()
            .filter(|j| j.confirmed == Some(false))
            .count() as u64
    }

    pub fn unconfirmed(&self) -> u64 {
        self.jobs.iter().filter(|j| j.confirmed.is_none()).count() as u64
    }
}

/// A job's body: its work in milliseconds, as decimal text and a newline.
pub fn work_body(work_ms: u64) -> Vec<u8> {
    format!("{work_ms}\n").into_bytes()
}

/// The publisher, running on its own thread and connection.
pub struct Feed {
    thread: std::thread::JoinHandle<FeedReport>,
    /// When publishing started, Unix epoch ms.
    pub started_ms: u64,
    pub started: Instant,
}

impl Feed {
    /// Connects, declares the queue and starts publishing; returns once the first job is on
    /// its way.
    pub fn start(target: &Target, options: FeedOptions) -> Feed {
        let target = target.clone();
        let (tx, rx) = crossbeam_channel::bounded(1);
        let thread = std::thread::Builder::new()
            .name("feed".into())
            .spawn(move || publish(&target, &options, &tx))
            .expect("start the publisher thread");
        let (started_ms, started) = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the publisher connected and started");
        Feed {
            thread,
            started_ms,
            started,
        }
    }

    /// Waits for the publisher to finish (its duration, then the last confirms).
    pub fn join(self) -> FeedReport {
        self.thread.join().expect("the publisher thread panicked")
    }
}

fn publish(
    target: &Target,
    options: &FeedOptions,
    started: &crossbeam_channel::Sender<(u64, Instant)>,
) -> FeedReport {
    let (connection, channel) = target.open();
    let confirms = channel
        .listen_for_publisher_confirms()
        .expect("listen for confirms");
    channel
        .enable_publisher_confirms()
        .expect("enable confirms");
    let mut rng = Rng::new(options.seed);
    let mut smoother = ConfirmSmoother::new();
    let mut report = FeedReport::default();
    let start = Instant::now();
    report.started_ms = now_ms();
    let _ = started.send((report.started_ms, start));
    let gap = 1.0 / options.rate_per_sec;
    let mut next_secs = 0.0;
    let end = options.duration.as_secs_f64();
    while next_secs < end {
        let at = start + Duration::from_secs_f64(next_secs);
        let now = Instant::now();
        if at > now {
            std::thread::sleep(at - now);
        }
        let (work, mix_type) = options.mix.draw(next_secs, &mut rng);
        let work_ms = work.round().max(0.0) as u64;
        let created_ms = now_ms();
        let sent = Sent {
            id: format!("{}-{}", options.id_prefix, report.jobs.len() + 1),
            created_ms,
            deadline_ms: options.ttl_ms.map(|ttl| created_ms + ttl),
            work_ms,
            confirmed: None,
        };
        let mut headers = FieldTable::new();
        headers.insert(
            "x-created-ms".into(),
            AmqpValue::LongLongInt(created_ms as i64),
        );
        if let Some(deadline) = sent.deadline_ms {
            headers.insert(
                "x-deadline-ms".into(),
                AmqpValue::LongLongInt(deadline as i64),
            );
        }
        if options.declare_work {
            headers.insert("x-work-ms".into(), AmqpValue::LongLongInt(work_ms as i64));
        }
        let mut properties = AmqpProperties::default()
            .with_message_id(sent.id.clone())
            .with_headers(headers)
            .with_delivery_mode(2)
            .with_content_type("text/plain".into())
            .with_timestamp(created_ms / 1000);
        if let Some(ttl) = options.ttl_ms {
            properties = properties.with_expiration(ttl.to_string());
        }
        if let Some(job_type) = mix_type.or(options.job_type.as_deref()) {
            properties = properties.with_type_(job_type.to_owned());
        }
        channel
            .basic_publish(
                "",
                Publish::with_properties(&work_body(work_ms), target.queue.clone(), properties),
            )
            .expect("publish");
        report.jobs.push(sent);
        for confirm in confirms.try_iter() {
            settle(&mut smoother, confirm, &mut report.jobs);
        }
        next_secs += if options.poisson {
            rng.exponential(gap)
        } else {
            gap
        };
    }
    await_confirms(&confirms, &mut smoother, &mut report.jobs);
    close(connection, channel);
    report
}

fn settle(smoother: &mut ConfirmSmoother, confirm: Confirm, jobs: &mut [Sent]) {
    for one in smoother.process(confirm) {
        let (payload, ok) = match one {
            Confirm::Ack(p) => (p, true),
            Confirm::Nack(p) => (p, false),
        };
        if let Some(job) = jobs.get_mut(payload.delivery_tag as usize - 1) {
            job.confirmed = Some(ok);
        }
    }
}

fn await_confirms(confirms: &Receiver<Confirm>, smoother: &mut ConfirmSmoother, jobs: &mut [Sent]) {
    let end = Instant::now() + CONFIRM_WAIT;
    while jobs.iter().any(|j| j.confirmed.is_none()) {
        let left = end.saturating_duration_since(Instant::now());
        match confirms.recv_timeout(left) {
            Ok(confirm) => settle(smoother, confirm, jobs),
            Err(_) => return,
        }
    }
}

/// Publishes `jobs` copies of `body` (ids `<prefix>-<n>`, no deadline) as fast as confirms
/// allow, with up to 1,000 awaiting a confirm; returns how many the broker confirmed.
pub fn prefill(target: &Target, id_prefix: &str, jobs: u64, body: &[u8]) -> u64 {
    const WINDOW: u64 = 1_000;
    let (connection, channel) = target.open();
    let confirms = channel
        .listen_for_publisher_confirms()
        .expect("listen for confirms");
    channel
        .enable_publisher_confirms()
        .expect("enable confirms");
    let mut smoother = ConfirmSmoother::new();
    let (mut sent, mut acked, mut settled) = (0u64, 0u64, 0u64);
    while settled < jobs {
        while sent < jobs && sent - settled < WINDOW {
            sent += 1;
            let properties = AmqpProperties::default()
                .with_message_id(format!("{id_prefix}-{sent}"))
                .with_delivery_mode(2)
                .with_content_type("text/plain".into());
            channel
                .basic_publish(
                    "",
                    Publish::with_properties(body, target.queue.clone(), properties),
                )
                .expect("publish");
        }
        let Ok(confirm) = confirms.recv_timeout(CONFIRM_WAIT) else {
            break;
        };
        for one in std::iter::once(confirm).chain(confirms.try_iter()) {
            for c in smoother.process(one) {
                settled += 1;
                if matches!(c, Confirm::Ack(_)) {
                    acked += 1;
                }
            }
        }
    }
    close(connection, channel);
    acked
}
