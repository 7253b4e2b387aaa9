//! Which HTTP proxy, if any, each LaunchDarkly connection (streaming, polling, events) goes
//! through: many hosts reach the internet only through one.
//!
//! The proxy comes from the environment, read once at start by
//! [`Surroundings::read`](crate::config::Surroundings::read) into a [`ProxyEnv`], checked by
//! the config into [`ProxyRules`], and applied per target URL by [`route`]. The rules are
//! curl's, so that an operator who can `curl` LaunchDarkly from the host knows flagshed can:
//!
//! - an `https://` URL uses `https_proxy`, else `HTTPS_PROXY`, else `all_proxy`, else
//!   `ALL_PROXY`; an `http://` URL uses `http_proxy`, else `all_proxy`, else `ALL_PROXY`.
//!   `HTTP_PROXY` in capitals is ignored, as curl ignores it: a CGI program gets `HTTP_PROXY`
//!   from a request's `Proxy:` header, so trusting it lets a client pick the proxy. Lowercase
//!   wins over capitals wherever both are read; a variable that is set but empty still counts
//!   as set (it stops the search) and means "no proxy", which is how a drop-in turns off a
//!   host-wide proxy (`Environment=https_proxy=`).
//! - `no_proxy`, else `NO_PROXY`, lists hosts reached directly: entries separated by commas
//!   (or white space); `*` matches every host; a name matches itself and every name below it,
//!   with or without a leading dot (`example.com` and `.example.com` both match `example.com`
//!   and `a.example.com`, never `badexample.com`); an IP address matches that address exactly
//!   and a network (`10.0.0.0/8`, `fd00::/8`) every address in it, as in curl 7.86 and later.
//!   An entry may end in `:port` (`[::1]:8080` for IPv6) to match that port only, which curl
//!   does not offer. Names are not resolved: `localhost` does not match `127.0.0.1`.
//! - A proxy is written `[http://][user[:password]@]host[:port]`, the user and password
//!   percent-encoded where needed; without a port it is 1080, curl's default.
//!
//! How ureq 2.12 (the HTTP client) uses the proxy, read from its `stream.rs` and `unit.rs`:
//!
//! - For an `https://` URL it opens TCP to the proxy, sends `CONNECT host:port HTTP/1.1` with
//!   `Proxy-Authorization: basic ...` when the proxy URL has a user and password, and needs a
//!   `200` answer (401 or 407 becomes "Provided proxy credentials are incorrect", anything else
//!   "Proxy failed to connect", both transport errors, so retried). TLS then runs end to end
//!   through the tunnel: the proxy sees the host name and port, never the SDK key. The name is
//!   resolved by the proxy, so the host needs no DNS for LaunchDarkly's names. Inside the
//!   tunnel ureq writes the request line in absolute form (`GET https://host/all`), which
//!   every HTTP/1.1 server must accept.
//! - For an `http://` URL it does **not** use CONNECT: the request goes to the proxy in
//!   absolute form (`GET http://host:port/all`), readable by the proxy, `Authorization` (the
//!   SDK key) included, and without `Proxy-Authorization`, so a proxy that asks for
//!   credentials refuses it with 407, which (like every 4xx LaunchDarkly's SDKs do not retry)
//!   turns the connection off until a restart. Plain `http://` is for a Relay Proxy on a
//!   trusted network, which belongs in `no_proxy`.
//! - Only `http://` proxies work: this build has no SOCKS support, and ureq 2 cannot speak TLS
//!   to the proxy itself; nor can it reach a proxy by IPv6 literal. Such a proxy is refused at
//!   start, naming the variable, rather than failing at every connection.
//! - The connect timeout covers the TCP connection to the proxy; the proxy's answer to
//!   `CONNECT` waits at most the read timeout. A redirect is followed to wherever it points,
//!   through the same proxy, without asking `no_proxy` again.
//!
//! The invariant: a proxy password is only ever handed to ureq (which writes it only into the
//! `CONNECT` request); it is in no `Debug` output, error or log line, and
//! [`ProxyRules::secrets`] gives it to the log scrubber as a last line of defence.

use std::fmt;
use std::net::IpAddr;

/// The port of a proxy whose URL names none: curl's default.
pub const DEFAULT_PROXY_PORT: u16 = 1080;

/// One environment variable as found: which spelling was set, and its value.
#[derive(Clone, PartialEq, Eq)]
pub struct EnvValue {
    /// The variable's name, for messages (`https_proxy`, `ALL_PROXY`, ...).
    pub variable: &'static str,
    /// Its value, unchecked; may hold a password.
    pub value: String,
}

/// The proxy variables the environment holds, each already chosen by curl's precedence and
/// not yet checked, so that reading the environment cannot fail and a bad value becomes a
/// config error naming its variable.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ProxyEnv {
    /// For `https://` URLs: `https_proxy`, else `HTTPS_PROXY`, else `all_proxy`, else
    /// `ALL_PROXY`.
    pub https: Option<EnvValue>,
    /// For `http://` URLs: `http_proxy`, else `all_proxy`, else `ALL_PROXY`; never
    /// `HTTP_PROXY`.
    pub http: Option<EnvValue>,
    /// `no_proxy`, else `NO_PROXY`.
    pub no_proxy: Option<EnvValue>,
    /// `HTTP_PROXY` holds a proxy while `http_proxy` is unset: it is ignored, and the startup
    /// line for an `http://` URL says so, since that is a surprise to anyone who has not met
    /// curl's rule.
    pub http_proxy_uppercase_ignored: bool,
}

impl ProxyEnv {
    /// Picks the variables through `lookup` (a variable's value, or `None` when unset), so that
    /// a test can give its own environment instead of the process's.
    pub fn from_lookup(lookup: impl Fn(&'static str) -> Option<String>) -> ProxyEnv {
        let first = |names: &[&'static str]| {
            names
                .iter()
                .find_map(|&variable| lookup(variable).map(|value| EnvValue { variable, value }))
        };
        let http = first(&["http_proxy", "all_proxy", "ALL_PROXY"]);
        ProxyEnv {
            https: first(&["https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"]),
            http_proxy_uppercase_ignored: http.as_ref().is_none_or(|v| v.variable != "http_proxy")
                && lookup("HTTP_PROXY").is_some_and(|v| !v.trim().is_empty()),
            http,
            no_proxy: first(&["no_proxy", "NO_PROXY"]),
        }
    }

    /// The process's own environment: only [`Surroundings::read`](crate::config::Surroundings::read)
    /// calls this. A value that is not UTF-8 is kept (lossily) so that it fails the checks
    /// under its own name instead of passing for unset.
    pub fn from_process() -> ProxyEnv {
        ProxyEnv::from_lookup(|name| {
            std::env::var_os(name).map(|v| v.to_string_lossy().into_owned())
        })
    }
}

/// Names the variables found; only `no_proxy`'s value is shown, since a proxy's may hold a
/// password.
impl fmt::Debug for ProxyEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = |v: &Option<EnvValue>| v.as_ref().map(|v| v.variable);
        f.debug_struct("ProxyEnv")
            .field("https", &name(&self.https))
            .field("http", &name(&self.http))
            .field(
                "no_proxy",
                &self
                    .no_proxy
                    .as_ref()
                    .map(|v| (v.variable, v.value.as_str())),
            )
            .field(
                "http_proxy_uppercase_ignored",
                &self.http_proxy_uppercase_ignored,
            )
            .finish()
    }
}

/// Why a proxy variable was refused. The message names the variable and what is wrong, and
/// never quotes the value, which may hold a password.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyError {
    /// The variable as set (`https_proxy`, `ALL_PROXY`, ...).
    pub variable: &'static str,
    /// What is wrong with its value.
    pub problem: ProxyProblem,
}

/// What is wrong with a proxy URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProxyProblem {
    /// A scheme other than `http://`: `https://` (TLS to the proxy) and `socks*://` are not
    /// supported by the HTTP client as built. Carries the scheme when it is a plain word.
    UnsupportedScheme(Option<String>),
    /// No host name after the scheme and credentials.
    NoHost,
    /// The host is an IPv6 literal, which ureq 2 cannot connect a proxy to.
    Ipv6Host,
    /// The host holds characters no host name has.
    BadHost,
    /// The port is not a number from 1 to 65535.
    BadPort,
    /// The user name holds a `:` once decoded, which Basic authentication cannot carry.
    ColonInUser,
    /// A `%` in the user or password is not followed by two hex digits, or the decoded bytes
    /// are not UTF-8.
    BadPercentEncoding,
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let problem = match &self.problem {
            ProxyProblem::UnsupportedScheme(Some(scheme)) if scheme == "https" => {
                "an https:// proxy (TLS to the proxy) is not supported; use http://, which still \
                 keeps https:// connections encrypted end to end through CONNECT"
                    .to_owned()
            }
            ProxyProblem::UnsupportedScheme(Some(scheme)) => {
                format!("the proxy scheme {scheme}:// is not supported, only http://")
            }
            ProxyProblem::UnsupportedScheme(None) => {
                "the proxy scheme is not supported, only http://".to_owned()
            }
            ProxyProblem::NoHost => "no proxy host name".to_owned(),
            ProxyProblem::Ipv6Host => {
                "a proxy given by IPv6 address is not supported; use a host name".to_owned()
            }
            ProxyProblem::BadHost => "the proxy host name is not a valid host name".to_owned(),
            ProxyProblem::BadPort => "the proxy port is not a number from 1 to 65535".to_owned(),
            ProxyProblem::ColonInUser => "the proxy user name holds a ':'".to_owned(),
            ProxyProblem::BadPercentEncoding => {
                "the proxy user name or password has a % not followed by two hex digits, or is \
                 not UTF-8 once decoded (write % as %25)"
                    .to_owned()
            }
        };
        write!(
            f,
            "environment variable {}: {problem}; expected http://[user:password@]host[:port]",
            self.variable
        )
    }
}

impl std::error::Error for ProxyError {}

/// The checked proxy settings: a proxy per scheme and the hosts reached directly.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyRules {
    https: Option<ProxyServer>,
    http: Option<ProxyServer>,
    no_proxy: NoProxy,
    http_proxy_uppercase_ignored: bool,
}

impl ProxyRules {
    /// Checks the variables. `Ok(None)` when the environment names no proxy at all, so that
    /// "every connection is direct" has one spelling.
    pub fn from_env(env: &ProxyEnv) -> Result<Option<ProxyRules>, ProxyError> {
        let server = |value: &Option<EnvValue>| match value {
            Some(v) if !v.value.trim().is_empty() => {
                ProxyServer::parse(v.variable, v.value.trim()).map(Some)
            }
            // Unset, or set empty: curl's "no proxy for this scheme".
            _ => Ok(None),
        };
        let rules = ProxyRules {
            https: server(&env.https)?,
            http: server(&env.http)?,
            no_proxy: env
                .no_proxy
                .as_ref()
                .map(|v| NoProxy::parse(v.variable, &v.value))
                .unwrap_or_default(),
            http_proxy_uppercase_ignored: env.http_proxy_uppercase_ignored,
        };
        let relevant =
            rules.https.is_some() || rules.http.is_some() || rules.http_proxy_uppercase_ignored;
        Ok(relevant.then_some(rules))
    }

    /// How a connection to `url` is made.
    pub fn route(&self, url: &str) -> Route<'_> {
        let Ok(parsed) = url::Url::parse(url) else {
            return Route::Direct(Direct::NotAUrl);
        };
        let (scheme, server) = match parsed.scheme() {
            "https" => ("https", self.https.as_ref()),
            "http" => ("http", self.http.as_ref()),
            _ => return Route::Direct(Direct::NotAUrl),
        };
        match server {
            None if scheme == "http" && self.http_proxy_uppercase_ignored => {
                Route::Direct(Direct::HttpProxyUppercaseIgnored)
            }
            None => Route::Direct(Direct::NoProxyFor(scheme)),
            Some(_) if self.no_proxy.matches(&parsed) => {
                Route::Direct(Direct::ListedIn(self.no_proxy.variable))
            }
            Some(server) => Route::Proxy(server),
        }
    }

    /// The proxy passwords, as decoded and as written, for the log scrubber.
    pub fn secrets(&self) -> Vec<String> {
        let mut secrets = Vec::new();
        for server in [&self.https, &self.http].into_iter().flatten() {
            if let Some(credentials) = &server.credentials {
                secrets.push(credentials.password.clone());
                secrets.push(credentials.password_as_written.clone());
            }
        }
        secrets.retain(|s| !s.is_empty());
        secrets.sort();
        secrets.dedup();
        secrets
    }
}

/// Shows each proxy's host, port and variable, never a password.
impl fmt::Debug for ProxyRules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyRules")
            .field("https", &self.https)
            .field("http", &self.http)
            .field("no_proxy", &self.no_proxy)
            .field(
                "http_proxy_uppercase_ignored",
                &self.http_proxy_uppercase_ignored,
            )
            .finish()
    }
}

/// How a connection to `url` is made under `rules` (`None`: no proxy variable is set).
pub fn route<'a>(rules: Option<&'a ProxyRules>, url: &str) -> Route<'a> {
    match rules {
        Some(rules) => rules.route(url),
        None => Route::Direct(Direct::NoProxyVariable),
    }
}

/// How one connection is made; its `Display` is the startup log line's end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route<'a> {
    /// Through this proxy.
    Proxy(&'a ProxyServer),
    /// Straight to the server, for this reason.
    Direct(Direct),
}

impl Route<'_> {
    /// The proxy to hand to the HTTP client, if any.
    pub fn server(&self) -> Option<&ProxyServer> {
        match self {
            Route::Proxy(server) => Some(server),
            Route::Direct(_) => None,
        }
    }
}

/// Why a connection is direct.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direct {
    /// No proxy variable is set at all.
    NoProxyVariable,
    /// No proxy is set for this scheme (`https` or `http`), or its variable is empty.
    NoProxyFor(&'static str),
    /// The host is listed in this variable (`no_proxy` or `NO_PROXY`).
    ListedIn(&'static str),
    /// An `http://` URL, and only `HTTP_PROXY` (ignored) names a proxy for it.
    HttpProxyUppercaseIgnored,
    /// The URL does not parse or is not `http://` or `https://`; it will fail on its own.
    NotAUrl,
}

impl fmt::Display for Route<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Route::Proxy(server) => {
                write!(
                    f,
                    "through the proxy {} (from {}",
                    server.address(),
                    server.variable
                )?;
                if server.credentials.is_some() {
                    f.write_str(", with credentials")?;
                }
                f.write_str(")")
            }
            Route::Direct(Direct::NoProxyVariable) => {
                f.write_str("directly (no proxy variable is set)")
            }
            Route::Direct(Direct::NoProxyFor(scheme)) => {
                write!(f, "directly (no proxy is set for {scheme}:// URLs)")
            }
            Route::Direct(Direct::ListedIn(variable)) => {
                write!(f, "directly (the host is listed in {variable})")
            }
            Route::Direct(Direct::HttpProxyUppercaseIgnored) => f.write_str(
                "directly (HTTP_PROXY is ignored, as curl ignores it; set http_proxy to use a \
                 proxy for http:// URLs)",
            ),
            Route::Direct(Direct::NotAUrl) => f.write_str("directly (not an http(s) URL)"),
        }
    }
}

/// One HTTP proxy: where it is, which variable named it, and its credentials if any.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyServer {
    variable: &'static str,
    /// Lower case, no brackets (IPv6 literals are refused).
    host: String,
    port: u16,
    credentials: Option<Credentials>,
}

#[derive(Clone, PartialEq, Eq)]
struct Credentials {
    user: String,
    password: String,
    /// The password before percent-decoding, so that the scrubber knows this form too.
    password_as_written: String,
}

impl ProxyServer {
    /// Parses `[http://][user[:password]@]host[:port][/]` as curl reads a proxy, named
    /// `variable` in errors.
    fn parse(variable: &'static str, text: &str) -> Result<ProxyServer, ProxyError> {
        let error = |problem| ProxyError { variable, problem };
        let rest = match text.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some((scheme, _)) => {
                let word = (!scheme.is_empty()
                    && scheme.len() <= 16
                    && scheme.chars().all(|c| c.is_ascii_alphanumeric()))
                .then(|| scheme.to_ascii_lowercase());
                return Err(error(ProxyProblem::UnsupportedScheme(word)));
            }
            None => text,
        };
        // The last `@` ends the credentials, as in ureq and curl, so a password with a raw `@`
        // or `/` still works; the host part ends at the first `/`, `?` or `#`.
        let (userinfo, after) = match rest.rsplit_once('@') {
            Some((userinfo, after)) => (Some(userinfo), after),
            None => (None, rest),
        };
        let host_port = after.split(['/', '?', '#']).next().unwrap_or_default();
        if host_port.starts_with('[') {
            return Err(error(ProxyProblem::Ipv6Host));
        }
        let (host, port) = match host_port.rsplit_once(':') {
            Some((host, port)) => {
                let port = port
                    .parse::<u16>()
                    .ok()
                    .filter(|&p| p != 0 && port.bytes().all(|b| b.is_ascii_digit()))
                    .ok_or_else(|| error(ProxyProblem::BadPort))?;
                (host, port)
            }
            None => (host_port, DEFAULT_PROXY_PORT),
        };
        if host.is_empty() {
            return Err(error(ProxyProblem::NoHost));
        }
        if host.contains(':') {
            return Err(error(ProxyProblem::Ipv6Host));
        }
        if !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        {
            return Err(error(ProxyProblem::BadHost));
        }
        let credentials = match userinfo {
            None => None,
            Some(userinfo) => {
                let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                let decode = |text: &str| {
                    percent_decoded(text).ok_or_else(|| error(ProxyProblem::BadPercentEncoding))
                };
                let user = decode(user)?;
                if user.contains(':') {
                    return Err(error(ProxyProblem::ColonInUser));
                }
                Some(Credentials {
                    user,
                    password: decode(password)?,
                    password_as_written: password.to_owned(),
                })
            }
        };
        let server = ProxyServer {
            variable,
            host: host.to_ascii_lowercase(),
            port,
            credentials,
        };
        // ureq parses its own string: make sure it takes ours now, so that building an agent
        // later cannot fail.
        if ureq::Proxy::new(server.ureq_spec()).is_err() {
            return Err(error(ProxyProblem::BadHost));
        }
        Ok(server)
    }

    /// `host:port`, for log lines.
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// The proxy for ureq's `AgentBuilder::proxy`.
    pub(crate) fn to_ureq(&self) -> ureq::Proxy {
        ureq::Proxy::new(self.ureq_spec()).expect("the proxy was checked with ureq when parsed")
    }

    /// The proxy in the form ureq parses: `http://user:password@host:port`, decoded (ureq
    /// sends what it is given). Holds the password: never logged, never kept.
    fn ureq_spec(&self) -> String {
        match &self.credentials {
            Some(c) => format!(
                "http://{}:{}@{}:{}",
                c.user, c.password, self.host, self.port
            ),
            None => format!("http://{}:{}", self.host, self.port),
        }
    }
}

/// Shows where the proxy is and whether it has credentials, never what they are.
impl fmt::Debug for ProxyServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyServer")
            .field("variable", &self.variable)
            .field("address", &self.address())
            .field(
                "credentials",
                &self.credentials.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// `text` with `%XX` decoded; `None` for a `%` without two hex digits or bytes that are not
/// UTF-8.
fn percent_decoded(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            let digits = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(digits, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The hosts reached without a proxy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct NoProxy {
    /// `no_proxy` or `NO_PROXY`, for the log line.
    variable: &'static str,
    /// `*` was listed.
    all: bool,
    entries: Vec<NoProxyEntry>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum NoProxyEntry {
    /// A host name (lower case, no leading or trailing dot) and every name below it.
    Name { name: String, port: Option<u16> },
    /// One IP address.
    Address { address: IpAddr, port: Option<u16> },
    /// Every address whose first `prefix` bits are `network`'s.
    Network { network: IpAddr, prefix: u8 },
}

impl NoProxy {
    /// Never fails: an entry that means nothing matches nothing, as in curl, so a typo in a
    /// host-wide `no_proxy` cannot keep the daemon from starting.
    fn parse(variable: &'static str, text: &str) -> NoProxy {
        let mut no_proxy = NoProxy {
            variable,
            ..NoProxy::default()
        };
        for entry in text
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|e| !e.is_empty())
        {
            if entry == "*" {
                no_proxy.all = true;
            } else if let Some(entry) = NoProxyEntry::parse(entry) {
                no_proxy.entries.push(entry);
            }
        }
        no_proxy
    }

    /// Whether `url`'s host (and port) is listed.
    fn matches(&self, url: &url::Url) -> bool {
        if self.all {
            return true;
        }
        let port = url.port_or_known_default();
        let port_matches = |want: &Option<u16>| want.is_none() || *want == port;
        match url.host() {
            Some(url::Host::Domain(host)) => {
                let host = host.trim_end_matches('.').to_ascii_lowercase();
                self.entries.iter().any(|entry| match entry {
                    NoProxyEntry::Name { name, port } => {
                        port_matches(port)
                            && (host == *name
                                || host
                                    .strip_suffix(name.as_str())
                                    .is_some_and(|head| head.ends_with('.')))
                    }
                    _ => false,
                })
            }
            Some(url::Host::Ipv4(v4)) => self.matches_address(IpAddr::V4(v4), port),
            Some(url::Host::Ipv6(v6)) => self.matches_address(IpAddr::V6(v6), port),
            None => false,
        }
    }

    fn matches_address(&self, host: IpAddr, host_port: Option<u16>) -> bool {
        self.entries.iter().any(|entry| match *entry {
            NoProxyEntry::Address { address, port } => {
                address == host && (port.is_none() || port == host_port)
            }
            NoProxyEntry::Network { network, prefix } => in_network(host, network, prefix),
            NoProxyEntry::Name { .. } => false,
        })
    }
}

impl NoProxyEntry {
    fn parse(entry: &str) -> Option<NoProxyEntry> {
        if let Some((network, prefix)) = entry.split_once('/') {
            let network: IpAddr = network
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse()
                .ok()?;
            let prefix: u8 = prefix.parse().ok()?;
            let bits = if network.is_ipv4() { 32 } else { 128 };
            return (prefix <= bits).then_some(NoProxyEntry::Network { network, prefix });
        }
        if let Ok(address) = entry.parse::<IpAddr>() {
            return Some(NoProxyEntry::Address {
                address,
                port: None,
            });
        }
        if let Some(rest) = entry.strip_prefix('[') {
            let (address, after) = rest.split_once(']')?;
            let port = match after {
                "" => None,
                _ => Some(after.strip_prefix(':')?.parse().ok()?),
            };
            return Some(NoProxyEntry::Address {
                address: address.parse().ok()?,
                port,
            });
        }
        let (host, port) = match entry.rsplit_once(':') {
            Some((host, port)) => (host, Some(port.parse().ok()?)),
            None => (entry, None),
        };
        if let Ok(address) = host.parse::<IpAddr>() {
            return Some(NoProxyEntry::Address { address, port });
        }
        let name = host
            .trim_start_matches("*.")
            .trim_start_matches('.')
            .trim_end_matches('.')
            .to_ascii_lowercase();
        (!name.is_empty()).then_some(NoProxyEntry::Name { name, port })
    }
}

/// Whether `host` is in `network`/`prefix` (both of one family).
fn in_network(host: IpAddr, network: IpAddr, prefix: u8) -> bool {
    let (host, network, bits) = match (host, network) {
        (IpAddr::V4(h), IpAddr::V4(n)) => (
            u128::from(u32::from(h)) << 96,
            u128::from(u32::from(n)) << 96,
            32,
        ),
        (IpAddr::V6(h), IpAddr::V6(n)) => (u128::from(h), u128::from(n), 128),
        _ => return false,
    };
    let prefix = u32::from(prefix.min(bits));
    let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
    host & mask == network & mask
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&'static str, &str)]) -> ProxyEnv {
        ProxyEnv::from_lookup(|name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| (*v).to_owned())
        })
    }

    fn rules(vars: &[(&'static str, &str)]) -> ProxyRules {
        ProxyRules::from_env(&env(vars))
            .expect("valid proxy variables")
            .expect("a proxy is set")
    }

    /// The proxy's `host:port` for `url`, or `None` when it goes direct.
    fn proxy_for(rules: &ProxyRules, url: &str) -> Option<String> {
        rules.route(url).server().map(ProxyServer::address)
    }

    fn problem(value: &str) -> ProxyProblem {
        ProxyRules::from_env(&env(&[("https_proxy", value)]))
            .expect_err("refused")
            .problem
    }

    #[test]
    fn lowercase_wins_over_capitals() {
        let found = env(&[("https_proxy", "a:1"), ("HTTPS_PROXY", "b:2")]);
        assert_eq!(found.https.map(|v| v.variable), Some("https_proxy"));
        let found = env(&[("HTTPS_PROXY", "b:2")]);
        assert_eq!(found.https.map(|v| v.variable), Some("HTTPS_PROXY"));
        let found = env(&[("no_proxy", "a"), ("NO_PROXY", "b")]);
        assert_eq!(found.no_proxy.map(|v| v.variable), Some("no_proxy"));
        let found = env(&[("all_proxy", "a:1"), ("ALL_PROXY", "b:2")]);
        assert_eq!(found.http.map(|v| v.variable), Some("all_proxy"));
    }

    #[test]
    fn capital_http_proxy_is_ignored_as_curl_ignores_it() {
        let found = env(&[("HTTP_PROXY", "evil:3128")]);
        assert!(found.http.is_none());
        assert!(found.http_proxy_uppercase_ignored);
        let rules = ProxyRules::from_env(&found)
            .unwrap()
            .expect("the hint is kept");
        assert_eq!(
            rules.route("http://relay:8030/all"),
            Route::Direct(Direct::HttpProxyUppercaseIgnored)
        );
        let found = env(&[("HTTP_PROXY", "evil:3128"), ("http_proxy", "good:3128")]);
        assert_eq!(found.http.map(|v| v.variable), Some("http_proxy"));
        assert!(!found.http_proxy_uppercase_ignored);
    }

    #[test]
    fn all_proxy_is_the_fallback_for_both_schemes() {
        let rules = rules(&[("ALL_PROXY", "fallback:8080"), ("https_proxy", "tls:3128")]);
        assert_eq!(
            proxy_for(&rules, "https://sdk.launchdarkly.com").as_deref(),
            Some("tls:3128")
        );
        assert_eq!(
            proxy_for(&rules, "http://relay:8030").as_deref(),
            Some("fallback:8080")
        );
    }

    #[test]
    fn an_empty_variable_means_no_proxy_and_stops_the_search() {
        let found = env(&[
            ("https_proxy", ""),
            ("HTTPS_PROXY", "b:2"),
            ("ALL_PROXY", "c:3"),
        ]);
        assert_eq!(
            found.https.as_ref().map(|v| v.variable),
            Some("https_proxy")
        );
        let rules = ProxyRules::from_env(&found)
            .unwrap()
            .expect("http has ALL_PROXY");
        assert_eq!(
            rules.route("https://sdk.launchdarkly.com"),
            Route::Direct(Direct::NoProxyFor("https"))
        );
        assert_eq!(
            ProxyRules::from_env(&env(&[("https_proxy", " ")])),
            Ok(None)
        );
        assert_eq!(ProxyRules::from_env(&env(&[("no_proxy", "*")])), Ok(None));
        assert_eq!(ProxyRules::from_env(&env(&[])), Ok(None));
    }

    #[test]
    fn proxy_urls_are_read_as_curl_reads_them() {
        let rules = rules(&[("https_proxy", "http://Proxy.Example:3128/")]);
        assert_eq!(
            proxy_for(&rules, "https://x").as_deref(),
            Some("proxy.example:3128")
        );
        let rules = rules_for("proxy.example");
        assert_eq!(
            proxy_for(&rules, "https://x").as_deref(),
            Some("proxy.example:1080")
        );
        let rules = rules_for("HTTP://10.0.0.5:8080");
        assert_eq!(
            proxy_for(&rules, "https://x").as_deref(),
            Some("10.0.0.5:8080")
        );
    }

    fn rules_for(value: &str) -> ProxyRules {
        rules(&[("https_proxy", value)])
    }

    #[test]
    fn credentials_are_decoded_and_kept_out_of_debug_output() {
        let rules = rules_for("http://svc%40corp:p%40ss:w/rd@proxy:3128");
        let server = rules.route("https://x").server().cloned().expect("proxied");
        let credentials = server.credentials.clone().expect("credentials");
        assert_eq!(credentials.user, "svc@corp");
        assert_eq!(credentials.password, "p@ss:w/rd");
        assert_eq!(server.address(), "proxy:3128");
        let shown = format!(
            "{rules:?} {server:?} {:?}",
            env(&[("https_proxy", "u:hunter22@p")])
        );
        assert!(!shown.contains("p@ss"), "{shown}");
        assert!(!shown.contains("p%40ss"), "{shown}");
        assert!(!shown.contains("hunter22"), "{shown}");
        assert_eq!(
            rules.secrets(),
            vec!["p%40ss:w/rd".to_owned(), "p@ss:w/rd".to_owned()]
        );
        assert_eq!(
            rules.route("https://x").to_string(),
            "through the proxy proxy:3128 (from https_proxy, with credentials)"
        );
        // ureq takes the decoded form without complaint.
        let _ = server.to_ureq();
    }

    #[test]
    fn a_user_without_password_is_kept() {
        let rules = rules_for("someone@proxy:3128");
        let server = rules.route("https://x").server().cloned().expect("proxied");
        let credentials = server.credentials.expect("credentials");
        assert_eq!(credentials.user, "someone");
        assert_eq!(credentials.password, "");
        assert!(rules.secrets().is_empty());
    }

    #[test]
    fn unusable_proxies_are_refused_naming_the_variable_not_the_password() {
        assert_eq!(
            problem("https://user:hunter22@proxy:3128"),
            ProxyProblem::UnsupportedScheme(Some("https".into()))
        );
        assert_eq!(
            problem("socks5://proxy:1080"),
            ProxyProblem::UnsupportedScheme(Some("socks5".into()))
        );
        assert_eq!(problem("http://[::1]:3128"), ProxyProblem::Ipv6Host);
        assert_eq!(problem("http://user:pw@:3128"), ProxyProblem::NoHost);
        assert_eq!(problem("http://proxy:99999"), ProxyProblem::BadPort);
        assert_eq!(problem("http://proxy:0"), ProxyProblem::BadPort);
        assert_eq!(problem("http://proxy:"), ProxyProblem::BadPort);
        assert_eq!(problem("http://pro xy:3128"), ProxyProblem::BadHost);
        assert_eq!(problem("http://a%3Ab:pw@proxy"), ProxyProblem::ColonInUser);
        assert_eq!(
            problem("http://user:100%@proxy"),
            ProxyProblem::BadPercentEncoding
        );
        let error = ProxyRules::from_env(&env(&[("ALL_PROXY", "https://u:hunter22@p:1")]))
            .expect_err("refused");
        assert_eq!(error.variable, "ALL_PROXY");
        let message = error.to_string();
        assert!(message.contains("ALL_PROXY"), "{message}");
        assert!(!message.contains("hunter22"), "{message}");
    }

    #[test]
    fn no_proxy_matches_names_and_their_subdomains() {
        for list in [
            "example.com",
            ".example.com",
            "*.example.com",
            "EXAMPLE.com.",
        ] {
            let rules = rules(&[("https_proxy", "p:1"), ("no_proxy", list)]);
            for direct in [
                "https://example.com/all",
                "https://a.example.com/all",
                "https://b.a.Example.COM./all",
            ] {
                assert_eq!(
                    rules.route(direct),
                    Route::Direct(Direct::ListedIn("no_proxy")),
                    "{list} {direct}"
                );
            }
            for proxied in ["https://badexample.com", "https://example.com.evil"] {
                assert!(proxy_for(&rules, proxied).is_some(), "{list} {proxied}");
            }
        }
    }

    #[test]
    fn no_proxy_star_matches_everything() {
        let rules = rules(&[("https_proxy", "p:1"), ("NO_PROXY", "*")]);
        assert_eq!(
            rules.route("https://sdk.launchdarkly.com"),
            Route::Direct(Direct::ListedIn("NO_PROXY"))
        );
        let rules = rules_for("p:1");
        assert!(proxy_for(&rules, "https://sdk.launchdarkly.com").is_some());
    }

    #[test]
    fn no_proxy_matches_addresses_exactly_and_networks() {
        let rules = rules(&[
            ("https_proxy", "p:1"),
            ("no_proxy", " 127.0.0.1, 10.0.0.0/8 ::1,fd00::/8"),
        ]);
        for direct in [
            "https://127.0.0.1:8443",
            "https://10.1.2.3",
            "https://[::1]:443",
            "https://[fd12::5]",
        ] {
            assert!(proxy_for(&rules, direct).is_none(), "{direct}");
        }
        for proxied in ["https://127.0.0.2", "https://11.0.0.1", "https://[fe80::1]"] {
            assert!(proxy_for(&rules, proxied).is_some(), "{proxied}");
        }
        // Names are not resolved.
        assert!(proxy_for(&rules, "https://localhost").is_some());
    }

    #[test]
    fn no_proxy_entries_may_name_a_port() {
        let rules = rules(&[
            ("https_proxy", "p:1"),
            ("no_proxy", "relay.internal:8443,127.0.0.1:9000,[::1]:9001"),
        ]);
        assert!(proxy_for(&rules, "https://relay.internal:8443").is_none());
        assert!(proxy_for(&rules, "https://relay.internal").is_some());
        assert!(proxy_for(&rules, "https://127.0.0.1:9000").is_none());
        assert!(proxy_for(&rules, "https://127.0.0.1:9001").is_some());
        assert!(proxy_for(&rules, "https://[::1]:9001").is_none());
    }

    #[test]
    fn meaningless_no_proxy_entries_match_nothing() {
        let rules = rules(&[("https_proxy", "p:1"), ("no_proxy", "10.0.0.0/99,:,[x]")]);
        assert!(proxy_for(&rules, "https://10.0.0.1").is_some());
    }

    #[test]
    fn startup_lines_say_why_a_connection_is_direct() {
        assert_eq!(
            route(None, "https://sdk.launchdarkly.com").to_string(),
            "directly (no proxy variable is set)"
        );
        let rules = rules_for("p:1");
        assert_eq!(
            rules.route("http://relay:8030").to_string(),
            "directly (no proxy is set for http:// URLs)"
        );
    }
}
