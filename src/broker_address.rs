//! One RabbitMQ node's address, parsed once from an `amqp://` or `amqps://` URL when the config
//! is loaded and carried typed from then on.
//!
//! The URL may hold the broker password, so nothing here ever shows it: `Display` and `Debug`
//! give `host:port vhost "/"` (with `amqps` for TLS), and parse errors never repeat the URL.

use std::fmt;

/// Why a broker URL was refused; never quotes the URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadUrl(pub String);

impl fmt::Display for BadUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadUrl {}

/// Where a node is and how to log in to it.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerAddress {
    /// `amqps://`: the connection is TLS, with the server certificate and host name verified.
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub vhost: String,
    pub user: String,
    password: String,
    /// Whether the URL itself held a password (else RabbitMQ's default, or a credential).
    password_in_url: bool,
}

impl fmt::Display for BrokerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "amqps " } else { "" };
        write!(
            f,
            "{scheme}{}:{} vhost {:?}",
            self.host, self.port, self.vhost
        )
    }
}

impl fmt::Debug for BrokerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BrokerAddress({self})")
    }
}

impl BrokerAddress {
    /// Parses `amqp[s]://user:password@host:port/vhost`, with RabbitMQ's defaults for missing
    /// parts (guest/guest, port 5672 or 5671 for TLS, vhost `/`).
    pub fn parse(url: &str) -> Result<BrokerAddress, BadUrl> {
        let parsed = url::Url::parse(url).map_err(|e| BadUrl(format!("not a URL ({e})")))?;
        let (tls, default_port) = match parsed.scheme() {
            "amqp" => (false, 5672),
            "amqps" => (true, 5671),
            other => {
                return Err(BadUrl(format!(
                    "scheme {other:?} is not amqp:// or amqps://"
                )));
            }
        };
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(BadUrl(
                "URL parameters are not read; use the [broker] keys instead".into(),
            ));
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
            return Err(BadUrl(
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
        Ok(BrokerAddress {
            tls,
            host,
            port: parsed.port().unwrap_or(default_port),
            vhost,
            user,
            password: parsed
                .password()
                .map(decode)
                .unwrap_or_else(|| "guest".into()),
            password_in_url: parsed.password().is_some(),
        })
    }

    /// The password to log in with. Only the connection handshake should read it.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// Uses `password` (a systemd credential) unless the URL held one of its own.
    pub fn with_default_password(mut self, password: Option<&str>) -> BrokerAddress {
        if let Some(password) = password.filter(|_| !self.password_in_url) {
            self.password = password.to_owned();
        }
        self
    }

    /// `host:port`, for the stats line.
    pub fn node(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
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
        assert_eq!(a.password(), "s@cret");
        assert!(!a.tls);
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
        let tls = BrokerAddress::parse("amqps://h").unwrap();
        assert!(tls.tls);
        assert_eq!(tls.port, 5671);
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
    fn a_credential_fills_in_only_a_missing_password() {
        let without = BrokerAddress::parse("amqp://alice@h/").unwrap();
        assert_eq!(
            without.with_default_password(Some("cred")).password(),
            "cred"
        );
        let with = BrokerAddress::parse("amqp://alice:own@h/").unwrap();
        assert_eq!(with.with_default_password(Some("cred")).password(), "own");
    }

    #[test]
    fn refuses_other_schemes_paths_and_parameters() {
        for url in ["http://h/", "amqp://h/a/b", "amqp://h/?heartbeat=5"] {
            let err = BrokerAddress::parse(url).unwrap_err().to_string();
            assert!(!err.contains("h/"), "{err}");
        }
    }
}
