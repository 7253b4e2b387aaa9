//! taskworker: consumes time-sensitive jobs and sheds what cannot finish in time.
//! Everything lives in the library (its `worker` module; ARCHITECTURE.md maps it).

fn main() -> std::process::ExitCode {
    flagshed::run_taskworker()
}
