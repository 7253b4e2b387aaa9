//! taskqueuer: publishes time-sensitive jobs at the rate a flag sets.
//! Everything lives in the library; see `flagshed::queuer`.

fn main() -> std::process::ExitCode {
    flagshed::daemon::main(flagshed::service::Role::Queuer)
}
