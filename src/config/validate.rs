//! Validation: every value of a [`RawConfig`] checked, defaults filled in, errors naming the
//! file and the key.

use super::raw::*;
use super::*;
use crate::broker_address::BrokerAddress;
use crate::proxy::ProxyRules;

impl Config {
    /// Checks every value of `raw` and fills in the defaults documented in flagshed.toml(5).
    pub fn from_raw(
        path: &Path,
        raw: RawConfig,
        surroundings: &Surroundings,
    ) -> Result<Config, ConfigError> {
        let check = Checker { path };
        let b = raw.broker;
        let addresses = check.broker_addresses(b.url, b.urls)?;
        let addresses: Vec<BrokerAddress> = addresses
            .into_iter()
            .map(|a| a.with_default_password(surroundings.broker_password.as_deref()))
            .collect();
        let tls = check.tls_files(
            addresses.iter().any(|a| a.tls),
            b.tls_ca_file,
            b.tls_cert_file,
            b.tls_key_file,
        )?;
        let broker = BrokerConfig {
            addresses,
            tls,
            queue: check.name("broker.queue", b.queue, "flagshed.jobs")?,
            durable: b.durable.unwrap_or(true),
            queue_type: match b.queue_type.as_deref() {
                None | Some("classic") => QueueType::Classic,
                Some("quorum") => QueueType::Quorum,
                Some(other) => {
                    return Err(check.invalid(
                        "broker.queue_type",
                        format!("expected \"classic\" or \"quorum\", got {other:?}"),
                    ));
                }
            },
            dead_letter_exchange: b.dead_letter_exchange.filter(|s| !s.is_empty()),
            max_length: b.max_length.filter(|&n| n > 0),
            overflow: match b.overflow.as_deref() {
                None | Some("drop-head") => Overflow::DropHead,
                Some("reject-publish") => Overflow::RejectPublish,
                Some("reject-publish-dlx") => Overflow::RejectPublishDlx,
                Some(other) => {
                    return Err(check.invalid(
                        "broker.overflow",
                        format!(
                            "expected \"drop-head\", \"reject-publish\" or \"reject-publish-dlx\", got {other:?}"
                        ),
                    ));
                }
            },
            delivery_limit: match b.delivery_limit {
                None | Some(0) => None,
                Some(n) => {
                    Some(
                        check.range("broker.delivery_limit", Some(n), 0, 1..=i32::MAX as u64)?
                            as u32,
                    )
                }
            },
            heartbeat_secs: b.heartbeat_secs.unwrap_or(30),
            connect_timeout: Duration::from_millis(check.range(
                "broker.connect_timeout_ms",
                b.connect_timeout_ms,
                5_000,
                100..=600_000,
            )?),
        };
        if broker.delivery_limit.is_some() && broker.queue_type != QueueType::Quorum {
            return Err(check.invalid(
                "broker.delivery_limit",
                "only quorum queues count deliveries; set queue_type = \"quorum\" or delivery_limit = 0".into(),
            ));
        }
        if broker.queue_type == QueueType::Quorum && !broker.durable {
            return Err(check.invalid(
                "broker.durable",
                "quorum queues are always durable; set durable = true".into(),
            ));
        }

        let w = raw.worker;
        let concurrency = check.range("worker.concurrency", w.concurrency, 4, 1..=4096)?;
        let prefetch = match w.prefetch {
            None | Some(0) => concurrency,
            Some(n) => check.range("worker.prefetch", Some(n), 0, 1..=65_535)?,
        };
        let worker = WorkerConfig {
            concurrency: concurrency as usize,
            prefetch: u16::try_from(prefetch).map_err(|_| {
                check.invalid(
                    "worker.prefetch",
                    format!("{prefetch} is more than 65535 (set prefetch explicitly)"),
                )
            })?,
            default_work_ms: check.range(
                "worker.default_work_ms",
                w.default_work_ms,
                1_000,
                0..=86_400_000,
            )?,
            default_ttl_ms: w.default_ttl_ms.filter(|&n| n > 0),
            drop_doomed: w.drop_doomed.unwrap_or(true),
            shed_action: match w.shed_action.as_deref() {
                None | Some("reject") => ShedAction::Reject,
                Some("ack") => ShedAction::Ack,
                Some(other) => {
                    return Err(check.invalid(
                        "worker.shed_action",
                        format!("expected \"reject\" or \"ack\", got {other:?}"),
                    ));
                }
            },
            drain_grace: Duration::from_millis(check.range(
                "worker.drain_grace_ms",
                w.drain_grace_ms,
                25_000,
                0..=3_600_000,
            )?),
            ledger_file: w.ledger_file.filter(|p| !p.as_os_str().is_empty()),
            estimate: EstimateSettings {
                quantile: check.float(
                    "worker.estimate_quantile",
                    w.estimate_quantile,
                    ESTIMATE_DEFAULTS.quantile,
                    0.5,
                    0.999,
                )?,
                half_life_jobs: check.range(
                    "worker.estimate_half_life_jobs",
                    w.estimate_half_life_jobs,
                    ESTIMATE_DEFAULTS.half_life_jobs as u64,
                    1..=1_000_000,
                )? as u32,
                half_life_ms: check.range(
                    "worker.estimate_half_life_ms",
                    w.estimate_half_life_ms,
                    ESTIMATE_DEFAULTS.half_life_ms,
                    1..=86_400_000,
                )?,
                min_jobs: check.range(
                    "worker.estimate_min_jobs",
                    w.estimate_min_jobs,
                    ESTIMATE_DEFAULTS.min_jobs as u64,
                    1..=1_000_000,
                )? as u32,
                probe_interval_ms: check.range(
                    "worker.estimate_probe_interval_ms",
                    w.estimate_probe_interval_ms,
                    ESTIMATE_DEFAULTS.probe_interval_ms,
                    1..=3_600_000,
                )?,
                objective: match w.shed_objective.as_deref() {
                    None => ESTIMATE_DEFAULTS.objective,
                    Some(word) => Objective::parse(word).ok_or_else(|| {
                        check.invalid(
                            "worker.shed_objective",
                            format!(
                                "expected \"fewest_stopped\" or \"most_on_time\", got {word:?}"
                            ),
                        )
                    })?,
                },
            },
            max_job_types: check.range("worker.max_job_types", w.max_job_types, 32, 1..=1024)?
                as usize,
            max_concurrency: match w.max_concurrency {
                None | Some(0) => concurrency as usize,
                Some(n) => {
                    check.range("worker.max_concurrency", Some(n), 0, concurrency..=4096)? as usize
                }
            },
        };
        let handler = check.handler(raw.handler)?;

        let q = raw.queuer;
        let queuer = QueuerConfig {
            ttl_ms: check.range("queuer.ttl_ms", q.ttl_ms, 5_000, 1..=u32::MAX as u64)?,
            work_ms: check.range("queuer.work_ms", q.work_ms, 1_000, 0..=86_400_000)?,
            persistent: q.persistent.unwrap_or(true),
            confirms: q.confirms.unwrap_or(true),
            confirm_window: check.range(
                "queuer.confirm_window",
                q.confirm_window,
                1_000,
                1..=1_000_000,
            )? as usize,
            payload_bytes: check.range(
                "queuer.payload_bytes",
                q.payload_bytes,
                100,
                0..=16 * 1024 * 1024,
            )? as usize,
            max_jobs: q.max_jobs.filter(|&n| n > 0),
            drain_grace: Duration::from_millis(check.range(
                "queuer.drain_grace_ms",
                q.drain_grace_ms,
                10_000,
                0..=3_600_000,
            )?),
            ledger_file: q.ledger_file.filter(|p| !p.as_os_str().is_empty()),
        };

        let f = raw.flags;
        let flags = FlagsConfig {
            file: path_or_default(f.file, DEFAULT_FLAG_FILE),
            file_check: Duration::from_millis(check.range(
                "flags.file_check_ms",
                f.file_check_ms,
                1_000,
                10..=3_600_000,
            )?),
            skip_rate_key: check.name("flags.skip_rate_key", f.skip_rate_key, "skip-rate")?,
            rate_key: check.name("flags.rate_key", f.rate_key, "task-rate")?,
            skip_rate_fallback: check.float(
                "flags.skip_rate_fallback",
                f.skip_rate_fallback,
                0.0,
                0.0,
                100.0,
            )?,
            rate_fallback: check.float(
                "flags.rate_fallback",
                f.rate_fallback,
                1.0,
                0.0,
                crate::flags::MAX_RATE_PER_SEC,
            )?,
            context_kind: check.name("flags.context_kind", f.context_kind, "service")?,
            context_key: match f.context_key.filter(|k| !k.is_empty()) {
                Some(key) => key,
                None if surroundings.host_name.is_empty() => "localhost".to_owned(),
                None => surroundings.host_name.clone(),
            },
            host: match surroundings.host_name.as_str() {
                "" => "localhost".to_owned(),
                name => name.to_owned(),
            },
            pause_key: check.optional_name("flags.pause_key", f.pause_key)?,
            concurrency_key: check.optional_name("flags.concurrency_key", f.concurrency_key)?,
            deadline_aware_key: check
                .optional_name("flags.deadline_aware_key", f.deadline_aware_key)?,
            shed_objective_key: check
                .optional_name("flags.shed_objective_key", f.shed_objective_key)?,
        };
        if flags.context_kind == "multi" || flags.context_kind == "kind" {
            return Err(check.invalid(
                "flags.context_kind",
                format!("{:?} is reserved by LaunchDarkly", flags.context_kind),
            ));
        }

        let l = raw.launchdarkly;
        let sdk_key = l
            .sdk_key
            .filter(|k| !k.is_empty())
            .or_else(|| surroundings.sdk_key.clone());
        // Checked only when LaunchDarkly is used: a host-wide proxy setting that flagshed cannot
        // use must not stop a daemon that reads a flag file.
        let proxy = match sdk_key {
            Some(_) => ProxyRules::from_env(&surroundings.proxy).map_err(ConfigError::Proxy)?,
            None => None,
        };
        let launchdarkly = LaunchDarklyConfig {
            sdk_key,
            stream: l.stream.unwrap_or(true),
            stream_uri: check.http_uri(
                "launchdarkly.stream_uri",
                l.stream_uri,
                "https://stream.launchdarkly.com",
            )?,
            base_uri: check.http_uri(
                "launchdarkly.base_uri",
                l.base_uri,
                "https://sdk.launchdarkly.com",
            )?,
            poll_interval: Duration::from_secs(check.range(
                "launchdarkly.poll_interval_secs",
                l.poll_interval_secs,
                MIN_POLL_INTERVAL_SECS,
                MIN_POLL_INTERVAL_SECS..=86_400,
            )?),
            startup_wait: Duration::from_millis(check.range(
                "launchdarkly.startup_wait_ms",
                l.startup_wait_ms,
                5_000,
                0..=600_000,
            )?),
            state_file: path_or_default(l.state_file, DEFAULT_STATE_FILE),
            events: l.events.unwrap_or(true),
            events_uri: check.http_uri(
                "launchdarkly.events_uri",
                l.events_uri,
                "https://events.launchdarkly.com",
            )?,
            events_flush: Duration::from_millis(check.range(
                "launchdarkly.events_flush_ms",
                l.events_flush_ms,
                5_000,
                100..=3_600_000,
            )?),
            proxy,
        };

        let lg = raw.log;
        let log = LogConfig {
            level: match lg.level.as_deref() {
                None => log::LevelFilter::Info,
                Some(text) => text.parse().map_err(|_| {
                    check.invalid(
                        "log.level",
                        format!(
                            "expected one of off, error, warn, info, debug, trace; got {text:?}"
                        ),
                    )
                })?,
            },
            stats_interval: Duration::from_millis(check.range(
                "log.stats_interval_ms",
                lg.stats_interval_ms,
                10_000,
                100..=86_400_000,
            )?),
        };

        let m = raw.metrics;
        let metrics = MetricsConfig {
            worker_listen: check.listen_address("metrics.worker_listen", m.worker_listen)?,
            queuer_listen: check.listen_address("metrics.queuer_listen", m.queuer_listen)?,
        };
        if let (Some(worker), Some(queuer)) = (metrics.worker_listen, metrics.queuer_listen) {
            if worker == queuer && worker.port() != 0 {
                return Err(check.invalid(
                    "metrics.queuer_listen",
                    format!(
                        "{queuer} is metrics.worker_listen too; the two daemons need an address each"
                    ),
                ));
            }
        }

        Ok(Config {
            path: path.to_owned(),
            broker,
            worker,
            handler,
            queuer,
            flags,
            launchdarkly,
            log,
            metrics,
            surroundings: surroundings.clone(),
        })
    }
}

/// The program of `handler.command` as an absolute path: as given if it holds a `/`, else
/// the first executable of that name in `path` (the handler's `PATH`), as a shell would.
fn resolve_program(program: &str, path: &str) -> Result<PathBuf, String> {
    if program.contains('/') {
        let candidate = PathBuf::from(program);
        return match is_executable_file(&candidate) {
            Ok(()) => Ok(candidate),
            Err(why) => Err(format!("cannot run {program:?}: {why}")),
        };
    }
    path.split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(program))
        .find(|candidate| is_executable_file(candidate).is_ok())
        .ok_or_else(|| format!("no executable {program:?} in the handler's PATH ({path})"))
}

fn is_executable_file(path: &Path) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| "the path holds a NUL byte".to_owned())?;
    // SAFETY: access(2) reads a NUL-terminated path we own.
    if unsafe { libc::access(c_path.as_ptr(), libc::X_OK) } != 0 {
        return Err(format!(
            "not executable by this user ({})",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// A path key: absent means the default, `""` means none.
fn path_or_default(value: Option<PathBuf>, default: &str) -> Option<PathBuf> {
    match value {
        None => Some(PathBuf::from(default)),
        Some(path) if path.as_os_str().is_empty() => None,
        Some(path) => Some(path),
    }
}

/// Validation helpers that all produce errors naming the file and key.
struct Checker<'a> {
    path: &'a Path,
}

impl Checker<'_> {
    fn invalid(&self, key: &'static str, message: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_owned(),
            key,
            message,
        }
    }

    fn range(
        &self,
        key: &'static str,
        value: Option<u64>,
        default: u64,
        allowed: std::ops::RangeInclusive<u64>,
    ) -> Result<u64, ConfigError> {
        let value = value.unwrap_or(default);
        if allowed.contains(&value) {
            Ok(value)
        } else {
            Err(self.invalid(
                key,
                format!(
                    "expected a whole number from {} to {}, got {value}",
                    allowed.start(),
                    allowed.end()
                ),
            ))
        }
    }

    fn float(
        &self,
        key: &'static str,
        value: Option<f64>,
        default: f64,
        min: f64,
        max: f64,
    ) -> Result<f64, ConfigError> {
        let value = value.unwrap_or(default);
        if value.is_finite() && (min..=max).contains(&value) {
            Ok(value)
        } else {
            Err(self.invalid(
                key,
                format!("expected a number from {min} to {max}, got {value}"),
            ))
        }
    }

    /// A flag key that may be left out or empty (the lever is not watched).
    fn optional_name(
        &self,
        key: &'static str,
        value: Option<String>,
    ) -> Result<Option<String>, ConfigError> {
        match value.filter(|v| !v.is_empty()) {
            None => Ok(None),
            Some(v) => self.name(key, Some(v), "").map(Some),
        }
    }

    fn name(
        &self,
        key: &'static str,
        value: Option<String>,
        default: &str,
    ) -> Result<String, ConfigError> {
        let value = value.unwrap_or_else(|| default.to_owned());
        if value.is_empty() || value.len() > 255 || value.chars().any(char::is_control) {
            return Err(self.invalid(
                key,
                format!("expected 1 to 255 printable characters, got {value:?}"),
            ));
        }
        Ok(value)
    }

    /// `broker.url` (one node) or `broker.urls` (a cluster's members), not both.
    fn broker_addresses(
        &self,
        url: Option<String>,
        urls: Option<Vec<String>>,
    ) -> Result<Vec<BrokerAddress>, ConfigError> {
        let (key, urls) = match (url, urls) {
            (Some(_), Some(_)) => {
                return Err(self.invalid(
                    "broker.urls",
                    "set broker.url for one node or broker.urls for several, not both".into(),
                ));
            }
            (Some(url), None) => ("broker.url", vec![url]),
            (None, Some(urls)) if urls.is_empty() => {
                return Err(self.invalid(
                    "broker.urls",
                    "expected at least one amqp:// or amqps:// URL".into(),
                ));
            }
            (None, Some(urls)) => ("broker.urls", urls),
            (None, None) => (
                "broker.url",
                vec!["amqp://guest:guest@127.0.0.1:5672/%2f".to_owned()],
            ),
        };
        urls.iter()
            .enumerate()
            .map(|(i, url)| {
                BrokerAddress::parse(url).map_err(|why| {
                    let which = if key == "broker.urls" {
                        format!("URL number {}: ", i + 1)
                    } else {
                        String::new()
                    };
                    self.invalid(key, format!("{which}{why}"))
                })
            })
            .collect()
    }

    /// `broker.tls_*`: only with an `amqps://` node; a client certificate with its key.
    fn tls_files(
        &self,
        any_tls: bool,
        ca_file: Option<PathBuf>,
        cert_file: Option<PathBuf>,
        key_file: Option<PathBuf>,
    ) -> Result<TlsFiles, ConfigError> {
        let nonempty = |p: Option<PathBuf>| p.filter(|p| !p.as_os_str().is_empty());
        let (ca_file, cert_file, key_file) =
            (nonempty(ca_file), nonempty(cert_file), nonempty(key_file));
        if !any_tls {
            for (key, set) in [
                ("broker.tls_ca_file", ca_file.is_some()),
                ("broker.tls_cert_file", cert_file.is_some()),
                ("broker.tls_key_file", key_file.is_some()),
            ] {
                if set {
                    return Err(self.invalid(
                        key,
                        "is only used with amqps:// URLs; use amqps:// or remove it".into(),
                    ));
                }
            }
        }
        if let Some(ca) = &ca_file {
            self.pem_file("broker.tls_ca_file", ca, "CERTIFICATE")?;
        }
        let client = match (cert_file, key_file) {
            (None, None) => None,
            (Some(cert), Some(key)) => {
                self.pem_file("broker.tls_cert_file", &cert, "CERTIFICATE")?;
                self.pem_file("broker.tls_key_file", &key, "PRIVATE KEY")?;
                Some((cert, key))
            }
            (Some(_), None) => {
                return Err(self.invalid(
                    "broker.tls_key_file",
                    "is needed with broker.tls_cert_file".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(self.invalid(
                    "broker.tls_cert_file",
                    "is needed with broker.tls_key_file".into(),
                ));
            }
        };
        Ok(TlsFiles { ca_file, client })
    }

    /// Checks that `path` is readable and holds a PEM block of `kind`; never quotes it.
    fn pem_file(&self, key: &'static str, path: &Path, kind: &str) -> Result<(), ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| self.invalid(key, format!("cannot read {}: {e}", path.display())))?;
        let found = text.lines().any(|l| {
            let l = l.trim_end();
            l == format!("-----BEGIN {kind}-----")
                || (kind == "CERTIFICATE" && l == "-----BEGIN TRUSTED CERTIFICATE-----")
        });
        if !found {
            let expected = if kind == "PRIVATE KEY" {
                "a PEM PKCS#8 private key (-----BEGIN PRIVATE KEY-----; convert others with `openssl pkcs8 -topk8 -nocrypt`)"
            } else {
                "a PEM certificate (-----BEGIN CERTIFICATE-----)"
            };
            return Err(self.invalid(key, format!("{} is not {expected}", path.display())));
        }
        Ok(())
    }

    /// `[handler]`: the kind and what it needs, refusing keys that belong to another kind.
    fn handler(&self, h: RawHandler) -> Result<HandlerConfig, ConfigError> {
        let kind_name = h.kind.as_deref().unwrap_or("simulated");
        let unused = |key: &'static str, set: bool| {
            if set {
                Err(self.invalid(
                    key,
                    format!("is not used by handler.kind = {kind_name:?}; remove it"),
                ))
            } else {
                Ok(())
            }
        };
        let kind = match kind_name {
            "simulated" => {
                unused("handler.command", h.command.is_some())?;
                unused("handler.env", h.env.is_some())?;
                unused("handler.url", h.url.is_some())?;
                HandlerKind::Simulated
            }
            "exec" => {
                unused("handler.url", h.url.is_some())?;
                let env = self.handler_env(h.env.unwrap_or_default())?;
                let mut argv = h.command.unwrap_or_default().into_iter();
                let Some(program) = argv.next().filter(|p| !p.is_empty()) else {
                    return Err(self.invalid(
                        "handler.command",
                        "expected the program and its arguments, e.g. [\"/usr/local/bin/resize\", \"--fast\"]".into(),
                    ));
                };
                let args: Vec<String> = argv.collect();
                if args.iter().any(|a| a.contains('\0')) {
                    return Err(
                        self.invalid("handler.command", "an argument holds a NUL byte".into())
                    );
                }
                let path = env
                    .iter()
                    .find(|(k, _)| k == "PATH")
                    .map_or(HANDLER_DEFAULT_PATH, |(_, v)| v.as_str());
                let program = resolve_program(&program, path)
                    .map_err(|why| self.invalid("handler.command", why))?;
                HandlerKind::Exec { program, args, env }
            }
            "http" => {
                unused("handler.command", h.command.is_some())?;
                unused("handler.env", h.env.is_some())?;
                let Some(url) = h.url.filter(|u| !u.is_empty()) else {
                    return Err(self.invalid(
                        "handler.url",
                        "expected the URL jobs are POSTed to, e.g. \"http://127.0.0.1:8080/jobs\""
                            .into(),
                    ));
                };
                let valid = url::Url::parse(&url)
                    .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host());
                if !valid {
                    return Err(self.invalid(
                        "handler.url",
                        format!(
                            "expected an http:// or https:// URL, got {:?}",
                            redact_userinfo(&url)
                        ),
                    ));
                }
                HandlerKind::Http {
                    url,
                    connect_timeout: Duration::from_millis(self.range(
                        "handler.connect_timeout_ms",
                        h.connect_timeout_ms,
                        5_000,
                        1..=600_000,
                    )?),
                }
            }
            other => {
                return Err(self.invalid(
                    "handler.kind",
                    format!("expected \"simulated\", \"exec\" or \"http\", got {other:?}"),
                ));
            }
        };
        if !matches!(kind, HandlerKind::Http { .. }) {
            unused("handler.connect_timeout_ms", h.connect_timeout_ms.is_some())?;
        }
        Ok(HandlerConfig {
            kind,
            enforce_deadline: h.enforce_deadline.unwrap_or(true),
            kill_grace: Duration::from_millis(self.range(
                "handler.kill_grace_ms",
                h.kill_grace_ms,
                2_000,
                0..=600_000,
            )?),
            output_limit_bytes: self.range(
                "handler.output_limit_bytes",
                h.output_limit_bytes,
                16 * 1024,
                0..=16 * 1024 * 1024,
            )? as usize,
            output_limit_lines: self.range(
                "handler.output_limit_lines",
                h.output_limit_lines,
                100,
                0..=1_000_000,
            )? as usize,
            max_retries: self.range("handler.max_retries", h.max_retries, 5, 0..=1_000)? as u32,
            retry_delay: Duration::from_millis(self.range(
                "handler.retry_delay_ms",
                h.retry_delay_ms,
                1_000,
                0..=600_000,
            )?),
            when_unavailable: match h.when_unavailable.as_deref() {
                None | Some("hold") => WhenUnavailable::Hold,
                Some("fail") => WhenUnavailable::Fail,
                Some(other) => {
                    return Err(self.invalid(
                        "handler.when_unavailable",
                        format!("expected \"hold\" or \"fail\", got {other:?}"),
                    ));
                }
            },
        })
    }

    /// The exec child's environment: `PATH` and `LANG`, then the operator's table.
    fn handler_env(
        &self,
        table: BTreeMap<String, String>,
    ) -> Result<Vec<(String, String)>, ConfigError> {
        let mut env = vec![
            ("PATH".to_owned(), HANDLER_DEFAULT_PATH.to_owned()),
            ("LANG".to_owned(), "C.UTF-8".to_owned()),
        ];
        for (name, value) in table {
            let valid_name = name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid_name {
                return Err(self.invalid(
                    "handler.env",
                    format!("{name:?} is not a variable name (letters, digits and _)"),
                ));
            }
            if name.starts_with("FLAGSHED_") {
                return Err(self.invalid(
                    "handler.env",
                    format!("{name} is reserved: FLAGSHED_* variables carry the job's facts"),
                ));
            }
            if value.contains('\0') {
                return Err(self.invalid(
                    "handler.env",
                    format!("the value of {name} holds a NUL byte"),
                ));
            }
            env.retain(|(k, _)| *k != name);
            env.push((name, value));
        }
        Ok(env)
    }

    /// A socket address to listen on (`"127.0.0.1:9464"`, `"[::1]:9464"`); absent or `""`
    /// is none. Port 0 lets the kernel pick one, which the daemon logs.
    fn listen_address(
        &self,
        key: &'static str,
        value: Option<String>,
    ) -> Result<Option<SocketAddr>, ConfigError> {
        match value.as_deref() {
            None | Some("") => Ok(None),
            Some(text) => text.parse().map(Some).map_err(|_| {
                self.invalid(
                    key,
                    format!(
                        "expected an IP address and port such as \"127.0.0.1:9464\" or \"[::1]:9464\", or \"\" for none; got {text:?}"
                    ),
                )
            }),
        }
    }

    fn http_uri(
        &self,
        key: &'static str,
        value: Option<String>,
        default: &str,
    ) -> Result<String, ConfigError> {
        let value = value.unwrap_or_else(|| default.to_owned());
        match url::Url::parse(&value) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.has_host() => {
                Ok(value.trim_end_matches('/').to_owned())
            }
            _ => Err(self.invalid(
                key,
                format!("expected an http:// or https:// URL, got {value:?}"),
            )),
        }
    }
}
