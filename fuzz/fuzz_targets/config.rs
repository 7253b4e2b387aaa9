//! The configuration file: any text must load or be refused with one line naming the file
//! (and the key, where there is one); bytes that are not UTF-8 are refused before parsing, as
//! `Config::load` does.

#![no_main]

use flagshed::config::{Config, ConfigError};
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let path = Path::new("/etc/flagshed/fuzz.toml");
    match Config::parse(path, text) {
        Ok(config) => {
            assert_eq!(config.path, path);
            assert!(config.worker.concurrency >= 1);
            assert!(config.worker.prefetch >= 1);
        }
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.starts_with("/etc/flagshed/fuzz.toml: "),
                "{message}"
            );
            assert!(!message.contains('\n'), "{message}");
            if let ConfigError::Invalid { key, .. } = &e {
                assert!(message.contains(key), "{message}");
            }
        }
    }
});
