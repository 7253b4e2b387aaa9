//! LaunchDarkly's connections through an HTTP proxy named in the environment: streaming,
//! polling and events reach the fake LaunchDarkly service through a fake proxy, `no_proxy`
//! sends them around it, and the proxy's password goes to the proxy (on `CONNECT`) and into
//! no log line.
//!
//! The environment is never the shell's: each test builds its `Surroundings` from a list of
//! variables. Each test waits for an event (a request at the proxy or the fake, a value in the
//! atomics, a state) with a timeout; none sleeps for a fixed time to let something happen.

mod support;

use flagshed::config::{Config, Surroundings};
use flagshed::flag_source::FlagSource;
use flagshed::flags::{FlagValues, SourceState};
use flagshed::launchdarkly::events::{Evaluation, EventProcessor, EventSettings};
use flagshed::proxy::ProxyEnv;
use launchdarkly_server_sdk_evaluation::ContextBuilder;
use serde_json::json;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use support::capture::{capture_logs, captured};
use support::connect_proxy::{ConnectProxy, Proxied};
use support::fake_ld::{FakeLd, number_flag};

/// Shaped like a real server-side key, and unique enough that finding it in a log line can
/// only mean it leaked.
const SDK_KEY: &str = "sdk-0b6e2d4c-7a91-4c3e-b5f8-PROXYSECRET";

/// The proxy's user and password in the credentials test.
const PROXY_USER: &str = "flagshed";
const PROXY_PASSWORD: &str = "pr0xy-s3cret-9f1c";

/// `base64("flagshed:pr0xy-s3cret-9f1c")`: what Basic authentication puts on the wire, and as
/// good as the password to anyone who reads it.
const PROXY_CREDENTIALS_BASE64: &str = "ZmxhZ3NoZWQ6cHIweHktczNjcmV0LTlmMWM=";

/// Generous: the events waited for take milliseconds, but CI machines stall.
const TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Helpers.

fn wait_until(what: &str, done: impl FnMut() -> bool) {
    support::capture::wait_until(what, TIMEOUT, done);
}

/// Surroundings whose environment holds exactly `vars`.
fn surroundings(vars: &[(&'static str, String)]) -> Surroundings {
    Surroundings {
        proxy: ProxyEnv::from_lookup(|name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.clone())
        }),
        ..Surroundings::default()
    }
}

/// A config pointing every LaunchDarkly URL at `uri`, with `extra` lines in `[launchdarkly]`,
/// loaded in an environment holding `vars`.
fn config(uri: &str, extra: &str, vars: &[(&'static str, String)]) -> Config {
    let text = format!(
        r#"
        [flags]
        file = ""
        context_key = "host-a"

        [launchdarkly]
        sdk_key = "{SDK_KEY}"
        stream_uri = "{uri}"
        base_uri = "{uri}"
        events_uri = "{uri}"
        state_file = ""
        {extra}
        "#
    );
    Config::parse_in(Path::new("ld-proxy-test.toml"), &text, &surroundings(vars))
        .expect("valid config")
}

/// Starts a flag source as the worker daemon would for `config`.
fn start_source(config: &Config) -> (FlagSource, Arc<FlagValues>) {
    support::fake_ld::start_flag_source(flagshed::service::source_settings(
        config,
        flagshed::service::Role::Worker,
    ))
}

/// A fake serving skip-rate 25 %.
fn fake_with_flags() -> FakeLd {
    let fake = FakeLd::start();
    fake.set_flag(number_flag("skip-rate", 1, 25.0));
    fake
}

/// The fake's `host:port`, as a proxy is asked for it.
fn host_port(fake: &FakeLd) -> String {
    fake.uri().trim_start_matches("http://").to_owned()
}

/// Waits for the proxy to see `method` for `path` on the fake; panics with what it saw.
fn wait_for_proxied(proxy: &ConnectProxy, fake: &FakeLd, method: &str, path: &str) -> Proxied {
    let target = host_port(fake);
    proxy
        .wait_for(TIMEOUT, |r| {
            r.method == method && r.target == target && r.path == path
        })
        .unwrap_or_else(|| {
            panic!(
                "the proxy never saw {method} {path} for {target}; it saw {:?}",
                proxy.requests()
            )
        })
}

/// Waits for a captured log line holding every one of `parts`.
fn wait_for_line(parts: &[&str]) -> String {
    let mut found = None;
    wait_until(&format!("a log line with {parts:?}"), || {
        found = captured()
            .into_iter()
            .find(|line| parts.iter().all(|p| line.contains(p)));
        found.is_some()
    });
    found.unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Through the proxy.

#[test]
fn streaming_goes_through_the_proxy() {
    capture_logs();
    let proxy = ConnectProxy::start();
    let fake = fake_with_flags();
    let config = config(&fake.uri(), "", &[("http_proxy", proxy.url())]);
    let (_source, values) = start_source(&config);
    wait_until("skip rate 25 from LaunchDarkly", || {
        values.skip_rate() == 25.0
    });
    wait_for_proxied(&proxy, &fake, "GET", "/all");
    let stream_url = format!("{}/all", fake.uri());
    wait_for_line(&[
        "LaunchDarkly streaming:",
        &stream_url,
        &format!("through the proxy {} (from http_proxy)", proxy.address()),
    ]);
    // The events thread, started by the flag source, was given the same proxy.
    wait_for_line(&[
        "LaunchDarkly events:",
        &format!("through the proxy {}", proxy.address()),
    ]);
}

#[test]
fn polling_goes_through_the_proxy() {
    capture_logs();
    let proxy = ConnectProxy::start();
    let fake = fake_with_flags();
    let config = config(&fake.uri(), "stream = false", &[("ALL_PROXY", proxy.url())]);
    let (_source, values) = start_source(&config);
    wait_until("skip rate 25 from LaunchDarkly", || {
        values.skip_rate() == 25.0
    });
    wait_for_proxied(&proxy, &fake, "GET", "/sdk/latest-all");
    assert!(
        fake.requests_to("/all").is_empty(),
        "polling must not stream"
    );
}

#[test]
fn events_go_through_the_proxy() {
    capture_logs();
    let proxy = ConnectProxy::start();
    let fake = FakeLd::start();
    let config = config(&fake.uri(), "", &[("http_proxy", proxy.url())]);
    // As the flag source builds them (see `start_events`).
    let events = EventProcessor::spawn(EventSettings {
        events_uri: config.launchdarkly.events_uri.clone(),
        proxy: config.launchdarkly.proxy.clone(),
        ..EventSettings::new(SDK_KEY.into())
    })
    .expect("spawn the events thread");
    let context = ContextBuilder::new("host-a")
        .kind("service")
        .build()
        .expect("valid context");
    events.record(vec![Evaluation {
        flag_key: "skip-rate".into(),
        flag_version: Some(1),
        variation: Some(0),
        value: json!(25),
        default: json!(0),
        context,
        count: 3,
        at_ms: 1_000,
    }]);
    events.flush();
    assert!(
        fake.wait_for_bulk_payloads(1, TIMEOUT),
        "no payload arrived; the proxy saw {:?}",
        proxy.requests()
    );
    wait_for_proxied(&proxy, &fake, "POST", "/bulk");
    events.stop();
}

// ---------------------------------------------------------------------------------------------
// Around the proxy.

#[test]
fn no_proxy_sends_connections_around_the_proxy() {
    capture_logs();
    let proxy = ConnectProxy::start();
    let fake = fake_with_flags();
    let config = config(
        &fake.uri(),
        "",
        &[
            ("http_proxy", proxy.url()),
            ("no_proxy", "localhost, 127.0.0.1".into()),
        ],
    );
    let (_source, values) = start_source(&config);
    wait_until("skip rate 25 from LaunchDarkly", || {
        values.skip_rate() == 25.0
    });
    wait_until("the stream at the fake", || {
        !fake.requests_to("/all").is_empty()
    });
    wait_for_line(&[
        "LaunchDarkly streaming:",
        "directly (the host is listed in no_proxy)",
    ]);
    // The events thread decides when it starts, before its first post.
    wait_for_line(&[
        "LaunchDarkly events:",
        "directly (the host is listed in no_proxy)",
    ]);
    assert_eq!(proxy.connections(), 0, "saw {:?}", proxy.requests());
}

// ---------------------------------------------------------------------------------------------
// Credentials.

#[test]
fn proxy_credentials_reach_the_proxy_and_no_log_line() {
    capture_logs();
    let proxy = ConnectProxy::start();
    // An https:// URL makes ureq open a CONNECT tunnel, which carries the credentials. Nothing
    // listens at the target, so the proxy answers 502 and the source is interrupted: what
    // matters is what the proxy and the log saw on the way.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let target = closed.local_addr().expect("address").to_string();
    drop(closed);
    let config = config(
        &format!("https://{target}"),
        "startup_wait_ms = 0",
        &[(
            "HTTPS_PROXY",
            proxy.url_with_credentials(PROXY_USER, PROXY_PASSWORD),
        )],
    );
    assert!(
        config.secrets().contains(&PROXY_PASSWORD.to_owned()),
        "the log scrubber must know the proxy password"
    );
    let (_source, values) = start_source(&config);
    let connect = proxy
        .wait_for(TIMEOUT, |r| r.method == "CONNECT" && r.target == target)
        .unwrap_or_else(|| panic!("no CONNECT for {target}; saw {:?}", proxy.requests()));
    let authorization = connect.proxy_authorization.expect("Proxy-Authorization");
    let (scheme, token) = authorization.split_once(' ').expect("scheme and token");
    assert!(scheme.eq_ignore_ascii_case("basic"), "{authorization}");
    assert_eq!(token, PROXY_CREDENTIALS_BASE64);
    wait_until("the source interrupted", || {
        values.state() == SourceState::Interrupted
    });
    wait_for_line(&[
        "LaunchDarkly streaming:",
        &format!(
            "through the proxy {} (from HTTPS_PROXY, with credentials)",
            proxy.address()
        ),
    ]);
    let lines = captured();
    for secret in [PROXY_PASSWORD, PROXY_CREDENTIALS_BASE64, SDK_KEY] {
        let leaks: Vec<&String> = lines.iter().filter(|l| l.contains(secret)).collect();
        assert!(leaks.is_empty(), "{secret} leaked: {leaks:?}");
    }
    let shown = format!("{config:?}");
    assert!(!shown.contains(PROXY_PASSWORD), "{shown}");
}

#[test]
fn plain_http_requests_carry_no_proxy_credentials() {
    capture_logs();
    let proxy = ConnectProxy::start();
    let fake = fake_with_flags();
    let config = config(
        &fake.uri(),
        "",
        &[(
            "http_proxy",
            proxy.url_with_credentials(PROXY_USER, PROXY_PASSWORD),
        )],
    );
    let (_source, values) = start_source(&config);
    wait_until("skip rate 25 from LaunchDarkly", || {
        values.skip_rate() == 25.0
    });
    // ureq 2 sends Proxy-Authorization only on CONNECT, which it uses for https:// only: a
    // proxy that insists on credentials refuses plain http:// (see the proxy module's notes).
    let request = wait_for_proxied(&proxy, &fake, "GET", "/all");
    assert_eq!(request.proxy_authorization, None);
    let leaks: Vec<String> = captured()
        .into_iter()
        .filter(|l| l.contains(PROXY_PASSWORD) || l.contains(PROXY_CREDENTIALS_BASE64))
        .collect();
    assert!(leaks.is_empty(), "{leaks:?}");
}
