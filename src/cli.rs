//! Command-line arguments, shared by both daemons: what the user typed, checked once.

use crate::config::DEFAULT_CONFIG_PATH;
use std::path::PathBuf;

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    /// Run the daemon with this config file.
    Run {
        config: PathBuf,
    },
    /// Validate the config file and exit.
    CheckConfig {
        config: PathBuf,
    },
    Version,
    Help,
}

/// Parses `args` (without the program name). Errors are one line, for stderr.
pub fn parse(args: impl IntoIterator<Item = std::ffi::OsString>) -> Result<Command, String> {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_args(args);
    let mut config = PathBuf::from(DEFAULT_CONFIG_PATH);
    let mut check = false;
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        match arg {
            Short('c') | Long("config") => {
                config = parser.value().map_err(|e| e.to_string())?.into();
            }
            Long("check-config") => check = true,
            Short('V') | Long("version") => return Ok(Command::Version),
            Short('h') | Long("help") => return Ok(Command::Help),
            other => return Err(other.unexpected().to_string()),
        }
    }
    Ok(if check {
        Command::CheckConfig { config }
    } else {
        Command::Run { config }
    })
}

/// The `--help` text for `program`.
pub fn usage(program: &str, summary: &str) -> String {
    format!(
        "{program} {version}: {summary}

Usage: {program} [--config PATH] [--check-config]

Options:
  -c, --config PATH   configuration file (default {DEFAULT_CONFIG_PATH})
      --check-config  validate the configuration file and exit (0 if valid, 78 if not)
  -V, --version       print the version and exit
  -h, --help          print this help and exit

Signals: SIGHUP reloads the configuration and the flag file; SIGTERM or SIGINT drains and
stops (a second one stops at once). See {program}(8) and flagshed.toml(5).
",
        version = env!("CARGO_PKG_VERSION")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_strs(args: &[&str]) -> Result<Command, String> {
        parse(args.iter().map(std::ffi::OsString::from))
    }

    #[test]
    fn defaults_to_etc_path() {
        assert_eq!(
            parse_strs(&[]).unwrap(),
            Command::Run {
                config: DEFAULT_CONFIG_PATH.into()
            }
        );
    }

    #[test]
    fn check_config_with_path() {
        assert_eq!(
            parse_strs(&["--check-config", "-c", "x.toml"]).unwrap(),
            Command::CheckConfig {
                config: "x.toml".into()
            }
        );
    }

    #[test]
    fn unknown_option_is_an_error() {
        assert!(parse_strs(&["--frobnicate"]).is_err());
        assert!(parse_strs(&["--config"]).is_err());
    }
}
