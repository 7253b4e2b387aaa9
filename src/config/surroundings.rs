//! What a daemon takes from outside its config file, read once at startup: the environment,
//! systemd's credentials directory and the host name. Validation only reads the
//! [`Surroundings`] it is given.

use crate::proxy::ProxyEnv;
use std::fmt;
use std::path::PathBuf;

/// What a daemon takes from outside its config file, read once at startup
/// ([`Surroundings::read`]): the SDK key from `LAUNCHDARKLY_SDK_KEY` or the `sdk-key`
/// credential, the broker password from the `broker-password` credential, the host name, and
/// the proxy variables for LaunchDarkly's connections.
/// Parsing a config never reads the environment itself, so a test's result does not depend
/// on the shell that runs it.
#[derive(Clone, Default, PartialEq)]
pub struct Surroundings {
    pub sdk_key: Option<String>,
    pub broker_password: Option<String>,
    /// The default `flags.context_key`; empty reads as `localhost`.
    pub host_name: String,
    /// `https_proxy`, `no_proxy` and the rest, unchecked (see [`crate::proxy`]).
    pub proxy: ProxyEnv,
}

impl fmt::Debug for Surroundings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Surroundings")
            .field("sdk_key", &self.sdk_key.as_ref().map(|_| "<redacted>"))
            .field(
                "broker_password",
                &self.broker_password.as_ref().map(|_| "<redacted>"),
            )
            .field("host_name", &self.host_name)
            .field("proxy", &self.proxy)
            .finish()
    }
}

impl Surroundings {
    /// Reads the environment, the credentials directory and the host name: the one place
    /// a daemon does so.
    pub fn read() -> Surroundings {
        let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
        let credential = |name: &str| {
            let dir = credentials.as_ref()?;
            let text = std::fs::read_to_string(dir.join(name)).ok()?;
            Some(text.trim().to_owned()).filter(|t| !t.is_empty())
        };
        let sdk_key = std::env::var(SDK_KEY_ENV)
            .ok()
            .map(|k| k.trim().to_owned())
            .filter(|k| !k.is_empty())
            .or_else(|| credential(SDK_KEY_CREDENTIAL));
        Surroundings {
            sdk_key,
            broker_password: credential(BROKER_PASSWORD_CREDENTIAL),
            host_name: host_name(),
            proxy: ProxyEnv::from_process(),
        }
    }
}

/// Where an SDK key may come from besides the config file, in order: the environment
/// variable `LAUNCHDARKLY_SDK_KEY`, then a systemd credential named `sdk-key`
/// (`LoadCredential=sdk-key:...` puts it in `$CREDENTIALS_DIRECTORY`).
pub const SDK_KEY_ENV: &str = "LAUNCHDARKLY_SDK_KEY";

/// The systemd credential holding the SDK key.
pub const SDK_KEY_CREDENTIAL: &str = "sdk-key";

/// The systemd credential holding the broker password, used for every broker URL that has
/// no password of its own (`LoadCredential=broker-password:...`).
pub const BROKER_PASSWORD_CREDENTIAL: &str = "broker-password";

/// The default context key: the host name, so LaunchDarkly rollouts spread across hosts.
/// Read with gethostname(2), which works where /proc is hidden (systemd's `ProcSubset=pid`).
fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into a buffer we own.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let from_kernel = (rc == 0)
        .then(|| {
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            String::from_utf8_lossy(&buf[..end]).trim().to_owned()
        })
        .filter(|name| !name.is_empty());
    from_kernel
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "localhost".to_owned())
}
