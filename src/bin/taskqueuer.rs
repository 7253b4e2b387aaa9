//! taskqueuer: publishes time-sensitive jobs at the rate a flag sets.
//! Everything lives in the library (its `queuer` module; ARCHITECTURE.md maps it).

fn main() -> std::process::ExitCode {
    flagshed::run_taskqueuer()
}
