//! taskworker: consumes time-sensitive jobs and sheds what cannot finish in time.
//! Everything lives in the library; see `flagshed::worker`.

fn main() -> std::process::ExitCode {
    flagshed::daemon::main(flagshed::service::Role::Worker)
}
