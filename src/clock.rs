//! Wall-clock time in Unix epoch milliseconds: the unit of `x-created-ms` and `x-deadline-ms`,
//! which producers on other hosts write, so deadlines are compared on the wall clock.

use std::time::{SystemTime, UNIX_EPOCH};

/// Now, in milliseconds since the Unix epoch. A clock set before 1970 reads as 0.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
